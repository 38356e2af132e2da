"""tools/codes_search_ab.py: its two lowered copies differ only in the compiled codes kernel
(the same output bit for bit), a model without a searching codes module is refused by name,
and bad arguments get argparse's error."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import FxquantError
from fxquant.lower import search
from fxquant.lower.codebook import CodebookQuantize

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_pair_searches_and_gathers_with_the_same_output(load_tool, tiny_sr, calib,
                                                           monkeypatch):
    monkeypatch.setattr(search, "float_lanes", lambda: 8)  # TinySR's 8 channels search
    fake = fxquant.compile(tiny_sr, "i2nq-w4a4", calib=calib)
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    pair = load_tool("codes_search_ab").lowered_pair(fake, x, 1, "exact")
    kinds = {name: {m.compiled_codes for m in model.modules()
                    if isinstance(m, CodebookQuantize)} for name, model in pair.items()}
    assert kinds == {"lowered, search": {"search"}, "lowered, table": {"table"}}
    with torch.no_grad():
        assert torch.equal(pair["lowered, search"](x), pair["lowered, table"](x))


def test_a_model_with_nothing_to_search_is_refused(load_tool, tiny_sr, calib):
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    with pytest.raises(FxquantError, match="no codes module that searches"):
        load_tool("codes_search_ab").lowered_pair(fake, torch.rand(1, 3, 8, 8), 1, "exact")


@pytest.mark.parametrize("argv, message", [
    (["imdn", "i2nq-w4a4", "--size", "0"], "0 must be 1 or more"),
    (["imdn", "i2nq-w4a4", "--subset-codes", "u4"], "invalid choice: 'u4'"),
    (["imdn"], "the following arguments are required: recipe")])
def test_bad_arguments_get_an_argparse_error(argparse_error, argv, message):
    assert message in argparse_error("codes_search_ab", argv)
