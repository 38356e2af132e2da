"""The benchmark of ``fxquant bench`` as a script: ``python tools/bench.py [options]``
(the same options; see ``fxquant bench --help``)."""

import sys

from fxquant.bench import build_parser, run

if __name__ == "__main__":
    args = build_parser().parse_args()
    args.argv = sys.argv[1:]
    sys.exit(run(args))
