"""tools/train_layout.py: the table of NCHW against channels-last training steps."""

from __future__ import annotations

import argparse

import torch


def test_the_table_gives_medians_and_the_median_per_round_ratio(load_tool):
    tool = load_tool("train_layout")
    args = argparse.Namespace(scale=4, recipe="i2nq-w4a4", batch=8, rounds=3)
    text = tool.render({"pan": {"NCHW": [2.0, 1.8, 3.0], "channels-last": [1.0, 1.2, 1.0]}},
                       args, "python tools/train_layout.py --models pan")
    assert text.startswith(tool.SECTIONS["layout"]
                           + "\n\n`python tools/train_layout.py --models pan`")
    # medians 2.0 and 1.0; per-round ratios 2.0, 1.5, 3.0 → median 2.0, min 1.5, max 3.0
    assert "| pan | 2.000 | 1.000 | 2.00× (1.50–3.00) |" in text


def test_bad_counts_are_refused_by_name(load_tool, capsys):
    tool = load_tool("train_layout")
    assert tool.main(["--rounds", "0"]) == 2
    assert "--rounds and --batch must be >= 1" in capsys.readouterr().err


def test_the_gradient_comparison_has_its_own_section_and_columns(load_tool):
    tool = load_tool("train_layout")
    args = argparse.Namespace(scale=4, recipe="i2nq-w4a4", batch=8, rounds=2, compare="gradient")
    text = tool.render({"imdn": {"arithmetic STE": [1.5, 1.2], "autograd function": [1.0, 1.0]}},
                       args, "python tools/train_layout.py --compare gradient")
    assert text.startswith(tool.SECTIONS["gradient"])
    assert tool.SECTIONS["gradient"] != tool.SECTIONS["layout"]  # --write keeps both sections
    assert "| imdn | 1.350 | 1.000 | 1.35× (1.20–1.50) |" in text


def test_the_baseline_form_is_the_arithmetic_straight_through_estimator(load_tool):
    """The baseline the tool times is what the quantizer computed before: q forward, the
    gradient passed to x inside [lo, hi] only."""
    tool = load_tool("train_layout")
    x = torch.tensor([-2.0, -1.0, 0.5, 1.0, 2.0], requires_grad=True)
    q = torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0], requires_grad=True)
    out = tool.arithmetic_straight_through(x, q, torch.tensor(-1.0), torch.tensor(1.0))
    out.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert torch.equal(out.detach(), q.detach())
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    assert q.grad.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
