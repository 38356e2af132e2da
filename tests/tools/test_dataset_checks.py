"""The tools that compile a model and then read a benchmark set name a misspelt set before
the compile (which takes minutes for a reconstruction recipe), not after it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.data


@pytest.mark.parametrize("name, extra", [("layer_error", []), ("activation_bound", []),
                                         ("graph_dump", ["--errors"])])
def test_a_misspelt_dataset_fails_before_the_compile(load_tool, data, name, extra, capsys,
                                                     monkeypatch):
    tool = load_tool(name)

    def no_work(*args, **kwargs):
        raise AssertionError("--dataset must be checked before the model is compiled")

    monkeypatch.setattr("fxquant.report.load_models", no_work)  # the compile
    assert tool.main(["--model", "fsrcnn", "--scale", "4", "--recipe", "minmax-w8a8",
                      "--dataset", "Set6", "--data", str(data), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}: error: benchmark set 'Set6' not found")


@pytest.mark.parametrize("name", ["layer_error", "graph_dump"])
@pytest.mark.parametrize("flag, value, says", [("--images", "0", "1 or more"),
                                               ("--crop", "-1", "0 or more")])
def test_image_counts_and_crops_are_checked_as_arguments(load_tool, name, flag, value, says,
                                                         capsys):
    with pytest.raises(SystemExit) as exit_:
        load_tool(name).main(["--model", "fsrcnn", "--scale", "4", "--recipe", "minmax-w8a8",
                              flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: {value} must be {says}" in capsys.readouterr().err


def test_graph_dump_refuses_an_out_named_for_another_format(load_tool, capsys):
    assert load_tool("graph_dump").main(["--model", "fsrcnn", "--scale", "4", "--recipe",
                                         "minmax-w8a8", "--format", "svg", "--out", "g.txt"]) == 2
    assert "--out g.txt ends in .txt, the suffix of --format text; give a .svg path" in \
        capsys.readouterr().err
