"""tools/bit_widths.py: the recipe's widths per conv and their multiply-adds."""

from __future__ import annotations

import pytest

import fxquant

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pan_x4_tail_macs_are_its_six_upsampling_convs(load_tool):
    """PAN ×4 at 48×48: the tail convs run at 96² (upconv1 40→24 3×3, att1 1×1, HRconv1 3×3)
    and 192² (upconv2, att2, HRconv2), 24 output channels each."""
    tool = load_tool("bit_widths")
    totals = tool.mac_shares("pan", 4, fxquant.load_preset("i2nq-w4a4-tail8-recon-256"), 48)
    at_2x, at_4x = 96 * 96 * 24, 192 * 192 * 24
    tail = at_2x * (40 * 9 + 24 + 24 * 9) + at_4x * (24 * 9 + 24 + 24 * 9)
    assert totals["8"] == (6, tail)
    assert totals["4"][0] == 113 and totals["float"][0] == 2
    plain = tool.mac_shares("pan", 4, fxquant.load_preset("i2nq-w4a4-recon-256"), 48)
    assert "8" not in plain and plain["4"] == (119, totals["4"][1] + tail)


def test_an_unknown_model_is_named_without_a_traceback():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "bit_widths.py"
    proc = subprocess.run([sys.executable, str(tool), "--models", "pann", "--recipe", "mse-w4a4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("bit_widths: error: unknown model 'pann'")
    assert proc.stdout == ""
