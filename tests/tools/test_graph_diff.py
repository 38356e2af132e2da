"""tools/graph_diff.py: the diff of two dumps of a real compile, and its errors for files that
are not dumps (named by path, nothing printed to stdout)."""

from __future__ import annotations

import re

import pytest
import torch

import fxquant


@pytest.fixture
def dumps(tiny_sr, tmp_path):
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib, dump_dir=tmp_path / "d")
    return {p.stem.split("-", 1)[1]: p for p in (tmp_path / "d").glob("*.txt")}


def test_quantize_swaps_each_observer_for_a_quantizer(load_tool, dumps, capsys):
    assert load_tool("graph_diff").main([str(dumps["observe"]), str(dumps["quantize"])]) == 0
    out = capsys.readouterr().out
    removed = re.findall(r"^- (\S+)_input_observer ", out, re.M)
    added = re.findall(r"^\+ (\S+)_input_quantizer ", out, re.M)
    assert removed and sorted(removed) == sorted(added)
    assert re.search(r"^~ \S+: module Conv2d -> QuantConv2d", out, re.M)


@pytest.mark.parametrize("case, match", [
    ("missing", r"graph dump \S*missing\.txt does not exist"),
    ("binary", r"cannot read graph dump \S*binary\.txt"),
    ("text", r"cannot read graph dump \S*text\.txt \(not a graph table"),
    ("folder", r"holds 1 graph dump"),
])
def test_what_is_not_a_dump_is_named(load_tool, dumps, tmp_path, capsys, case, match):
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    (tmp_path / "text.txt").write_text("hello\n")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "00-trace.txt").write_text(dumps["trace"].read_text())
    argv = ([str(tmp_path / "one")] if case == "folder"
            else [str(dumps["trace"]), str(tmp_path / f"{case}.txt")])
    with pytest.raises(SystemExit) as exit_:
        load_tool("graph_diff").main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert re.search(match, captured.err), captured.err
