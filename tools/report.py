"""The HTML report, as ``fxquant report`` (same options):

    python tools/report.py --model imdn --scale 4 --recipe minmax-w4a4 --datasets Set5 \
        --out /tmp/imdn_x4_w4a4.html
    python tools/report.py --compiled m.fxq --limit 2 --out /tmp/m.html

Set OMP_NUM_THREADS=1 on a busy 2-core machine.
"""

import sys

from fxquant.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
