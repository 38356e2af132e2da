"""Replacing one ``## section`` of a Markdown document, atomically (write, then rename), and
the command line a tool's section quotes."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Sequence

from fxquant.files import atomic_write_text


def write_section(path: str | os.PathLike, heading: str, text: str, *,
                  preamble: str = "") -> None:
    """Replace the section that starts with the line ``heading`` (up to the next ``## ``
    heading) by ``text``, or append it; the other sections are kept as they are. A file that
    does not exist yet starts with ``preamble``."""
    path = Path(path)
    old = path.read_text() if path.exists() else preamble
    start = old.find(heading + "\n")
    if start >= 0:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else "")
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + text.rstrip("\n") + "\n"
    atomic_write_text(path, new, "Markdown file")


def tool_command(script: str, argv: Sequence[str] | None = None) -> str:
    """``python tools/<script> <arguments>``, shell-quoted: the command a section written by a
    tool in tools/ records (``argv`` as given to its ``main``, default the process's)."""
    args = list(argv if argv is not None else sys.argv[1:])
    return " ".join(["python", f"tools/{script}", *([shlex.join(args)] if args else [])])
