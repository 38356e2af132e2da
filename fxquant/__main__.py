"""``python -m fxquant``: the same command line as the ``fxquant`` script."""

import sys

from fxquant.cli import main

sys.exit(main())
