"""Regenerate docs/passes.md from the registered passes: python tools/pass_reference.py"""

from pathlib import Path

from fxquant.reference import pass_reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "passes.md"
    out.write_text(pass_reference())
    print(f"wrote {out}")
