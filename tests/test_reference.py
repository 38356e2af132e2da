"""docs/passes.md is generated from the passes; it must match the code."""

from pathlib import Path

from fxquant.reference import pass_reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "passes.md"


def test_pass_reference_is_up_to_date():
    assert DOC.read_text() == pass_reference(), \
        "docs/passes.md is stale: run python tools/pass_reference.py"


def test_every_pass_documents_its_graph_change():
    text = pass_reference()
    for name in ("trace", "observe", "calibrate", "quantize", "verify"):
        assert f"## `{name}`" in text
    assert "Before::" in text and "After::" in text
