"""tools/odm_compare.py: the three recipes share one start, and a two-step run of the whole
loop (train in a subprocess, score the saved model, write the table)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

TOOL = Path(__file__).resolve().parents[2] / "tools" / "odm_compare.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("odm_compare", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("bits", [4, 2])
def test_the_three_recipes_share_one_start(tool, bits):
    recipes = tool.comparison_recipes(bits)
    assert [recipes[m].method for m in tool.METHODS] == ["uniform", "odm", "odm"]
    for recipe in recipes.values():
        assert (recipe.weights, recipe.activations, recipe.calibration) == \
            (recipes["qat"].weights, recipes["qat"].activations, recipes["qat"].calibration)
        assert recipe.weights.bits == recipe.activations.bits == bits
    assert recipes["qat"].pipeline_spec == "trace,observe,calibrate,quantize,verify"
    assert "inject-offsets" in recipes["odm-v1"].pipeline_spec
    assert "wcc" in recipes["odm-v2"].pipeline_spec


def test_identity_offsets_leave_the_v1_start_equal_to_qats(tool, tiny_sr, calib):
    import fxquant

    recipes = tool.comparison_recipes(4)
    qat = fxquant.compile(tiny_sr, recipes["qat"], calib=calib)
    v1 = fxquant.compile(tiny_sr, recipes["odm-v1"], calib=calib)
    x = calib[:2]
    with torch.no_grad():
        torch.testing.assert_close(v1(x), qat(x), rtol=0, atol=1e-6)


def test_a_two_step_comparison_writes_its_table(tool, data, tmp_path):
    md = tmp_path / "odm.md"
    md.write_text("# ODM\n\n## Other\n\nkept\n")
    argv = ["--out", str(tmp_path / "runs"), "--models", "fsrcnn", "--bits", "4",
            "--methods", "qat,odm-v2", "--steps", "2", "--batch-size", "2", "--patch", "16",
            "--device", "cpu", "--eval-sets", "Set5", "--eval-limit", "1",
            "--json", str(tmp_path / "rows.json"), "--write", str(md)]
    assert tool.main(argv) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["method"], r["bits"]) for r in rows] == [("qat", 4), ("odm-v2", 4)]
    assert all(r["quant"]["Set5"] < r["fp"]["Set5"] for r in rows)
    text = md.read_text()
    assert "## Other\n\nkept" in text and "| fsrcnn ×4 | W4A4 | odm-v2 |" in text
    assert (tmp_path / "runs" / "recipes" / "odm-v2-w4a4-common.toml").exists()


def test_an_unknown_method_is_named(tool, tmp_path, capsys):
    assert tool.main(["--out", str(tmp_path), "--methods", "qat,odm-v3"]) == 2
    assert "unknown method(s) odm-v3; valid: qat, odm-v1, odm-v2" in capsys.readouterr().err
