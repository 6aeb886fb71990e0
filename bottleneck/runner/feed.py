"""Shards for the pool, as the listing produces them: INPUT → plan in OUTPUT → shards.

A thread lists INPUT into the plan (`plan.PlanWriter`) while the pool takes shards back
from it in order (`ShardFeed.next`), leaving out those committed before. The pool's first
request makes the writer put out the shards it has at once, so the first shard starts about
as soon after start for a billion keys as for a thousand. The driver holds one chunk of
the plan (as Arrow; a shard's entries are made as the pool takes it) and the lister's
bounded buffer, never the whole listing.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..inputs.source import InputError, Position, Source
from ..storage import Storage
from .memory import release_freed_memory
from .output import COMPRESSION
from .plan import (
    CHUNK_SHARDS,
    RELISTING,
    PlanWriter,
    plan_urls,
    read_chunk,
    read_state,
    shards_of,
)
from .planning import Shard

VANISHED = "vanished-{run:06d}.parquet"


class ShardFeed:
    """The plan of one job, read and (where it is not finished, or with `relist`) written.

    `next()` returns the next shard to run, or None when none is ready yet; `finished` says
    that none will come. An error in the listing is raised by `next()`."""

    def __init__(self, store: Storage, source: Source, shard_size: int,
                 committed: set[int], relist: bool = False,
                 guard: Callable[[], None] = lambda: None):
        """`guard()` is called before each write to the plan and may raise to stop the
        listing (OUTPUT's lock, lost to another job that now writes the plan)."""
        self.store = store
        self.guard = guard
        self.source = source
        self.shard_size = shard_size
        self.committed = committed
        self.state = read_state(store)
        self.relisting = relist or self.state.relisting
        self.lists = self.relisting or not self.state.complete
        self.writer = PlanWriter(store, shard_size, self.state, committed)
        self.writer.todo_entries = self._todo_planned()
        self.relist_report: dict[str, Any] = {}
        self._cv = threading.Condition()
        self._chunks_ready = self.state.chunks
        self._listing_done = not self.lists
        self._error: BaseException | None = None
        self._hungry = False
        self._next_chunk = 0
        self._chunk: Iterator[Shard] = iter(())  # the chunk being read, a shard at a time
        self._buffer: deque[Shard] = deque()  # taken from it ahead (has_work, finished)
        self._thread: threading.Thread | None = None
        self.seconds = 0.0

    # -- what the runner asks ----------------------------------------------------------
    @property
    def nothing_to_do(self) -> bool:
        """The plan is finished and every shard in it committed: no listing, no Ray."""
        return not self.lists and all(i in self.committed for i in range(self.state.shards))

    @property
    def todo_entries(self) -> int:
        return self.writer.todo_entries

    @property
    def listing(self) -> bool:
        return not self._listing_done

    def start(self) -> None:
        if self.lists and self._thread is None:
            self._thread = threading.Thread(target=self._list, daemon=True, name="listing")
            self._thread.start()

    def next(self) -> Shard | None:
        if self._buffer:
            return self._buffer.popleft()
        while (shard := next(self._chunk, None)) is None:
            with self._cv:
                if self._error is not None:
                    raise self._error
                if self._next_chunk >= self._chunks_ready:
                    self._hungry = not self._listing_done
                    return None
            self._chunk = shards_of(read_chunk(self.store, self._next_chunk), self.committed)
            self._next_chunk += 1
        return shard

    @property
    def finished(self) -> bool:
        if not self._buffer and (shard := next(self._chunk, None)) is not None:
            self._buffer.append(shard)  # the chunk being read has more
        with self._cv:
            if self._error is not None:
                raise self._error
            return (self._listing_done and not self._buffer
                    and self._next_chunk >= self._chunks_ready)

    def has_work(self) -> bool:
        """Block until a shard is ready (True; it stays first) or none will come (False)."""
        while True:
            shard = self.next()
            if shard is not None:
                self._buffer.appendleft(shard)
                return True
            if self.finished:
                return False
            self.wait(0.5)

    def wait(self, timeout: float) -> None:
        """Until a chunk is ready, the listing ends, or `timeout` seconds."""
        with self._cv:
            if self._next_chunk >= self._chunks_ready and not self._listing_done:
                self._hungry = True
                self._cv.wait(timeout)

    def close(self) -> None:
        """Stop listing (the thread ends at its next page; its writes are whole or none)."""
        with self._cv:
            self._listing_done = True
            self._cv.notify_all()

    # -- the listing thread --------------------------------------------------------------
    def _todo_planned(self) -> int:
        """Entries planned in shards not yet committed (exact but for short shards, which
        only end a run)."""
        s = self.state
        done = sum(1 for i in self.committed if i < s.shards)
        return max(0, s.entries - done * self.shard_size)

    def _list(self) -> None:
        t0 = time.perf_counter()
        try:
            if self.relisting:
                self._relist()
            else:
                s = self.state
                self._write(self.source.pages(Position(s.entries, s.last_url)))
            if self.state.entries == 0 and self.writer.pending_rows == 0:
                raise InputError(f"INPUT has no files: {self.source.url}")
            self.seconds = time.perf_counter() - t0
            self.guard()
            self.writer.finish(self.source.stats.requests, self.seconds,
                               {"relist": self.relist_report} if self.relist_report else {})
            if self.relisting:
                self.store.rm(RELISTING)
        except _Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - raised in the runner's thread by next()
            try:  # keep the whole shards listed so far: a rerun goes on after them
                self.guard()
                self.writer.flush()
            except Exception:  # noqa: BLE001 - the listing's own error is the one to report
                pass
            with self._cv:
                self._error = e
                self._cv.notify_all()
            return
        self._flushed(done=True)

    def _write(self, pages: Iterator[pa.Table]) -> None:
        w = self.writer
        for page in pages:
            if self._stopped():
                raise _Stopped
            w.add(page)
            if w.ready_shards >= CHUNK_SHARDS or (self._hungry and w.ready_shards):
                self.guard()
                w.flush()
                self._flushed()

    def _stopped(self) -> bool:
        with self._cv:
            return self._listing_done

    def _flushed(self, done: bool = False) -> None:
        release_freed_memory()  # what the listing's pages left in malloc's free lists
        with self._cv:
            self._chunks_ready = self.state.chunks
            self._hungry = False
            self._listing_done = self._listing_done or done
            self._cv.notify_all()

    # -- --relist ------------------------------------------------------------------------
    def _relist(self) -> None:
        """List INPUT again; plan what is new as a new run, and name what vanished."""
        if not self.source.sorted:
            raise InputError(f"--relist compares sorted listings; INPUT {self.source.url} is a "
                             f"{self.source.kind}, read in its own order")
        s = self.state
        if s.relisting:
            # Interrupted: list again from the start; what this run planned counts as old.
            run = self.store.read_json(RELISTING)["run"]
        else:
            run = s.run + 1 if s.chunks else 0
            self.store.write_json_atomic({"run": run}, RELISTING)
        old = heapq.merge(*(plan_urls(self.store, s, r) for r in range(run + 1)))
        s.run, s.relist, s.listed = run, True, None
        vanished = VanishedWriter(self.store, VANISHED.format(run=run))
        new = 0
        cur = next(old, None)
        pages = self.source.pages()

        def fresh() -> Iterator[pa.Table]:
            nonlocal cur, new
            for page in pages:
                urls = page.column("url").to_pylist()
                keep = []
                for u in urls:
                    while cur is not None and cur < u:
                        vanished.add(cur)
                        cur = next(old, None)
                    if cur == u:
                        cur = next(old, None)
                        keep.append(False)
                    else:
                        keep.append(True)
                page = page.filter(pa.array(keep, pa.bool_()))
                new += page.num_rows
                yield page
            while cur is not None:
                vanished.add(cur)
                cur = next(old, None)

        self._write(fresh())
        vanished.close()
        self.relist_report = {"run": run, "new": new, "vanished": vanished.count,
                              "vanished_file": vanished.name if vanished.count else None,
                              "vanished_first": vanished.first}


class VanishedWriter:
    """The URLs a relist no longer finds, streamed to `_plan/vanished-RUN.parquet`."""

    def __init__(self, store: Storage, name: str):
        self.store, self.name = store, name
        self.count = 0
        self.first: list[str] = []
        self._batch: list[str] = []
        self._files = ExitStack()
        self._writer: pq.ParquetWriter | None = None

    def add(self, url: str) -> None:
        self.count += 1
        if len(self.first) < 5:
            self.first.append(url)
        self._batch.append(url)
        if len(self._batch) >= 65536:
            self._flush()

    def _flush(self) -> None:
        if not self._batch:
            return
        if self._writer is None:
            f = self._files.enter_context(self.store.open_atomic(self.name))
            self._writer = pq.ParquetWriter(f, pa.schema([("url", pa.string())]),
                                            compression=COMPRESSION)
        self._writer.write_table(pa.table({"url": self._batch}))
        self._batch = []

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        self._files.close()


class _Stopped(Exception):
    """The runner closed the feed: the listing thread ends without finishing the plan."""
