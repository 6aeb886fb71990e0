"""`bottleneck benchmark --ceiling`: how close the whole extract path comes to the pure
decode rate when the model costs nothing: the GPU case in miniature.

On the same photos and cores, in one run:
1. `decode_img_s`: read + decode + resize on as many threads as extract's actors decode
   on, nothing else running; measured just before and just after each extract pass, each
   pass compared with the mean of its two (these VMs drift by a third within minutes);
2. `ceiling_img_s`: the real extract path (plan, Ray actor, read, decode, batch,
   preprocess, write, commit) with the conv base replaced by a stand-in that replays real
   conv-base outputs recorded once (VGG16 with seeded random weights: the ImageNet ones
   cannot be had here; the outputs are real ReLU activations of the real shape, so the
   writer's compression and the commit cost what they will behind a GPU). Steady state:
   images over the actors' time inside shards, each actor's first shard left out;
3. the writer's share of the actors' time in shards (`writer_share`);
4. with `decode_workers` N, `ceiling_decode_workers_img_s`: the same path again with N
   decode workers doing the decoding, their batches handed to the actor through Ray's
   object store (the decode-alone threads are the same cores' either way).
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..images import DecodeOptions, decode_image, decode_pixels, preprocess


def decode_rate(paths: list[Path], image_size: int, threads: int) -> float:
    """img/s of read + decode + resize on `threads` threads."""
    opts = DecodeOptions(image_size)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda p: decode_pixels(p.read_bytes(), opts), paths):
            pass
    return len(paths) / (time.perf_counter() - t0)


def record_outputs(paths: list[Path], image_size: int, n: int = 16) -> np.ndarray:
    """The conv base's real outputs for `n` of the photos (random:0 weights)."""
    from ..model import BatchRunner, build_conv_base, resolve_weights
    from ..tflog import quiet_tensorflow

    quiet_tensorflow()
    model = build_conv_base(resolve_weights("random"), image_size)
    x = preprocess(np.stack([decode_image(p.read_bytes(), DecodeOptions(image_size))
                             for p in paths[:n]]))
    return BatchRunner(model, len(x))(x)


def run_ceiling(images: str | None, count: int = 1024, image_size: int = 224,
                batch_size: int = 32, shard_size: int = 256, workdir: str | None = None,
                decode_workers: int | None = None) -> dict[str, Any]:
    """Each extract pass is compared with decoding alone timed just before and just after
    it (the mean of the two), since these VMs drift by a third within minutes."""
    from ..extraction.job import ExtractOptions, run_extract
    from ..runner.pool import choose_layout
    from .benchmark import gpu_count
    from .demo_data import write_photos

    res: dict[str, Any] = {"image_size": image_size}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if images is None:
            images = f"{tmp}/images"
            write_photos(images, count)
        paths = sorted(Path(images).rglob("*.jpg")) + sorted(Path(images).rglob("*.png"))
        layout = choose_layout(os.cpu_count() or 1, gpu_count())
        threads = layout.decode_threads * layout.actors
        res.update(images=len(paths), layout=layout.describe(), decode_threads=threads)
        recorded = record_outputs(paths, image_size)

        def decode() -> float:
            rate = decode_rate(paths, image_size, threads)
            print(f"decode alone on {threads} thread(s): {rate:.1f} img/s", flush=True)
            return rate

        def extract(name: str, workers: int) -> Any:
            o = ExtractOptions(input=images, output=f"{tmp}/{name}", weights="random",
                               image_size=image_size, batch_size=batch_size,
                               shard_size=shard_size, address="local", progress=False,
                               decode_workers=workers)
            s = run_extract(o, stand_in=recorded)
            print(f"extract path ({s.layout}): {s.timing()['steady_img_per_s']} img/s "
                  "(steady state)", flush=True)
            return s

        decode_runs = [decode()]
        summary = extract("out", 0)
        decode_runs.append(decode())
        remote = None
        if decode_workers:
            remote = extract("out-decode-workers", decode_workers)
            decode_runs.append(decode())
    timing = summary.timing()
    busy = sum(r.seconds.get("total", 0.0) for r in summary.results)
    write = sum(r.seconds.get("write", 0.0) for r in summary.results)

    def ratio(rate: float | None, around: list[float]) -> float | None:
        return round(rate / (sum(around) / len(around)), 3) if rate else None

    res.update(
        decode_runs=[round(r, 1) for r in decode_runs],
        decode_img_s=round(sum(decode_runs[:2]) / 2, 1),
        ceiling_img_s=timing["steady_img_per_s"],
        whole_job_img_s=timing["img_per_s"],
        writer_share=round(write / busy, 3) if busy else None,
        ratio_ceiling_to_decode=ratio(timing["steady_img_per_s"], decode_runs[:2]))
    if remote is not None:
        steady = remote.timing()["steady_img_per_s"]
        res.update(decode_workers=decode_workers, decode_workers_layout=remote.layout,
                   decode_img_s_around_decode_workers=round(sum(decode_runs[1:]) / 2, 1),
                   ceiling_decode_workers_img_s=steady,
                   ratio_decode_workers_to_decode=ratio(steady, decode_runs[1:]))
    return res


def format_ceiling(r: dict[str, Any]) -> str:
    return "\n".join([
        f"images                      {r['images']} at {r['image_size']} px",
        f"decode alone                {r['decode_img_s']:8.1f} img/s   on {r['decode_threads']} "
        f"thread(s) (around the passes: "
        f"{', '.join(map(str, r['decode_runs']))})",
        f"extract path, stand-in model{r['ceiling_img_s'] or 0:8.1f} img/s   "
        f"{r['ratio_ceiling_to_decode']} of decode alone (steady state)",
        f"  whole job (Ray, actor)    {r['whole_job_img_s'] or 0:8.1f} img/s",
        f"  writer's share of shards  {r['writer_share']}",
        f"layout                      {r['layout']}",
    ] + ([
        f"with {r['decode_workers']} decode worker(s) {r['ceiling_decode_workers_img_s'] or 0:8.1f}"
        f" img/s   {r['ratio_decode_workers_to_decode']} of decode alone around it "
        f"({r['decode_img_s_around_decode_workers']} img/s)",
        f"  layout                    {r['decode_workers_layout']}",
    ] if "decode_workers" in r else []))
