"""Ray job entry point: `ray job submit -- python jobs/evaluate.py ...` runs
`bottleneck evaluate ...`."""

import sys

from bottleneck.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
