"""The driver's memory: allocator settings for a process that lists millions of keys.

The listing makes its pages on many request threads and frees them on the listing thread.
Allocators with per-thread heaps keep what those threads leave, so the driver's peak would
grow with the keys listed; these settings keep it flat (figures: README, "Listing at scale").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any

M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


@functools.cache
def _libc() -> Any:
    path = ctypes.util.find_library("c")
    return ctypes.CDLL(path) if path else None


def configure_driver() -> None:
    """Arrow's system allocator instead of mimalloc, and (on glibc) two malloc arenas
    instead of one per request thread. Call it first thing in a job's driver process,
    before pyarrow is imported."""
    if "pyarrow" not in sys.modules and "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        # Arrow's C++ default, read once as pyarrow loads: Parquet's reader and writer take
        # their buffers from it whatever set_memory_pool says (mimalloc kept up to 20 MB of
        # them). Set for this import only, so that Ray's workers keep Arrow's default.
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        try:
            import pyarrow  # noqa: F401
        finally:
            del os.environ["ARROW_DEFAULT_MEMORY_POOL"]
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, 2)


def release_freed_memory() -> None:
    """Hand the pages glibc keeps after frees back to the system (a no-op elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
