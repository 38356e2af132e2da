"""tools/train_heap.py: the table of training steps with freed blocks kept on the heap and
with glibc's thresholds."""

from __future__ import annotations

import argparse


def run(step, user, sys_, minflt):
    return {"step_s": step, "user_s": user, "sys_s": sys_, "minflt": minflt}


def test_the_table_gives_medians_and_the_median_per_round_ratio(load_tool):
    tool = load_tool("train_heap")
    args = argparse.Namespace(compiled="/runs/imdn.fxq", steps=12, batch=16, patch=48, rounds=3,
                              warmup=2)
    runs = {"kept": [run(1.0, 80, 6, 400_000), run(2.0, 82, 7, 500_000), run(1.0, 81, 5, 450_000)],
            "off": [run(1.5, 85, 25, 3_000_000), run(2.0, 84, 27, 2_800_000),
                    run(3.0, 86, 24, 2_900_000)]}
    text = tool.render(runs, args, "python tools/train_heap.py --compiled /runs/imdn.fxq")
    assert text.startswith(tool.SECTION + "\n\n`python tools/train_heap.py --compiled /runs/imdn.fxq`")
    assert "from `imdn.fxq`, 12 steps of 16 patches of 48²" in text
    assert "| freed blocks kept on the heap (default) | 1.000 | 81.0 | 6.0 | 450,000 |" in text
    assert "| glibc's thresholds (`FXQUANT_KEEP_HEAP=0`) | 2.000 | 85.0 | 25.0 | 2,900,000 |" in text
    # per-round ratios 1.5, 1.0, 3.0 → median 1.5, min 1.0, max 3.0
    assert "Off / kept per step: 1.50× (1.00–3.00 over rounds)." in text


def test_bad_arguments_are_refused_by_name(load_tool, capsys, tmp_path):
    tool = load_tool("train_heap")
    assert tool.main(["--compiled", str(tmp_path / "missing.fxq")]) == 2
    assert "missing.fxq: no such file" in capsys.readouterr().err
    assert tool.main(["--compiled", str(tmp_path / "missing.fxq"), "--steps", "3"]) == 2
    assert "--steps at least --warmup + 3" in capsys.readouterr().err
