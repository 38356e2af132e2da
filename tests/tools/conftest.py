"""Tests of the scripts in tools/, which are files, not an installed package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture(scope="session")
def load_tool():
    """``load_tool("bench_daq")``: tools/bench_daq.py imported as a module."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def argparse_error(load_tool, capsys):
    """``argparse_error("forward_faults", argv)``: the tool's ``main(argv)`` exits with
    argparse's status 2; returns what it printed to stderr."""

    def run(name: str, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            load_tool(name).main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    return run
