"""The three kinds of image INPUT side by side: the same photos as loose JPEGs in class
folders, as img2dataset WebDataset tars, and as a Hugging Face Parquet table, each read
from an S3 bucket by a real `bottleneck extract`.

    python -m bottleneck.tools.bench_inputs                  # 1,024 photos, 224 px
    python -m bottleneck.tools.bench_inputs --photos 64 --image-size 32 --json out.json

Made: N JPEGs cut from scikit-learn's sample photographs (`demo_data.write_photos`), stored
by `formats.write_loose`, `write_tars` and `write_hf_parquet`, and uploaded to one bucket.

Measured, per layout, in a fresh child process running the CLI's own `main` (`bottleneck
extract s3://… OUTPUT --weights random --address local`, OUTPUT on local disk):
- wall time of the whole command (Python start, private Ray, model, listing, every shard),
  and photos over it; the job's own time and rows from the summary it prints;
- requests to the INPUT bucket, by kind (LIST, GET, HEAD, other; and any answer not 2xx),
  counted where they arrive: a `logging.Handler` on the `werkzeug` logger, to which moto's
  server writes one line per answered request (the line has no size: bytes are not counted);
- driver peak RSS: the child's VmHWM, read by the child itself as `main` returns;
- worker peak RSS: the largest VmHWM among the child's descendant processes whose command
  line starts `ray::` (Ray's actors and workers), read from /proc every 0.1 s while the
  command runs (VmHWM is a high-water mark: a sample misses only growth in the last
  0.1 s of a worker's life), with the actor class that held it.

Mocked: only the network distance. The store is moto's S3 server on 127.0.0.1, in this
process; everything else (s3fs, listing, plan, Ray actors, decode, VGG16) is the product's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .bench_listing import peak_rss_mb
from .formats import Photo, write_hf_parquet, write_loose, write_tars

BUCKET, KEY_ID, SECRET = "bench-inputs", "AKIABENCHINPUTS", "bench-secret-not-a-real-one"
LAYOUTS = {"loose": "loose", "webdataset": "tars", "parquet": "table/train.parquet"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def make_photos(n: int, folder: Path) -> list[Photo]:
    """`n` photo JPEGs as `Photo`s: label their class folder, key their zero-padded index."""
    from .demo_data import write_photos

    write_photos(folder, n)
    files = sorted(folder.glob("*/*.jpg"), key=lambda p: p.name)
    return [Photo(f"{i:09d}", f.read_bytes(), f.parent.name) for i, f in enumerate(files)]


def write_layouts(photos: list[Photo], root: Path, tars: int) -> None:
    import datasets

    datasets.disable_progress_bars()
    write_loose(photos, root / LAYOUTS["loose"])
    write_tars(photos, root / LAYOUTS["webdataset"], tars=tars)
    write_hf_parquet(photos, root / LAYOUTS["parquet"])


class RequestCounter(logging.Handler):
    """Counts the requests moto's server answers, by bucket and kind, from werkzeug's
    request lines ('"GET /bucket/key?query HTTP/1.1" 200 1234')."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[tuple[str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.args, tuple) or len(record.args) != 3:
            return  # not a request line
        line, code = (_ANSI.sub("", str(a)) for a in record.args[:2])
        method, _, rest = line.partition(" ")
        target = urlsplit(rest.rsplit(" ", 1)[0])
        bucket, _, key = target.path.lstrip("/").partition("/")
        listing = not key and re.fullmatch(r"|.*(list-type|prefix)=.*", target.query)
        kind = ("LIST" if method == "GET" and listing
                else method if method in ("GET", "HEAD") and key else "other")
        self.counts[bucket, kind] += 1
        if not code.startswith("2"):
            self.counts[bucket, f"status {code}"] += 1

    def take(self, bucket: str) -> dict[str, int]:
        """This bucket's counts since the last take, then forgets them."""
        with self.lock:  # emit runs under it, in the server's threads
            out = {k: n for (b, k), n in self.counts.items() if b == bucket}
            self.counts.clear()
        return {k: out.get(k, 0) for k in ("LIST", "GET", "HEAD", "other")} | out


