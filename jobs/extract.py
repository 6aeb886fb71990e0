"""Ray job entry point: `ray job submit -- python jobs/extract.py INPUT OUTPUT [options]`."""

import sys

from bottleneck.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
