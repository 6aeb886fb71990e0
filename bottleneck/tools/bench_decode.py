"""The JPEG decoders side by side: img/s on one core, and how far each is from the Keras
reference pixels, on 500×375 photos and on 6-megapixel ones, at the model's input size.

    python -m bottleneck.tools.bench_decode                  # 224 px, 200 + 24 photos
    python -m bottleneck.tools.bench_decode --image-size 224 --json decoders.json

Decoders (`images.DecodeOptions`): `pillow` (Pillow alone: what Keras' `load_img` runs),
`turbo` (libjpeg-turbo through simplejpeg where it gives Pillow's pixels, the default), and
each with `--jpeg-draft` (libjpeg's scaled DCT, ≥ 2× the target side). Each decodes bytes
already in memory, then resizes (bilinear) as extract does, on one thread. The error is
against Pillow's full decode, the Keras reference: the largest and the mean absolute
difference of a pixel (0–255), and the relative L2 error of the whole batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..images import DecodeOptions, decode_image

DECODERS = {  # name → (decoder, jpeg_draft)
    "pillow": ("pillow", False),
    "pillow, draft": ("pillow", True),
    "turbo": ("turbo", False),
    "turbo, scaled DCT": ("turbo", True),
}


def photos(count: int, width: int, height: int) -> list[bytes]:
    """`count` photo JPEGs of width×height cut from scikit-learn's sample photographs."""
    from .demo_data import write_photos

    with tempfile.TemporaryDirectory() as tmp:
        write_photos(tmp, count, width=width, height=height)
        return [p.read_bytes() for p in sorted(Path(tmp).rglob("*.jpg"))]


def rate(datas: list[bytes], options: DecodeOptions, seconds: float) -> float:
    """img/s of decode + resize on this thread, over at least `seconds` and one pass."""
    n, t0 = 0, time.perf_counter()
    while n < len(datas) or time.perf_counter() - t0 < seconds:
        decode_image(datas[n % len(datas)], options)
        n += 1
    return n / (time.perf_counter() - t0)


def compare(datas: list[bytes], image_size: int, seconds: float) -> list[dict[str, Any]]:
    ref = np.stack([decode_image(d, DecodeOptions(image_size, decoder="pillow")) for d in datas])
    rows = []
    for name, (decoder, draft) in DECODERS.items():
        o = DecodeOptions(image_size, jpeg_draft=draft, decoder=decoder)
        got = np.stack([decode_image(d, o) for d in datas])
        diff = np.abs(got - ref)
        rows.append({"decoder": name, "img_s": round(rate(datas, o, seconds), 1),
                     "max_abs": float(diff.max()), "mean_abs": round(float(diff.mean()), 3),
                     "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=224, help="model input side (default: 224)")
    p.add_argument("--small", type=int, default=200, help="500×375 photos (default: 200)")
    p.add_argument("--large", type=int, default=24, help="3000×2000 photos (default: 24)")
    p.add_argument("--seconds", type=float, default=5.0, help="timing per decoder (default: 5)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures")
    a = p.parse_args(argv)
    out: dict[str, Any] = {"image_size": a.image_size, "sets": []}
    for label, count, w, h in (("500x375", a.small, 500, 375), ("3000x2000", a.large, 3000, 2000)):
        datas = photos(count, w, h)
        rows = compare(datas, a.image_size, a.seconds)
        out["sets"].append({"photos": label, "count": len(datas), "decoders": rows})
        for r in rows:
            print(f"{label:>9} {r['decoder']:<18} {r['img_s']:>7.1f} img/s on one core; "
                  f"vs Keras' pixels: max {r['max_abs']:.0f}, mean {r['mean_abs']:.3f}, "
                  f"relative L2 {r['rel_l2']:.2e}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
