"""Shared fixtures: real image files, and a real local Ray cluster in this process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_images(root: Path, labels: dict[str | None, int], size: tuple[int, int] = (40, 48),
                 fmt: str = "JPEG", seed: int = 0) -> list[Path]:
    """Write real image files: root/<label>/img-<i>.<ext> (root itself for label None)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    paths = []
    for label, n in labels.items():
        d = root / label if label else root
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = d / f"img-{i:03d}.{ext}"
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(p, fmt)
            paths.append(p)
    return paths


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster started in this process (2 CPUs, no GPUs)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # address="local": a private cluster, even when RAY_ADDRESS or a `ray start` head exists.
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield ray
    ray.shutdown()
