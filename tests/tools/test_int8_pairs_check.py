"""tools/int8_pairs_check.py: the two cpu lowerings it compares and the override it scopes."""

from __future__ import annotations

import os

import pytest

import fxquant
from fxquant.lower.conv import CpuConv2d
from fxquant.lower.int8_pairs import OVERRIDE, int8_pairs_saturate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("int8_pairs_check")


def test_the_override_is_scoped_and_the_callers_value_restored(tool, monkeypatch):
    monkeypatch.setenv(OVERRIDE, "saturating")
    with tool.pairs_override(None):
        assert OVERRIDE not in os.environ
    with tool.pairs_override("exact"):
        assert os.environ[OVERRIDE] == "exact"
    assert os.environ[OVERRIDE] == "saturating"
    monkeypatch.delenv(OVERRIDE)
    with pytest.raises(RuntimeError), tool.pairs_override("exact"):
        raise RuntimeError
    assert OVERRIDE not in os.environ


def test_one_plane_is_never_split_and_the_default_follows_the_cpu(tool, tiny_sr, calib,
                                                                  monkeypatch):
    monkeypatch.setenv(OVERRIDE, "saturating")  # what the caller set does not leak in
    fake = fxquant.compile(tiny_sr, "mse-w8a8-sym", calib=calib)
    built = tool.lowerings(fake, compile=False)
    planes = {name: [len(m._packed) for m in model.modules() if isinstance(m, CpuConv2d)]
              for name, model in built.items()}
    assert planes["cpu one plane"] == [1, 1, 1, 1]
    monkeypatch.delenv(OVERRIDE)
    assert planes["cpu"] == [2 if int8_pairs_saturate() else 1] * 4
