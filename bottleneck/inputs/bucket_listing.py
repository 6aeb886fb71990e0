"""List one bucket prefix with many requests in flight, in key order, in bounded memory.

S3's ListObjectsV2 pages through a prefix 1,000 keys a request, each page naming where the
next starts, so one chain of requests is as slow as its round trips (100M keys: 100,000
requests in a row). Here the prefix is cut into key ranges, each listed by its own chain
(`StartAfter` = where it begins), and a chain that finds more keys than it can page through
alone gives part of its range to new chains (`keyspace.split_points`). The first cuts come
from the folders one delimiter listing shows (class folders are natural ranges).

The pages come out in key order: ranges are kept sorted, and the consumer reads the first
range while the others list ahead into a bounded buffer. boto3's paginators have no
parallelism, and fsspec's `find` is one chain; this bookkeeping is why this module exists.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from .keyspace import split_points

PAGE_KEYS = 1000  # S3's most keys per ListObjectsV2 answer


@dataclass
class ListPage:
    keys: list[str]
    prefixes: list[str]  # common prefixes, for a delimiter listing
    truncated: bool


# (prefix, start_after or None, delimiter or None) -> one page; may raise (after retries)
ListFn = Callable[[str, "str | None", "str | None"], ListPage]


@dataclass
class _Range:
    """Keys k with lo < k <= hi (lo None: from the start; hi None: to the end)."""

    lo: str | None
    hi: str | None
    cursor: str | None = None  # the last key listed; the next request starts after it
    pages: deque[pa.Array] = field(default_factory=deque)
    buffered: int = 0
    busy: bool = False
    done: bool = False


class BucketLister:
    """`pages()` yields every key under `prefix` (after `start_after`), sorted, in pages.

    `requests` bounds the requests in flight. `buffer_keys` is a soft bound on the keys
    held: a range is listed only while the keys buffered before it are under it, nearest
    first, but ranges cut from others sit before ranges already listed ahead and fill in
    turn, so the buffer can reach a few times it (README, "Listing at scale"). Raises the
    first error of any request."""

    def __init__(self, list_page: ListFn, prefix: str, requests: int = 64,
                 buffer_keys: int = 200_000, fanout: int = 8, seed_depth: int = 2):
        self.list_page = list_page
        self.prefix = prefix
        self.max_requests = max(1, requests)
        self.buffer_keys = buffer_keys
        self.fanout = fanout
        self.seed_depth = seed_depth
        self.requests = 0
        self.keys = 0
        self._cv = threading.Condition()
        self._ranges: list[_Range] = []
        self._in_flight = 0
        self._pool: ThreadPoolExecutor | None = None
        self._error: BaseException | None = None
        self._stopped = False

    # -- the consumer ----------------------------------------------------------------
    def pages(self, start_after: str | None = None) -> Iterator[pa.Array]:
        """Pages of keys (Arrow strings: compact while they wait in the buffer)."""
        self._ranges = self._seed(start_after)
        # Requests go to a thread pool; which range is asked next is decided in one place,
        # under the lock, each time a request ends or the consumer frees buffer room.
        self._pool = ThreadPoolExecutor(self.max_requests, thread_name_prefix="list")
        try:
            while True:
                with self._cv:
                    self._dispatch()
                    while True:
                        if self._error is not None:
                            raise self._error
                        if not self._ranges:
                            return
                        head = self._ranges[0]
                        if head.pages:
                            keys = head.pages.popleft()
                            head.buffered -= len(keys)
                            break
                        if head.done:
                            self._ranges.pop(0)
                            self._dispatch()  # a new first range may be listed past the cap
                            continue
                        self._cv.wait()
                yield keys
        finally:
            with self._cv:
                self._stopped = True
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the workers -----------------------------------------------------------------
    def _seed(self, start_after: str | None) -> list[_Range]:
        """Ranges cut at the folders found by delimiter listings, `seed_depth` levels down
        (one request a folder, first page only, in parallel), where folders are few."""
        cuts: list[str] = []
        level = [self.prefix]
        for _ in range(self.seed_depth):
            if len(level) >= self.max_requests:
                break
            with ThreadPoolExecutor(min(len(level), self.max_requests)) as ex:
                found = list(ex.map(self._folders, level))
            if self._error is not None:
                raise self._error
            level = sorted(p for ps in found for p in ps)
            if not level:
                break
            cuts += level
        cuts = sorted(c for c in set(cuts) if start_after is None or c > start_after)
        # A range costs a request even when its folder holds one key: keep a few per chain.
        step = -(-len(cuts) // (4 * self.max_requests)) if cuts else 1
        cuts = cuts[::step]
        bounds: list[str | None] = [start_after, *cuts, None]
        return [_Range(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def _folders(self, prefix: str) -> list[str]:
        try:
            return self._request(prefix, None, "/").prefixes
        except BaseException:  # noqa: BLE001 - recorded by _request, raised by _seed
            return []

    def _request(self, prefix: str, start_after: str | None, delimiter: str | None) -> ListPage:
        try:
            page = self.list_page(prefix, start_after, delimiter)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            with self._cv:
                self._error = self._error or e
                self._cv.notify_all()
            raise
        with self._cv:
            self.requests += 1
        return page

    def _window(self) -> list[_Range]:
        """The ranges that may be listed now: from the first on, until the keys buffered
        before a range reach the cap (ranges nearest the consumer go first)."""
        held = 0
        for i, r in enumerate(self._ranges):
            if i and held >= self.buffer_keys:
                return self._ranges[:i]
            held += r.buffered
        return self._ranges

    def _dispatch(self) -> None:
        """Send requests for the first ranges in the window that need one (lock held)."""
        if self._stopped or self._error is not None:
            return
        for r in self._window():
            if self._in_flight >= self.max_requests:
                return
            if not r.busy and not r.done:
                r.busy = True
                self._in_flight += 1
                self._pool.submit(self._fetch, r, r.cursor or r.lo)

    def _fetch(self, r: _Range, start: str | None) -> None:
        try:
            page = self._request(self.prefix, start, None)
        except BaseException:  # noqa: BLE001 - recorded by _request for the consumer
            with self._cv:
                self._in_flight -= 1
            return
        self._take(r, page)

    def _take(self, r: _Range, page: ListPage) -> None:
        """Keep the page's keys that are `r`'s; without the lock (`r` is busy: nothing else
        changes its bounds), then record them with it."""
        keys = page.keys
        ended = not page.truncated or not keys
        if r.hi is not None and keys and keys[-1] > r.hi:
            keys = keys[:bisect.bisect_right(keys, r.hi)]
            ended = True
        # The system allocator: pages are made on the request threads and freed on the
        # consumer's, which Arrow's default (mimalloc's per-thread heaps) holds on to.
        arr = pa.array(keys, pa.string(), memory_pool=pa.system_memory_pool()) if keys else None
        with self._cv:
            self._in_flight -= 1
            self.keys += len(page.keys)
            r.done = ended
            if arr is not None:
                r.pages.append(arr)
                r.buffered += len(arr)
                r.cursor = keys[-1]
            r.busy = False
            if not r.done:
                self._split(r)
            self._dispatch()
            self._cv.notify_all()

    def _split(self, r: _Range) -> None:
        """Give part of `r`'s rest to new chains while requests are to spare."""
        if r.cursor is None:
            return
        spare = self.max_requests - sum(1 for x in self._ranges if not x.done)
        if spare <= 0 and self._ranges[0] is r:
            # Ranges further on wait for the consumer (the buffer is full): the first range
            # is what it waits for, so it takes the requests they cannot use.
            spare = self.max_requests - sum(1 for x in self._window() if not x.done)
        if spare <= 0:
            return
        cuts = split_points(r.cursor, r.hi, min(spare, self.fanout), floor=self.prefix)
        if not cuts:
            return
        bounds = [*cuts, r.hi]
        new = [_Range(lo, hi) for lo, hi in zip(cuts, bounds[1:])]
        r.hi = cuts[0]
        at = self._ranges.index(r) + 1
        self._ranges[at:at] = new