def start_store() -> tuple[Any, str, RequestCounter]:
    """moto's S3 server on a free local port, with the counter on its request log."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    counter = RequestCounter()
    log = logging.getLogger("werkzeug")
    log.setLevel(logging.INFO)
    log.propagate = False  # counted, not printed
    log.addHandler(counter)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}", counter


def upload(endpoint: str, root: Path) -> None:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET, region_name="us-east-1",
                          config=Config(max_pool_connections=16))
    client.create_bucket(Bucket=BUCKET)
    files = [p for p in root.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda p: client.upload_file(str(p), BUCKET, p.relative_to(root).as_posix()),
                    files))


class RayPeaks(threading.Thread):
    """The largest VmHWM of `ray::` processes below `pid`, by actor class, until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peaks_kb = pid, Counter[str]()
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.wait(0.1):
            try:
                below = psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                continue
            for p in below:
                try:
                    title = " ".join(p.cmdline())
                    if title.startswith("ray::"):
                        name = title[5:].split()[0].split(".")[0]
                        self.peaks_kb[name] = max(self.peaks_kb[name], vm_hwm_kb(p.pid))
                except (psutil.Error, OSError):
                    continue  # gone meanwhile

    def stop(self) -> tuple[int, str]:
        """(peak MB, the actor class that reached it)."""
        self.done.set()
        self.join()
        name, kb = (self.peaks_kb.most_common(1) or [("", 0)])[0]
        return round(kb / 1024), name


def vm_hwm_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def run_extract(layout: str, endpoint: str, counter: RequestCounter, work: Path,
                image_size: int) -> dict[str, Any]:
    options = {"endpoint_url": endpoint, "key": KEY_ID, "secret": SECRET,
               "client_kwargs": {"region_name": "us-east-1"}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    ray_tmp = tempfile.mkdtemp(prefix="bi", dir="/tmp")  # short: Ray's socket paths
    env.update(RAY_TMPDIR=ray_tmp, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=str(work / "none"), AWS_SHARED_CREDENTIALS_FILE=str(work / "none"))
    peak_file = work / f"{layout}-driver.json"
    cmd = [sys.executable, "-m", "bottleneck.tools.bench_inputs", "--child", str(peak_file),
           "extract", f"s3://{BUCKET}/{LAYOUTS[layout]}", str(work / f"out-{layout}"),
           "--weights", "random", "--image-size", str(image_size), "--address", "local",
           "--no-progress", "--storage-options", json.dumps(options)]
    counter.take(BUCKET)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peaks = RayPeaks(proc.pid)
    peaks.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    worker_mb, worker = peaks.stop()
    requests = counter.take(BUCKET)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"{layout}: exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}")
    rows = re.search(r"(\d+) rows written, (\d+) unreadable", out)
    job = re.search(r"time:\s+([\d.]+)s", out)
    return {"layout": layout, "input": cmd[6], "wall_s": round(wall, 2),
            "rows": int(rows[1]) if rows else None, "errors": int(rows[2]) if rows else None,
            "job_s": float(job[1]) if job else None,
            "requests": requests, "driver_peak_rss_mb": json.loads(peak_file.read_text()),
            "worker_peak_rss_mb": worker_mb, "worker_peak_process": worker}


def child(peak_file: str, argv: list[str]) -> int:
    """The CLI in this process, then this process' peak RSS written to `peak_file`."""
    from ..cli import main as cli_main

    try:
        return cli_main(argv)
    finally:
        Path(peak_file).write_text(json.dumps(peak_rss_mb()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=1024, help="photos (default: 1,024)")
    p.add_argument("--tars", type=int, default=4, help="WebDataset tars (default: 4)")
    p.add_argument("--image-size", type=int, default=224, help="model input side (default: 224)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    a = p.parse_args(argv)
    server, endpoint, counter = start_store()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
            work = Path(tmp)
            photos = make_photos(a.photos, work / "jpeg")
            write_layouts(photos, work / "layouts", a.tars)
            upload(endpoint, work / "layouts")
            mb = sum(len(ph.data) for ph in photos) / 2**20
            print(f"{len(photos)} photos ({mb:.1f} MB of JPEG) at {a.image_size} px, "
                  f"from moto S3 on {endpoint}", flush=True)
            for layout in LAYOUTS:
                r = run_extract(layout, endpoint, counter, work, a.image_size)
                r["img_per_s"] = round(len(photos) / r["wall_s"], 1)
                results.append(r)
                requests = " ".join(f"{k} {v}" for k, v in r["requests"].items())
                print(f"{layout:<10} {r['wall_s']:6.1f}s whole command, {r['img_per_s']:6.1f}"
                      f" img/s (job {r['job_s']}s, {r['rows']} rows, {r['errors']} errors);"
                      f" input requests: {requests}; peak RSS: driver "
                      f"{r['driver_peak_rss_mb']} MB, worker {r['worker_peak_rss_mb']} MB "
                      f"({r['worker_peak_process']})", flush=True)
    finally:
        server.stop()
    if a.json:
        Path(a.json).write_text(json.dumps({"photos": a.photos, "tars": a.tars,
                                            "image_size": a.image_size, "runs": results},
                                           indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
