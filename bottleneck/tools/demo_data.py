"""Small real image sets that need no download: they ship inside scikit-learn.

- `write_digits`: the UCI handwritten digits (1,797 real 8×8 scans, ten classes), written
  as PNG files in INPUT/<digit>/ folders, enlarged to `size` pixels; `write_digit_split`:
  a training set and held-out images beside it.
- `write_photos`: JPEG photos of `width`×`height` cut from scikit-learn's two sample
  photographs (china.jpg, flower.jpg) at seeded random crops and scales, for throughput
  measurements on photo-like data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError


def sklearn_datasets() -> Any:
    """scikit-learn's datasets module, or UsageError saying how to install it."""
    try:
        from sklearn import datasets
    except ImportError:
        raise UsageError("the demo and the benchmark take their images from scikit-learn, "
                         "which is not installed: pip install 'vgg-bottleneck[demo]'") from None
    return datasets


def write_digits(root: str | Path, per_class: int | None = None, size: int = 32,
                 seed: int = 0, skip: int = 0) -> int:
    """Write digit PNGs under root/<digit>/; returns how many. per_class=None: all 1,797.

    Images are taken in a seeded random order; `skip` passes over the first `skip` of each
    digit, so two calls with disjoint ranges write disjoint images."""
    from PIL import Image

    digits = sklearn_datasets().load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    taken: dict[int, int] = {}
    root = Path(root)
    n = 0
    for i in order:
        label = int(digits.target[i])
        seen = taken.get(label, 0)
        taken[label] = seen + 1
        if seen < skip or (per_class is not None and seen >= skip + per_class):
            continue
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR)
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"digit-{i:04d}.png")
        n += 1
    return n


def write_digit_split(root: str | Path, per_class: int, held_out: int, size: int = 32,
                      train: str = "train", new: str = "new") -> tuple[int, int]:
    """root/<train>/<digit>/ with `per_class` digits each and root/<new>/<digit>/ with
    `held_out` others each (never the same images); returns how many of each."""
    root = Path(root)
    return (write_digits(root / train, per_class, size),
            write_digits(root / new, held_out, size, skip=per_class))


def write_photos(root: str | Path, count: int, width: int = 500, height: int = 375,
                 seed: int = 0, quality: int = 90) -> int:
    """Write `count` photo JPEGs under root/<photo name>/; returns how many."""
    from PIL import Image

    sample = sklearn_datasets().load_sample_images()
    names = ["china", "flower"]
    rng = np.random.default_rng(seed)
    root = Path(root)
    for i in range(count):
        k = i % len(sample.images)
        src = Image.fromarray(sample.images[k])
        scale = rng.uniform(0.55, 1.0)
        cw, ch = int(src.width * scale), int(src.height * scale)
        x0, y0 = rng.integers(0, src.width - cw + 1), rng.integers(0, src.height - ch + 1)
        crop = src.crop((x0, y0, x0 + cw, y0 + ch))
        crop = crop.resize((width, height), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        d = root / names[k]
        d.mkdir(parents=True, exist_ok=True)
        crop.save(d / f"photo-{i:05d}.jpg", quality=quality)
    return count
