"""Diff graph dumps: what a pass added, removed or changed.

    python tools/graph_diff.py dumps/01-observe.txt dumps/03-quantize.txt
    python tools/graph_diff.py dumps            # every pass against the one before it
    python tools/graph_diff.py a.txt b.txt --context   # also print unchanged nodes

Dumps are the node tables written by ``fxquant compile --dump-dir`` (or ``PassManager``
with ``dump_dir``, or ``tools/graph_dump.py --dump-dir``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fxquant.errors import FxquantError
from fxquant.graphdiff import diff_files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="two dump files, or one dump folder")
    parser.add_argument("--context", action="store_true", help="print unchanged nodes too")
    args = parser.parse_args(argv)
    if len(args.paths) == 1 and Path(args.paths[0]).is_dir():
        dumps = sorted(Path(args.paths[0]).glob("*.txt"))
        if len(dumps) < 2:
            parser.error(f"folder {args.paths[0]} holds {len(dumps)} graph dump(s) (*.txt); "
                         "diffing needs two or more (fxquant compile --dump-dir writes one "
                         "per pass)")
        pairs = list(zip(dumps, dumps[1:]))
    elif len(args.paths) == 2:
        pairs = [(Path(args.paths[0]), Path(args.paths[1]))]
    else:
        parser.error("give two dump files or one folder of dumps")
    try:
        diffs = [diff_files(a, b) for a, b in pairs]
    except FxquantError as exc:
        parser.error(str(exc))
    for diff in diffs:
        sys.stdout.write(diff.text(context=args.context))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
