"""tools/train_layout.py: the table of NCHW against channels-last training steps."""

from __future__ import annotations

import argparse


def test_the_table_gives_medians_and_the_median_per_round_ratio(load_tool):
    tool = load_tool("train_layout")
    args = argparse.Namespace(scale=4, recipe="i2nq-w4a4", batch=8, rounds=3)
    text = tool.render({"pan": {"nchw": [2.0, 1.8, 3.0], "channels_last": [1.0, 1.2, 1.0]}},
                       args, "python tools/train_layout.py --models pan")
    assert text.startswith(tool.SECTION + "\n\n`python tools/train_layout.py --models pan`")
    # medians 2.0 and 1.0; per-round ratios 2.0, 1.5, 3.0 → median 2.0, min 1.5, max 3.0
    assert "| pan | 2.000 | 1.000 | 2.00× (1.50–3.00) |" in text


def test_bad_counts_are_refused_by_name(load_tool, capsys):
    tool = load_tool("train_layout")
    assert tool.main(["--rounds", "0"]) == 2
    assert "--rounds and --batch must be >= 1" in capsys.readouterr().err
