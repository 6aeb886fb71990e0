"""Walk a folder tree with many directory reads in flight, yielding files in path order.

For local folders and for every fsspec store other than S3 (GCS, Azure, memory…), where a
folder is listed by reading it. Folders are read ahead of the walk, up to `requests` at once
(`ThreadPoolExecutor`: directory reads release the GIL), while files come out in exactly the
order of sorting their full paths, without ever holding the whole tree.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

# path -> (files, folders): the base names directly inside, hidden ones left out
ReadDir = Callable[[str], tuple[list[str], list[str]]]


def read_local_dir(path: str) -> tuple[list[str], list[str]]:
    files, dirs = [], []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            (dirs if e.is_dir() else files).append(e.name)
    return files, dirs


def fsspec_dir_reader(fs: Any) -> ReadDir:
    def read(path: str) -> tuple[list[str], list[str]]:
        files, dirs = [], []
        for info in fs.ls(path, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if not name or name.startswith("."):
                continue
            (dirs if info.get("type") == "directory" else files).append(name)
        return files, dirs
    return read


class TreeLister:
    """`pages(root)` yields the full paths of the files under `root` in sorted order, in
    pages of at most `page_size`. Hidden files and folders (names starting with '.') are
    skipped."""

    def __init__(self, read_dir: ReadDir, requests: int = 16, page_size: int = 1000):
        self.read_dir = read_dir
        self.max_requests = max(1, requests)
        self.page_size = page_size
        self.requests = 0
        self.keys = 0
        self._lock = threading.Lock()
        self._outstanding = 0

    def _read(self, path: str) -> tuple[list[str], list[str]]:
        out = self.read_dir(path)
        with self._lock:
            self.requests += 1
            self.keys += len(out[0]) + len(out[1])
        return out

    def pages(self, root: str, start_after: str | None = None) -> Iterator[list[str]]:
        page: list[str] = []
        with ThreadPoolExecutor(self.max_requests, thread_name_prefix="walk") as pool:
            self._outstanding = 1
            for path in self._walk(pool, root.rstrip("/"), pool.submit(self._read, root),
                                   start_after):
                page.append(path)
                if len(page) >= self.page_size:
                    yield page
                    page = []
        if page:
            yield page

    def _walk(self, pool: ThreadPoolExecutor, folder: str, listing: Future,
              start_after: str | None) -> Iterator[str]:
        files, dirs = listing.result()
        self._outstanding -= 1
        # Sorting "name/" for folders puts each folder where its paths sort among its
        # siblings ('.' < '/' < '0'), so the walk yields paths in sorted order.
        items = sorted([(f, False) for f in files] + [(d + "/", True) for d in dirs])
        if start_after is not None:  # resuming: skip what sorts before the restart point
            items = [(n, d) for n, d in items
                     if f"{folder}/{n}" > start_after or (d and start_after.startswith(
                         f"{folder}/{n}"))]
        later: deque[str] = deque(n for n, d in items if d)
        ahead: dict[str, Future] = {}

        def read_ahead() -> None:
            while later and self._outstanding < self.max_requests:
                name = later.popleft()
                ahead[name] = pool.submit(self._read, f"{folder}/{name[:-1]}")
                self._outstanding += 1

        read_ahead()
        for name, is_dir in items:
            if not is_dir:
                yield f"{folder}/{name}"
                continue
            if name not in ahead:
                later.remove(name)
                ahead[name] = pool.submit(self._read, f"{folder}/{name[:-1]}")
                self._outstanding += 1
            yield from self._walk(pool, f"{folder}/{name[:-1]}", ahead.pop(name), start_after)
            read_ahead()
