"""`bottleneck benchmark`: how close `extract` comes to the machine's limit, and to Ray Data.

On the same images, in one run:
1. the limit: the conv base alone on tensors already in memory, in a Ray task with the
   same resources, threads and batch size as one of extract's actors;
2. the whole `bottleneck extract` command in a fresh process (Ray start included), and its
   steady state (images / time the actors spent on shards);
3. what a user would write instead: Ray Data read_images → map_batches (an actor holding
   the same conv base, the Keras model called on each batch, features returned as one
   array) → write_parquet, whole process.
It prints img/s for each and the ratios. The same command runs on CPUs and GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..images import DecodeOptions, decode_image


def conv_base_limit(weights: str, image_size: int, batch_size: int, threads: int | None,
                    seconds: float = 20.0, precision: str = "float32") -> float:
    """img/s of the conv base alone on in-memory batches (after one warm-up call)."""
    from ..model import BatchRunner, build_conv_base, configure_threads, resolve_weights

    configure_threads(threads)
    model = build_conv_base(resolve_weights(weights), image_size, precision=precision)
    run = BatchRunner(model, batch_size)
    x = np.random.default_rng(0).uniform(-120, 130, (batch_size, image_size, image_size, 3))
    x = x.astype(np.float32)
    run(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 2 * batch_size:
        run(x)
        n += batch_size
    return n / (time.perf_counter() - t0)


def decode_rate(paths: list[Path], image_size: int, jpeg_draft: bool = False) -> float:
    """img/s of read + decode + resize on one core (one thread)."""
    opts = DecodeOptions(image_size, jpeg_draft=jpeg_draft)
    t0 = time.perf_counter()
    for p in paths:
        decode_image(p.read_bytes(), opts)
    return len(paths) / (time.perf_counter() - t0)


RAY_DATA_SCRIPT = r'''
import sys, time, os
t0 = time.perf_counter()
import numpy as np, ray
src, dst, weights, size, batch, cpus, precision = sys.argv[1:8]
size, batch, cpus = int(size), int(batch), int(cpus)
ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")

class Vgg:
    """What a user writes: the Keras model called on each batch, features as an array."""
    def __init__(self):
        from bottleneck.model import build_conv_base, configure_threads, resolve_weights
        configure_threads(cpus)
        self.model = build_conv_base(resolve_weights(weights), size, precision=precision)
    def __call__(self, b):
        import keras
        x = keras.applications.vgg16.preprocess_input(b["image"].astype(np.float32))
        f = np.asarray(self.model.predict_on_batch(x), dtype=np.float32)
        return {"path": b["path"], "features": f.reshape(len(f), -1)}

ds = ray.data.read_images(src, size=(size, size), mode="RGB", include_paths=True)
# One actor with 1 CPU: Ray Data stalls when its actors reserve every CPU (no room to read).
ds = ds.map_batches(Vgg, batch_size=batch, concurrency=1, num_cpus=1)
ds.write_parquet(dst)
print("RAYDATA_SECONDS", time.perf_counter() - t0)
'''


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}… failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout + r.stderr


def run_benchmark(images: str | None, count: int = 1024, image_size: int = 224,
                  weights: str = "random", batch_size: int = 32, limit_seconds: float = 30.0,
                  ray_data: bool = True, workdir: str | None = None,
                  precision: str = "float32", decode_workers: int | None = None
                  ) -> dict[str, Any]:
    from ..runner.pool import choose_layout
    from .demo_data import sklearn_datasets, write_photos

    if images is None:
        sklearn_datasets()  # its photos: refuse now if it is missing

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    res: dict[str, Any] = {"precision": precision}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if images is None:
            images = f"{tmp}/images"
            write_photos(images, count)
        paths = sorted(Path(images).rglob("*.jpg")) + sorted(Path(images).rglob("*.png"))
        n = len(paths)
        res["images"] = n
        cpus = os.cpu_count() or 1
        layout = choose_layout(cpus, gpu_count(), decode_workers=decode_workers)
        res["layout"] = layout.describe()
        print(f"{n} images at {image_size} px; extract's layout here: {layout.describe()}",
              flush=True)

        # 1. The limit, with the same threads and device as one extract actor: measured
        # before and after the extract run, since a shared machine's speed drifts.
        res["limit_runs"] = [_limit(layout, weights, image_size, batch_size, limit_seconds,
                                    precision)]
        print(f"limit (conv base alone, {layout.actors} actor(s)): "
              f"{res['limit_runs'][0]:.2f} img/s", flush=True)

        # 2. The whole command, as a user runs it (a fresh process starts its own Ray).
        res.update(extract_command(images, f"{tmp}/out", n, weights, image_size, batch_size,
                                    precision, env, decode_workers))
        res["limit_runs"].append(_limit(layout, weights, image_size, batch_size, limit_seconds,
                                        precision))
        res["limit_img_s"] = sum(res["limit_runs"]) / len(res["limit_runs"])
        print(f"limit again: {res['limit_runs'][1]:.2f} img/s; mean {res['limit_img_s']:.2f}",
              flush=True)

        # 3. Ray Data, the pipeline a user would write instead.
        if ray_data:
            res["ray_data_img_s"] = _ray_data(images, tmp, n, weights, image_size, batch_size,
                                              cpus, precision, env)
        res["decode_img_s_per_core"] = decode_rate(paths[:200], image_size)
        res["decode_draft_img_s_per_core"] = decode_rate(paths[:200], image_size, jpeg_draft=True)
    lim = res["limit_img_s"]
    res["ratio_whole_to_limit"] = res["extract_img_s"] / lim
    if res.get("steady_img_s"):
        res["ratio_steady_to_limit"] = res["steady_img_s"] / lim
    if res.get("ray_data_img_s"):
        res["ratio_to_ray_data"] = res["extract_img_s"] / res["ray_data_img_s"]
    return res


def extract_command(images: str, out: str, n: int, weights: str, image_size: int,
                     batch_size: int, precision: str, env: dict[str, str],
                     decode_workers: int | None = None) -> dict[str, Any]:
    """`bottleneck extract` in a fresh process: whole-command and steady-state img/s."""
    cmd = [sys.executable, "-m", "bottleneck", "extract", images, out, "--weights", weights,
           "--image-size", str(image_size), "--batch-size", str(batch_size), "--address",
           "local", "--no-progress", "--precision", precision,
           "--decode-workers", "auto" if decode_workers is None else str(decode_workers)]
    secs, _ = _run(cmd, env)
    done = json.loads(Path(out, "_SUCCESS.json").read_text())
    steady = done.get("timing", {}).get("steady_img_per_s")
    part_bytes = sum(p.stat().st_size for p in Path(out).glob("part-*.parquet"))
    startup = done.get("timing", {}).get("startup_s", {})
    print(f"extract (whole command): {n / secs:.2f} img/s ({secs:.1f}s); "
          f"steady state {steady and f'{steady:.2f}'} img/s; start-up (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in startup.items()), flush=True)
    return {"extract_img_s": n / secs, "extract_seconds": secs, "steady_img_s": steady,
            "bytes_per_image": part_bytes / max(done["rows"], 1), "startup_s": startup}


def _ray_data(images: str, tmp: str, n: int, weights: str, image_size: int, batch_size: int,
              cpus: int, precision: str, env: dict[str, str]) -> float:
    """img/s of the Ray Data pipeline (RAY_DATA_SCRIPT), whole process."""
    script = Path(tmp, "raydata.py")
    script.write_text(RAY_DATA_SCRIPT)
    secs, _ = _run([sys.executable, str(script), images, f"{tmp}/raydata", weights,
                    str(image_size), str(batch_size), str(cpus), precision], env)
    print(f"Ray Data pipeline (whole process): {n / secs:.2f} img/s ({secs:.1f}s)", flush=True)
    return n / secs


def _limit(layout: Any, weights: str, image_size: int, batch_size: int, seconds: float,
           precision: str) -> float:
    """conv_base_limit in a Ray task with one extract actor's resources, × the actors."""
    from ..runner.pool import connect, disconnect, run_task

    connect("local")
    try:
        per_actor = run_task(conv_base_limit, weights, image_size, batch_size, layout.threads,
                             seconds, precision, num_cpus=layout.num_cpus,
                             num_gpus=layout.num_gpus)
    finally:
        disconnect()
    return per_actor * layout.actors


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        return 0


def format_results(r: dict[str, Any]) -> str:
    lines = [
        f"images                      {r['images']}",
        f"limit (conv base alone)     {r['limit_img_s']:8.2f} img/s   "
        f"(mean of {', '.join(f'{x:.2f}' for x in r['limit_runs'])}: before and after extract)",
        f"extract, whole command      {r['extract_img_s']:8.2f} img/s   "
        f"{r['ratio_whole_to_limit']:.3f} of the limit",
    ]
    if r.get("steady_img_s"):
        lines.append(f"extract, steady state       {r['steady_img_s']:8.2f} img/s   "
                     f"{r['ratio_steady_to_limit']:.3f} of the limit")
    if r.get("ray_data_img_s"):
        lines.append(f"Ray Data pipeline           {r['ray_data_img_s']:8.2f} img/s   "
                     f"extract is {r['ratio_to_ray_data']:.2f}x")
    lines += [
        f"decode, one core            {r['decode_img_s_per_core']:8.1f} img/s "
        f"({r['decode_draft_img_s_per_core']:.1f} with --jpeg-draft)",
        f"stored bytes per image      {r['bytes_per_image']:8.0f}",
        f"layout                      {r['layout']}",
    ]
    return "\n".join(lines)
