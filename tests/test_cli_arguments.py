"""Numeric command-line arguments are checked by the parser: a clear usage error, exit 2, before
any model is built (``--limit 0`` used to evaluate nothing, ``--crop -5`` crashed in numpy)."""

from __future__ import annotations

import pytest

from fxquant.cli import main


@pytest.mark.parametrize("argv, message", [
    (["eval", "--model", "imdn", "--scale", "4", "--limit", "0"], "--limit: 0 must be 1 or more"),
    (["eval", "--model", "imdn", "--scale", "0"], "--scale: 0 must be 1 or more"),
    (["eval", "--model", "imdn", "--scale", "x4"], "--scale: 'x4' is not an integer"),
    (["report", "--model", "imdn", "--scale", "4", "--recipe", "mse-w4a4", "--out", "r.html",
      "--images", "0"], "--images: 0 must be 1 or more"),
    (["report", "--model", "imdn", "--scale", "4", "--recipe", "mse-w4a4", "--out", "r.html",
      "--crop", "-5"], "--crop: -5 must be 0 or more"),
])
def test_bad_numbers_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_report_path_that_is_not_html_is_refused_before_the_compile(capsys, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("--out must be checked before the model is compiled")

    monkeypatch.setattr("fxquant.report.load_models", no_compile)
    assert main(["report", "--model", "imdn", "--scale", "4", "--recipe", "mse-w4a4", "--out",
                 "r.txt"]) == 2
    assert "--out r.txt: the report is one self-contained HTML page; give a .html path" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--format", "html", "--out", "g.dot"],
     "--out g.dot ends in .dot, the suffix of --format dot; give a .html path for --format "
     "html, or --format dot"),
    (["inspect", "--out", "g.svg"], "give a .txt path for --format text"),
    (["export", "--out", "m.ts"], "the suffix of --format torchscript"),
])
def test_an_out_named_for_another_format_is_refused_before_the_compile(argv, message, capsys,
                                                                        monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("--out must be checked before the model is compiled")

    monkeypatch.setattr("fxquant.workflow.prepare", no_compile)
    assert main([*argv, "--model", "imdn", "--scale", "4", "--recipe", "mse-w4a4"]) == 2
    assert message in capsys.readouterr().err
