"""Ray job entry point: `ray job submit -- python jobs/train_head.py ...` runs
`bottleneck train ...`."""

import sys

from bottleneck.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
