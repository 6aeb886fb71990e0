"""One run on a GPU machine: what the conv base does in each precision, what one core
decodes, what the whole `bottleneck extract` does, and so how many cores a GPU needs.

    python -m bottleneck.tools.bench_gpu --json gpu.json            # on the GPU machine
    python -m bottleneck.tools.bench_gpu --photos 128 --batch-size 8 --seconds 5   # on CPUs

Made for a single run of under 8 minutes on one GPU (2,048 photos); it runs on CPUs too,
where it measures the same things more slowly (a smaller run above). Steps, in this order:
1. the conv base alone on in-memory batches (random weights: the speed does not depend on
   them) in float32, mixed_bfloat16 and mixed_float16, on the first GPU (or the CPUs);
2. decode + resize on one core, with the default decoder and with `--jpeg-draft`, on
   500×375 photo JPEGs (crops of scikit-learn's sample photographs);
3. the whole `bottleneck extract` command over `--photos` such photos, in float32 and in
   the fastest mixed precision if it beats float32, in a fresh process with its own Ray,
   on every core.
It prints the cores per GPU needed to keep the conv base fed, at each precision.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .benchmark import conv_base_limit, decode_rate, extract_command, gpu_count

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def measure(photos: int, image_size: int, batch_size: int, seconds: float) -> dict[str, Any]:
    from ..tflog import quiet_tensorflow
    from .demo_data import write_photos

    quiet_tensorflow()
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    res: dict[str, Any] = {"gpus": gpu_count(), "cores": cores, "image_size": image_size,
                           "batch_size": batch_size, "conv_base_img_s": {}}
    device = f"{res['gpus']} GPU(s)" if res["gpus"] else f"{cores} CPU cores (no GPU)"
    print(f"bench_gpu: {device}, {image_size} px, batch {batch_size}", flush=True)
    for p in PRECISIONS:
        rate = conv_base_limit("random", image_size, batch_size, None, seconds, p)
        res["conv_base_img_s"][p] = round(rate, 1)
        print(f"conv base alone, {p}: {rate:.1f} img/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        images = f"{tmp}/images"
        write_photos(images, photos)
        paths = sorted(Path(images).rglob("*.jpg"))
        res["decode_img_s_per_core"] = round(decode_rate(paths[:200], image_size), 1)
        res["decode_draft_img_s_per_core"] = round(
            decode_rate(paths[:200], image_size, jpeg_draft=True), 1)
        print(f"decode + resize on one core: {res['decode_img_s_per_core']} img/s "
              f"({res['decode_draft_img_s_per_core']} with --jpeg-draft)", flush=True)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("RAY_ADDRESS", None)
        # float32, and the fastest mixed precision where it is faster (on a GPU; on most
        # CPUs the mixed ones are slower, and the run would take far longer for nothing).
        rates = res["conv_base_img_s"]
        fastest = max(PRECISIONS[1:], key=lambda p: rates[p])
        res["extract"] = {}
        for p in ("float32", fastest) if rates[fastest] > rates["float32"] else ("float32",):
            r = extract_command(images, f"{tmp}/out-{p}", len(paths), "random", image_size,
                                 batch_size, p, env)
            res["extract"][p] = {k: round(v, 2) if isinstance(v, float) else v
                                 for k, v in r.items()}
    res["cores_per_gpu_needed"] = {
        p: round(rate / res["decode_img_s_per_core"], 2)
        for p, rate in res["conv_base_img_s"].items()}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    for p, n in res["cores_per_gpu_needed"].items():
        draft = res["conv_base_img_s"][p] / res["decode_draft_img_s_per_core"]
        print(f"to keep the conv base fed in {p}: {n} cores of decoding "
              f"({draft:.2f} with --jpeg-draft); this machine has {cores}", flush=True)
    print(f"bench_gpu: {res['seconds']} s in all", flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=2048, help="photos extracted (default: 2048)")
    p.add_argument("--image-size", type=int, default=224, help="(default: 224)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per conv-base call (default: 64)")
    p.add_argument("--seconds", type=float, default=15.0,
                   help="timing per precision of the conv base alone (default: 15)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    a = p.parse_args(argv)
    res = measure(a.photos, a.image_size, a.batch_size, a.seconds)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
