"""Shared fixtures: real image files, and a real local Ray cluster in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
# main() as the console script runs it, then a last stderr line saying if Ray was imported:
# a usage error must be refused before any Ray work.
CLI_WRAPPER = ("import sys\n"
               "from bottleneck.cli import main\n"
               "try:\n"
               "    rc = main(sys.argv[1:])\n"
               "finally:\n"
               "    print('RAY-IMPORTED' if 'ray' in sys.modules else 'NO-RAY', file=sys.stderr)\n"
               "sys.exit(rc)\n")


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            prelude: str = "") -> subprocess.CompletedProcess:
    """`bottleneck ARGS…` in a separate process, as a user runs it; `prelude` is Python run
    first in that process."""
    return subprocess.run([sys.executable, "-c", prelude + CLI_WRAPPER, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


def bottleneck_command(*args: str) -> list[str]:
    """The command line of `bottleneck ARGS…` in this environment."""
    return [sys.executable, "-m", "bottleneck", *args]


def committed_parts(out: Path) -> dict[str, tuple[int, int, str]]:
    """OUTPUT's part files → (inode, mtime_ns, sha256): a rewritten file changes them all,
    a file redone with the same rows keeps only its sha256."""
    import hashlib

    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(out.glob("part-*.parquet"))}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """stderr without run_cli's Ray marker and blank lines."""
    return [line for line in proc.stderr.splitlines()
            if line not in ("NO-RAY", "RAY-IMPORTED") and line.strip()]


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
