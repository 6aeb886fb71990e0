"""Training memory and throughput on a large synthetic feature set.

    python -m bottleneck.tools.bench_train --gigabytes 3      # prints peak RSS and rows/s

Writes a feature dataset of the requested size (7×7×512 float32 rows, ReLU-like sparse
values, 10 classes, real bottleneck metadata), then trains the head over it in a child
process while sampling the resident memory of that process and its children.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..runner.planning import Entry, Shard
from ..schema import DatasetMetadata, FeatureSettings, feature_schema
from ..storage import Storage


def write_synthetic_features(root: str, rows: int, image_size: int = 224, classes: int = 10,
                             shard_rows: int = 256, seed: int = 0) -> int:
    """A feature dataset of `rows` rows whose class shifts the mean of a few features."""
    from ..extraction.writer import ShardWriter

    settings = FeatureSettings(weights="random:0", image_size=image_size)
    labels = [f"class{c}" for c in range(classes)]
    schema = feature_schema(DatasetMetadata(settings, labels))
    out = Storage(root)
    out.makedirs()
    rng = np.random.default_rng(seed)
    size = settings.size
    written = 0
    for index, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        paths = [f"/synthetic/{start + i}.jpg" for i in range(n)]
        shard = Shard(index, tuple(Entry(p, p, labels[(start + i) % classes])
                                   for i, p in enumerate(paths)))
        with ShardWriter(out, schema, index) as w:
            for b in range(0, n, 32):
                part = shard.entries[b:b + 32]
                x = np.maximum(rng.standard_normal((len(part), size), dtype=np.float32), 0)
                y = [labels.index(e.label) for e in part]
                for j, c in enumerate(y):
                    x[j, c * 64:(c + 1) * 64] += 1.0
                w.write_batch([e.url for e in part], [e.label for e in part], x)
        written += n
    return written


def peak_rss_of(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, float, str]:
    """Run cmd; return (peak RSS in bytes of it and its children, seconds, stdout)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [ps, *ps.children(recursive=True)]
            peak = max(peak, max(p.memory_info().rss for p in procs))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited {proc.returncode}")
    return peak, time.perf_counter() - t0, out


def train_in_child(features: str, model_dir: str, epochs: int = 1, batch_size: int = 64,
                   shuffle_buffer: int = 256) -> tuple[int, dict]:
    """Train in a fresh process; returns (peak RSS bytes, metrics)."""
    code = (
        "import json, sys\n"
        "from bottleneck.training import HeadConfig, TrainOptions, train_head\n"
        f"m = train_head(TrainOptions({features!r}, {model_dir!r}, validation_split=0.1, "
        f"shuffle_buffer={shuffle_buffer}, head=HeadConfig(epochs={epochs}, "
        f"batch_size={batch_size}), verbose=0))\n"
        "print(json.dumps(m))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    peak, _, out = peak_rss_of([sys.executable, "-c", code], env)
    return peak, json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gigabytes", type=float, default=3.0, help="feature set size (default: 3)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workdir", default=None, help="(default: a temporary folder)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        rows = int(a.gigabytes * 1e9 / (25088 * 4))
        t = time.perf_counter()
        write_synthetic_features(f"{tmp}/features", rows)
        size = sum(f.stat().st_size for f in Path(tmp, "features").glob("part-*.parquet"))
        print(f"wrote {rows} rows, {size / 1e9:.2f} GB of Parquet, {rows * 25088 * 4 / 1e9:.2f} GB "
              f"of float32 features, in {time.perf_counter() - t:.0f}s", flush=True)
        peak, m = train_in_child(f"{tmp}/features", f"{tmp}/model", epochs=a.epochs)
        print(f"training: peak RSS {peak / 2**20:.0f} MiB; {m['train_rows_per_second']} rows/s "
              f"({m['train_rows']} rows x {m['epochs']} epoch(s) in {m['fit_seconds']}s); "
              f"val_accuracy {m['val_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
