"""tools/compile_sizes.py: its size table counts the compiles (static: one per size;
dynamic: none after the first), the comparison runs both copies, and bad sizes or options
are refused by name."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.errors import FxquantError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_table_counts_the_compiles(load_tool, tiny_sr, calib, dynamic):
    tool = load_tool("compile_sizes")
    torch._dynamo.reset()  # a fresh count of this copy's graphs
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    eager = fxquant.lowered_copy(fake, "cpu")
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True, dynamic=dynamic)
    # not square first: Dynamo's duck sizing would give a square's height and width one
    # symbol, and the first other shape would compile again
    rows = tool.size_rows(compiled, eager, 3, [(12, 14), (10, 13), (16, 9), (12, 14)])
    graphs = [int(row.split("|")[3]) for row in rows]
    assert graphs[0] >= 1 and graphs[3] == 0, rows
    assert (graphs[1] == 0 and graphs[2] == 0) if dynamic else (graphs[1] >= 1 and graphs[2] >= 1)
    assert all(float(row.split("|")[5]) < 1e-5 for row in rows), rows


def test_the_comparison_times_both_copies(load_tool, tiny_sr, calib):
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    text = load_tool("compile_sizes").compare(fake, {"target": "cpu", "compile": True}, 3,
                                              12, rounds=2)
    assert text.startswith("at 12×12, 2 interleaved rounds: static ") and "dynamic" in text


@pytest.mark.parametrize("text", ["120", "120x", "0x5", "ax5", "12x12,,"])
def test_bad_sizes_are_refused_by_name(load_tool, text):
    with pytest.raises(FxquantError, match="is not a size; give HxW pairs"):
        load_tool("compile_sizes").parse_sizes(text)


def test_sizes_parse_in_order(load_tool):
    assert load_tool("compile_sizes").parse_sizes("12x20, 7X9") == [(12, 20), (7, 9)]


@pytest.mark.parametrize("argv, message", [
    (["imdn", "minmax-w8a8", "--compare", "0"], "0 must be 1 or more"),
    (["imdn"], "the following arguments are required: recipe")])
def test_bad_arguments_get_an_argparse_error(argparse_error, argv, message):
    assert message in argparse_error("compile_sizes", argv)


def test_compile_in_the_options_is_refused_before_any_work(load_tool):
    with pytest.raises(FxquantError, match="compile is always true here"):
        load_tool("compile_sizes").main(["imdn", "minmax-w8a8", "--lower-options",
                                         "compile=false"])


def test_dynamic_is_taken_without_compile_in_the_options(load_tool, monkeypatch):
    """``--lower-options dynamic=true`` reaches the pass with compile=true (the pass alone
    refuses dynamic without compile)."""
    tool = load_tool("compile_sizes")
    seen = {}

    def stop(model, scale, recipe, data_root=None):
        seen.update(model=model)
        raise tool.FxquantError("stopped before compiling")

    monkeypatch.setattr(tool, "prepare", stop)
    with pytest.raises(FxquantError, match="stopped before compiling"):
        tool.main(["imdn", "minmax-w8a8", "--lower-options", "dynamic=true,planes=1"])
    assert seen == {"model": "imdn"}
