"""The driver's memory for a listing of many images: what holding the shard plan costs.

    python -m bottleneck.tools.bench_listing --paths 1000000

Builds a synthetic bucket listing (keys like `images/class042/img-0123456.jpg`, as
`fs.find` returns them), then turns it into entries, a listing fingerprint and a shard plan,
exactly as `bottleneck extract` does, and prints the resident memory each step adds.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import psutil

from ..runner.planning import listing_digest, make_entries, plan_shards


def rss() -> int:
    return psutil.Process().memory_info().rss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=256)
    a = p.parse_args(argv)
    gc.collect()
    base = rss()
    t0 = time.perf_counter()
    root = "my-bucket/images"
    keys = [f"{root}/class{i % 1000:03d}/img-{i:07d}.jpg" for i in range(a.paths)]
    after_keys = rss()
    entries = make_entries(root, keys, lambda k: "s3://" + k)
    del keys
    gc.collect()
    after_entries = rss()
    digest = listing_digest(entries)
    shards = plan_shards(entries, a.shard_size)
    del entries
    gc.collect()
    after_plan = rss()
    mib = 2**20
    print(f"{a.paths} paths, {len(shards)} shards of {a.shard_size}, digest {digest[:12]}…, "
          f"{time.perf_counter() - t0:.1f}s")
    print(f"raw listing (what fs.find returns): {(after_keys - base) / mib:.0f} MiB")
    print(f"entries (path, URL, label):          {(after_entries - base) / mib:.0f} MiB")
    print(f"the shard plan the driver keeps:     {(after_plan - base) / mib:.0f} MiB "
          f"({(after_plan - base) / a.paths:.0f} bytes per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
