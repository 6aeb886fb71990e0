"""Ray job entry point: `ray job submit -- python jobs/predict.py ...` runs
`bottleneck predict ...`."""

import sys

from bottleneck.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
