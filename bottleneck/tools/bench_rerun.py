"""A finished extract job run again: the requests it sends to INPUT, and its time.

    python -m bottleneck.tools.bench_rerun                 # 20,000 keys in 100 class folders
    python -m bottleneck.tools.bench_rerun --keys 2000 --json out.json

Made: `--keys` copies of one small JPEG (64×48) in 100 class folders, uploaded to moto's S3
server on 127.0.0.1, which counts each request as it arrives (`bench_inputs.start_store`).
Run twice by `bench_inputs.run_extract`: a real `bottleneck extract` at 32 px (random
weights), each in a fresh process, OUTPUT on local disk. The second run finds the plan and
every shard committed in OUTPUT. Printed: each run's whole-command time, the job's own time,
and the requests to INPUT by kind (LIST, GET, HEAD, other).

Mocked: only the network distance, as in `bench_inputs`.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .bench_inputs import LAYOUTS, run_extract, start_store, upload
from .formats import Photo, write_loose


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, "JPEG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=20_000, help="images (default: 20,000)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    a = p.parse_args(argv)
    if a.keys < 1:
        p.error("--keys must be at least 1")
    data = tiny_jpeg()
    server, endpoint, counter = start_store()
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-rerun-") as tmp:
            work = Path(tmp)
            write_loose([Photo(f"{i:09d}", data, f"class{i % 100:03d}") for i in range(a.keys)],
                        work / "layouts" / LAYOUTS["loose"])
            upload(endpoint, work / "layouts")
            print(f"{a.keys:,} JPEGs in 100 class folders on moto S3 at {endpoint}", flush=True)
            for name in ("first run", "rerun"):
                r = run_extract("loose", endpoint, counter, work, image_size=32)
                runs.append({"run": name, **r})
                requests = " ".join(f"{k} {v}" for k, v in r["requests"].items())
                print(f"{name:<9} {r['wall_s']:6.1f}s whole command (job {r['job_s']}s, "
                      f"{r['rows']} rows); requests to INPUT: {requests}", flush=True)
    finally:
        server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps({"keys": a.keys, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
