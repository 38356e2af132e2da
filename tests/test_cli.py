"""The fxquant command line: help everywhere, JSON shapes, clean errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import fxquant
from fxquant.cli import build_parser, main

COMMANDS = ["eval", "compile", "inspect", "table", "demo", "models", "recipes"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fxquant " + command in capsys.readouterr().out


def test_top_level_help_lists_commands():
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_recipes_and_models_listings(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "minmax-w8a8" in out and "mse-w4a4" in out
    daq = next(line for line in out.splitlines() if line.startswith("daq-w4a4 "))
    assert daq.split()[1:3] == ["daq", "w4a4"] and "DAQ" in daq
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("imdn", "pan", "carn_m", "fsrcnn", "edsr_baseline", "rdn", "srresnet"):
        assert name in out


def test_bad_recipe_is_a_clean_error(capsys, data):
    code = main(["eval", "--model", "imdn", "--scale", "4", "--recipe", "minmax-w9a9",
                 "--datasets", "Set5", "--limit", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: unknown recipe preset 'minmax-w9a9'" in err and "Traceback" not in err


def test_missing_data_root_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.delenv("FXQUANT_DATA", raising=False)
    code = main(["eval", "--model", "imdn", "--scale", "4", "--datasets", "Set5"])
    err = capsys.readouterr().err
    assert code == 2 and "no data root given: pass --data PATH or set FXQUANT_DATA" in err


def test_unknown_model_is_a_clean_error(capsys, data):
    assert main(["eval", "--model", "imdm", "--scale", "4"]) == 2
    assert "unknown model 'imdm'" in capsys.readouterr().err


@pytest.mark.data
def test_eval_scores_a_saved_compiled_model_as_it_scores_the_compile(tmp_path, capsys, data):
    """`fxquant eval --compiled` (a trained model.fxq, a compiled start): the file's recipe
    and weights, the same scores as compiling here."""
    saved = str(tmp_path / "f.fxq")
    assert main(["compile", "--model", "fsrcnn", "--scale", "2", "--recipe", "minmax-w8a8",
                 "--out", saved]) == 0
    printed = capsys.readouterr().out  # every pass with its wall time
    assert re.findall(r"^  ([\w-]+) \(\d+\.\d s\): ", printed, re.M) == [
        "trace", "observe", "calibrate", "quantize", "verify"]
    common = ["--datasets", "Set5", "--limit", "1", "--json"]
    assert main(["eval", "--model", "fsrcnn", "--scale", "2", "--recipe", "minmax-w8a8",
                 *common]) == 0
    here = json.loads(capsys.readouterr().out)
    assert main(["eval", "--compiled", saved, *common]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded == {**here, "compiled": saved}
    assert loaded["datasets"]["Set5"]["quant"]["psnr"] < loaded["datasets"]["Set5"]["fp"]["psnr"]
    assert main(["eval", "--compiled", saved, "--scale", "3", *common]) == 2
    assert "--scale 3 does not match" in capsys.readouterr().err
    assert main(["eval", "--compiled", saved, "--scale", "2", *common]) == 0
    assert json.loads(capsys.readouterr().out) == loaded
    # report and the tools (fxquant.report.load_models) refuse the same contradictions
    assert main(["report", "--compiled", saved, "--recipe", "mse-w4a4", "--out",
                 str(tmp_path / "r.html")]) == 2
    assert "--recipe cannot go with --compiled" in capsys.readouterr().err
    from fxquant.report import load_models
    with pytest.raises(fxquant.FxquantError, match="--scale 3 does not match"):
        load_models(compiled=saved, scale=3)
    assert load_models(compiled=saved, model="fsrcnn", scale=2).recipe.name == "minmax-w8a8"
    assert main(["eval", "--compiled", saved, "--recipe", "mse-w4a4", *common]) == 2
    assert "--recipe cannot go with --compiled" in capsys.readouterr().err
    assert main(["eval", "--datasets", "Set5"]) == 2
    assert "give --model (a zoo model or file.py:Class), or --compiled FILE" in \
        capsys.readouterr().err


def test_python_m_fxquant_is_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "fxquant", "eval", "--model", "imdm"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("fxquant eval: error: unknown model")
    assert subprocess.run([sys.executable, "-m", "fxquant", "--help"], capture_output=True,
                          text=True, check=True).stdout.startswith("usage: fxquant ")


@pytest.mark.data
def test_eval_json_prints_exactly_one_object(data):
    proc = subprocess.run(
        [sys.executable, "-m", "fxquant.cli", "eval", "--model", "fsrcnn", "--scale", "3",
         "--recipe", "minmax-w8a8", "--datasets", "Set5,Set14", "--limit", "1", "--json"],
        capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout)
    assert set(report) == {"model", "scale", "recipe", "datasets"}
    assert report["model"] == "fsrcnn" and report["scale"] == 3
    assert set(report["datasets"]) == {"Set5", "Set14"}
    for scores in report["datasets"].values():
        assert set(scores) == {"fp", "quant"}
        assert set(scores["fp"]) == {"psnr", "ssim"}
        assert 20 < scores["quant"]["psnr"] <= scores["fp"]["psnr"] + 0.05
        assert 0 < scores["quant"]["ssim"] <= 1


@pytest.mark.data
def test_compile_then_inspect_a_saved_model(tmp_path, data, capsys):
    out = tmp_path / "fsrcnn.fxq"
    assert main(["compile", "--model", "fsrcnn", "--scale", "2", "--recipe", "minmax-w4a4",
                 "--out", str(out), "--dump-dir", str(tmp_path / "dumps")]) == 0
    assert out.is_file() and len(list((tmp_path / "dumps").glob("*.txt"))) == 5
    capsys.readouterr()
    assert main(["inspect", "--compiled", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mid_part_0_input_quantizer" in table
    assert "uniform bits=4 granularity=per-tensor mode=static" in table
    assert "weight uniform bits=4 granularity=per-channel" in table
    for flags, says in ((["--scale", "3"], "--scale 3 does not match"),
                        (["--model", "imdn"], "--model imdn does not match"),
                        (["--recipe", "mse-w4a4"], "--recipe cannot go with --compiled")):
        assert main(["inspect", "--compiled", str(out), *flags]) == 2
        assert says in capsys.readouterr().err


@pytest.mark.data
def test_eval_float_only(data, capsys):
    assert main(["eval", "--model", "fsrcnn", "--scale", "4", "--recipe", "fp",
                 "--datasets", "Set5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["datasets"]["Set5"]) == {"fp"}
    assert report["datasets"]["Set5"]["fp"]["psnr"] == pytest.approx(30.505, abs=0.01)


@pytest.mark.parametrize("command", ["eval", "report"])
@pytest.mark.parametrize("datasets, message", [
    (",", "--datasets ',' names no dataset"),
    ("Set5,Set6", "benchmark set 'Set6' not found: expected a folder {root}/benchmark/Set6/HR "
                  "holding HR images; sets present under {root}/benchmark: Set5"),
])
def test_a_bad_dataset_list_is_an_error_before_any_work(command, datasets, message, tmp_path,
                                                        capsys, monkeypatch):
    """A misspelt set used to fail after the compile (minutes for a reconstruction recipe)."""
    def no_work(*args, **kwargs):
        raise AssertionError("--datasets must be checked before any work")

    monkeypatch.setattr("fxquant.workflow.prepare", no_work)
    monkeypatch.setattr("fxquant.report.load_models", no_work)
    root = tmp_path / "data"
    (root / "benchmark" / "Set5" / "HR").mkdir(parents=True)
    argv = [command, "--model", "fsrcnn", "--scale", "4", "--recipe", "minmax-w8a8",
            "--datasets", datasets, "--data", str(root)]
    if command == "report":
        argv += ["--out", str(tmp_path / "r.html")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fxquant {command}: error: {message.format(root=root)}")


def test_the_demo_runs_eval_with_every_option_eval_reads(monkeypatch):
    """`make demo` broke when eval gained --runtime and the demo's hand-built arguments did
    not: its eval step is now parsed by the eval parser."""
    from fxquant import cli

    seen = []

    def fake_eval(args):
        seen.append(vars(args))
        return 1 if len(seen) == 2 else 0  # stop before the lowered half

    monkeypatch.setattr(cli, "cmd_eval", fake_eval)
    assert cli.main(["demo", "--data", "/some/root"]) == 1
    eval_defaults = vars(cli.build_parser().parse_args(["eval", "--model", "imdn"]))
    assert all(set(eval_defaults) <= set(step) for step in seen)
    assert [(step["model"], step["scale"], step["recipe"], step["datasets"], step["runtime"],
             step["data"]) for step in seen] == [
        ("imdn", 4, recipe, "Set5", "torch", "/some/root") for recipe in ("mse-w4a4", "i2nq-w4a4")]


def test_the_demo_table_shows_psnr_latency_and_speed_up():
    from fxquant.bench import Row
    from fxquant.demo import LoweredDemo, lowered_table

    demo = LoweredDemo({"fp": 32.21, "fake": 32.1234, "lowered": 32.1201},
                       Row("imdn", "fp32_eager", median_ms=40.0),
                       Row("imdn", "lowered", median_ms=10.0, ratio=3.93, ratio_min=3.5,
                           ratio_max=4.1), threads=2)
    lines = lowered_table(demo).splitlines()
    assert lines[0].split() == ["model", "Set5", "PSNR", "latency", "speed-up"]
    assert lines[1].split() == ["FP32", "eager", "32.210", "40.0ms", "1.00x"]
    assert lines[2].split() == ["W8A8", "fake-quant", "(float)", "32.123"]
    assert lines[3].split()[-7:] == ["32.120", "10.0ms", "3.93x", "(per-round", "3.50-4.10x,",
                                     "2", "threads)"]
    assert len(lines) == 4 and "VNNI" not in lowered_table(demo)
    demo.saturating_cpu = True  # the slow int8 path is explained, not left to puzzle over
    assert lowered_table(demo).splitlines()[4].startswith("this CPU has no VNNI: its int8 pairs "
                                                          "saturate")