def timed(fn: ListFn, delay: float) -> ListFn:
    """`fn` with `delay` seconds added to every request (the benchmark's store latency)."""
    def wrapper(prefix: str, start_after: str | None, delimiter: str | None) -> ListPage:
        time.sleep(delay)
        return fn(prefix, start_after, delimiter)
    return wrapper


class KeyStore:
    """Sorted keys in memory, answering list requests as S3 does (StartAfter, Prefix,
    Delimiter, 1,000 keys a page): the benchmark's store, and the tests' check of the
    lister against every layout of keys."""

    def __init__(self, keys: Sequence[str], page_keys: int = PAGE_KEYS, presorted: bool = False):
        # Keys are unique in a bucket. `presorted`: `keys` is already sorted and unique (a
        # computed sequence, so that the store costs no memory per key).
        self.keys = keys if presorted else sorted(set(keys))
        self.page_keys = page_keys

    def __call__(self, prefix: str, start_after: str | None, delimiter: str | None
                 ) -> ListPage:
        keys = self.keys
        i = bisect.bisect_left(keys, prefix)
        if start_after is not None and start_after >= prefix:
            i = max(i, bisect.bisect_right(keys, start_after))
        if not delimiter:  # a slice: the store's own work should not weigh on the lister
            end = bisect.bisect_left(keys, prefix + "\U0010ffff", i) if prefix else len(keys)
            j = min(i + self.page_keys, end)
            return ListPage(list(keys[i:j]), [], j < end)
        out: list[str] = []
        prefixes: list[str] = []
        while i < len(keys) and len(out) + len(prefixes) < self.page_keys:
            k = keys[i]
            if not k.startswith(prefix):
                return ListPage(out, prefixes, False)
            cut = k.find(delimiter, len(prefix)) if delimiter else -1
            if cut < 0:
                out.append(k)
                i += 1
                continue
            folder = k[:cut + 1]
            prefixes.append(folder)
            # The next key outside this folder: folder + chr(0x10FFFF) sorts after its keys.
            i = bisect.bisect_left(keys, folder + "\U0010ffff", i)
        more = i < len(keys) and keys[i].startswith(prefix)
        return ListPage(out, prefixes, more)
