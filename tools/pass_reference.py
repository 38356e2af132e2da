"""Regenerate docs/passes.md from the registered passes: python tools/pass_reference.py"""

from pathlib import Path

from fxquant.files import atomic_write_text
from fxquant.reference import pass_reference

if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "docs" / "passes.md"
    atomic_write_text(out, pass_reference(), "pass reference")
    print(f"wrote {out}")
