"""Ray job entry point: `ray job submit -- python jobs/benchmark.py ...` runs
`bottleneck benchmark ...`."""

import sys

from bottleneck.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
