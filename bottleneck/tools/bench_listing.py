"""Listing at scale: the parallel listing against one chain of requests, the first committed
shard, and the driver's memory, on a store that answers each request after a fixed delay.

    python -m bottleneck.tools.bench_listing                  # 1M keys, 30 ms a request
    python -m bottleneck.tools.bench_listing --keys 1000000 --job-keys 1000 1000000 4000000

The store is `KeyStore` over computed keys (no memory per key), answering ListObjectsV2 as
S3 does (Prefix, StartAfter, Delimiter, 1,000 keys a page), with `--delay` seconds of sleep
before each answer: a bucket of millions of keys with S3's round trip cannot be made on this
machine (moto holds every key in Python and answers one request at a time). Everything
else is the product's code: `BucketLister` for the listing, and for the job figures the real
runner, plan, Ray actors and extractor, reading real JPEGs for the first shards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ComputedKeys(Sequence):
    """`n` sorted keys computed from their index: 100 class folders, or one flat prefix."""

    def __init__(self, n: int, layout: str, folders: int = 100):
        self.n, self.layout, self.folders = n, layout, folders
        self.per = -(-n // folders)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.layout == "flat":
            return f"img-{i:08d}.jpg"
        return f"class{i // self.per:03d}/img-{i:08d}.jpg"


def sequential(list_page: Any) -> tuple[int, int]:
    """One chain of requests, each starting after the last key: what a paginator (and
    fsspec's find) does. Returns (keys, requests)."""
    keys = requests = 0
    start = None
    while True:
        page = list_page("", start, None)
        requests += 1
        keys += len(page.keys)
        if not page.truncated or not page.keys:
            return keys, requests
        start = page.keys[-1]


def bench_listing(n: int, layout: str, delay: float, requests: int) -> dict[str, Any]:
    from ..inputs.bucket_listing import BucketLister, KeyStore, timed

    # The keys in a list: the store's own work must not weigh on the lister, in this process.
    store = KeyStore(ComputedKeys(n, layout)[0:n], presorted=True)
    t = time.perf_counter()
    seq_keys, seq_requests = sequential(timed(store, delay))
    seq_s = time.perf_counter() - t
    lister = BucketLister(timed(store, delay), "", requests)
    t = time.perf_counter()
    par_keys = sum(len(p) for p in lister.pages())
    par_s = time.perf_counter() - t
    assert par_keys == seq_keys == n, (par_keys, seq_keys, n)
    return {"layout": layout, "keys": n, "delay_s": delay, "requests_in_flight": requests,
            "sequential_s": round(seq_s, 2), "sequential_requests": seq_requests,
            "parallel_s": round(par_s, 2), "parallel_requests": lister.requests,
            "speedup": round(seq_s / par_s, 1)}


def write_list_file(n: int, workdir: str) -> str:
    """A Parquet list file of `n` rows (path, label), in row groups as pandas writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(Path(workdir) / "list.parquet")
    keys = ComputedKeys(n, "folders")
    with pq.ParquetWriter(path, pa.schema([("path", pa.string()), ("label", pa.string())])) as w:
        for start in range(0, n, 100_000):
            rel = keys[start:min(n, start + 100_000)]
            w.write_table(pa.table({"path": [f"images/{k}" for k in rel],
                                    "label": [k.split("/", 1)[0] for k in rel]}))
    return path


def job_figures(n: int, delay: float, requests: int, workdir: str, list_file: bool = False
                ) -> dict[str, Any]:
    """In this process (run it in a fresh one: peak RSS is per process): a real extract job
    over `n` keys (or `n` rows of a list file), stopped once the listing is done and a shard
    is committed."""
    from ..runner.memory import configure_driver

    configure_driver()  # as `bottleneck extract` does: before anything imports pyarrow
    from PIL import Image

    from ..extraction.job import ExtractOptions, check_extract, extract_job
    from ..inputs.bucket_listing import KeyStore, timed
    from ..inputs.listing import FolderSource
    from ..runner.job import run_options, run_sharded
    from ..storage import Storage
    images = Path(workdir) / "images"
    keys = ComputedKeys(n, "folders")
    first = images / keys[0]
    first.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 48), (120, 30, 200)).save(first)
    for i in range(1, min(n, 512)):  # the first shards' files; the rest are never read
        (images / keys[i]).parent.mkdir(parents=True, exist_ok=True)
        os.link(first, images / keys[i])
    source = str(Path(workdir) / "list.parquet") if list_file else str(images)
    o = ExtractOptions(input=source, output=str(Path(workdir) / "out"), weights="random",
                       image_size=32, shard_size=256, actors=1, progress=False)
    c = check_extract(o)
    if not list_file:
        c.source = FolderSource(Storage(str(images)), requests,
                                list_page=timed(KeyStore(keys, presorted=True), delay))
    job = extract_job(c)
    t0 = time.perf_counter()
    seen: dict[str, float] = {}
    feed_done = job.source.stats

    class Enough(Exception):
        pass

    def on_result(result: Any) -> None:
        seen.setdefault("first_commit_s", time.perf_counter() - t0)
        if Path(o.output, "_plan", "_listed.json").exists():
            raise Enough

    try:
        run_sharded(job, run_options(o), on_result=on_result)
    except Enough:
        pass
    listed = json.loads(Path(o.output, "_plan", "_listed.json").read_text())
    return {"keys": n, "input": "list file" if list_file else "bucket",
            "first_commit_s": round(seen["first_commit_s"], 2),
            "listing_s": listed["seconds"], "listing_requests": feed_done.requests,
            "plan_chunks": len(list(Path(o.output, "_plan").glob("chunk-*.parquet"))),
            "driver_peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> int:
    """This process' peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss
    keeps the forking parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=1_000_000, help="keys listed (default: 1M)")
    p.add_argument("--delay", type=float, default=0.030,
                   help="seconds before each answer (default: 0.030, S3 from EC2)")
    p.add_argument("--requests", type=int, default=64, help="requests in flight (default: 64)")
    p.add_argument("--job-keys", type=int, nargs="*",
                   default=[1000, 1_000_000, 4_000_000, 8_000_000],
                   help="sizes of the job runs (default: 1k, 1M, 4M, 8M); none to skip them")
    p.add_argument("--list-file-rows", type=int, nargs="*", default=[1_000_000],
                   help="also run the job on a Parquet list file of this many rows "
                        "(default: 1M); none to skip")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    p.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # child process
    p.add_argument("--list-file", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.job is not None:
        print(json.dumps(job_figures(a.job, a.delay, a.requests, a.workdir, a.list_file)))
        return 0
    out: dict[str, Any] = {"listing": [], "jobs": []}
    for layout in ("folders", "flat"):
        r = bench_listing(a.keys, layout, a.delay, a.requests)
        out["listing"].append(r)
        print(f"listing {r['keys']:,} keys ({layout}), {a.delay * 1000:.0f} ms a request: "
              f"one chain {r['sequential_s']}s / {r['sequential_requests']} requests; "
              f"parallel {r['parallel_s']}s / {r['parallel_requests']} requests "
              f"({a.requests} in flight): {r['speedup']}x", flush=True)
    runs = [(n, False) for n in a.job_keys] + [(n, True) for n in a.list_file_rows]
    for n, list_file in runs:
        with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
            if list_file:
                write_list_file(n, tmp)
            proc = subprocess.run([sys.executable, "-m", "bottleneck.tools.bench_listing",
                                   "--job", str(n), "--delay", str(a.delay),
                                   "--requests", str(a.requests), "--workdir", tmp,
                                   *(["--list-file"] if list_file else [])],
                                  capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        out["jobs"].append(r)
        print(f"job over {n:,} {'list file rows' if list_file else 'keys'}: first shard "
              f"committed after {r['first_commit_s']}s; listing {r['listing_s']}s "
              f"({r['listing_requests']} requests, {r['plan_chunks']} plan chunks); "
              f"driver peak RSS {r['driver_peak_rss_mb']} MB", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
