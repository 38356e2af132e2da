"""Every tools/ script runs its main() through fxquant.cli_args.run_tool: a library error
(a misspelt model or recipe) is one line on stderr and exit status 2, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fxquant.cli_args import run_tool
from fxquant.errors import FxquantError

TOOLS = Path(__file__).resolve().parents[2] / "tools"
ENTRY = 'if __name__ == "__main__":\n    from fxquant.cli_args import run_tool\n\n    run_tool(main)\n'
# scripts with another entry: the fxquant CLI itself, the bench CLI, and a docs generator
OTHER_ENTRY = {"report.py", "bench.py", "pass_reference.py", "daq_bench_planes.py"}


@pytest.mark.parametrize("status, expected", [(0, 0), (None, 0), (3, 3)])
def test_the_status_of_main_is_the_exit_status(status, expected):
    with pytest.raises(SystemExit) as exit_:
        run_tool(lambda: status)
    assert (exit_.value.code or 0) == expected


def test_a_library_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tools/some_tool.py"])

    def main():
        raise FxquantError("unknown model 'nope'; available: imdn")

    with pytest.raises(SystemExit) as exit_:
        run_tool(main)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "some_tool: error: unknown model 'nope'; available: imdn\n"


def test_every_tool_with_a_main_uses_it():
    missing = [p.name for p in sorted(TOOLS.glob("*.py"))
               if p.name not in OTHER_ENTRY and ENTRY not in p.read_text()]
    assert missing == []


def test_a_misspelt_model_in_a_real_tool_is_named_without_a_traceback():
    proc = subprocess.run([sys.executable, str(TOOLS / "lower_check.py"), "--models", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lower_check: error: unknown model 'nope'")
    assert "Traceback" not in proc.stderr
