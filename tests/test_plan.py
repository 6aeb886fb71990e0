"""The plan in OUTPUT: shards cut from a stream cover every entry once, in order, however the
stream is paged or interrupted; a rerun reads it instead of listing; --relist adds only what
is new and names what vanished. No Ray: the feed is driven as the pool drives it."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Iterator

import pyarrow as pa
import pytest

from bottleneck.inputs.source import START, InputError, ListingStats, Position, page, skip_entries
from bottleneck.runner.feed import ShardFeed
from bottleneck.runner.plan import CHUNK_SHARDS, LISTED, read_state, shards_of
from bottleneck.runner.pool import drain as drain_feed
from bottleneck.storage import Storage


class PagedList:
    """A Source over a fixed, sorted list of URLs, in pages of random sizes; it can be told
    to fail after some pages, as a killed listing stops."""

    kind = "folder"
    sorted = True

    def __init__(self, urls: list[str], seed: int = 0, fail_after: int | None = None):
        self.url = "mem://in"
        self.urls = sorted(urls)
        self.rng = random.Random(seed)
        self.fail_after = fail_after
        self.stats = ListingStats()
        self.reads = 0

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        self.reads += 1
        urls = [u for u in self.urls if after.last_url is None or u > after.last_url]
        i = n = 0
        while i < len(urls):
            if self.fail_after is not None and n >= self.fail_after:
                raise ConnectionError("the listing was cut off")
            step = self.rng.randint(1, 700)
            chunk = urls[i:i + step]
            yield page(chunk, [u.split("/")[1] for u in chunk])
            i, n = i + step, n + 1


def urls(n: int) -> list[str]:
    return [f"in/c{i % 7}/img-{i:06d}.jpg" for i in range(n)]


def drain(feed: ShardFeed, out: list | None = None) -> list:
    """Take every shard as the pool does; shards taken before an error are left in `out`."""
    feed.start()
    return drain_feed(feed, out, poll=0.05)


def store(tmp_path) -> Storage:
    return Storage(str(tmp_path / "out" / "_plan"))


@pytest.mark.parametrize("n,size", [(1, 1), (5, 3), (1000, 7), (40_000, 256), (2 * 128 * 3, 3)])
def test_shards_cover_every_entry_once_in_order(tmp_path, n, size):
    src = PagedList(urls(n), seed=n)
    shards = drain(ShardFeed(store(tmp_path), src, size, committed=set()))
    assert [s.index for s in shards] == list(range(-(-n // size)))
    assert [e.url for s in shards for e in s.entries] == src.urls
    assert all(len(s) == size for s in shards[:-1]) and 1 <= len(shards[-1]) <= size
    assert all(e.label == e.url.split("/")[1] and e.path == e.url for s in shards
               for e in s.entries)
    state = read_state(store(tmp_path))
    assert state.complete and (state.entries, state.shards) == (n, len(shards))
    assert state.chunks >= -(-len(shards) // CHUNK_SHARDS)
    assert sum(state.labels.values()) == n


def test_shards_of_a_table_in_many_pieces_are_made_one_at_a_time():
    ids = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    pieces = [(0, 2), (2, 5), (5, 6), (6, 10)]  # as the plan writer leaves pages, uncopied
    table = pa.concat_tables([pa.table({
        "shard": pa.array(ids[a:b], pa.int64()),
        "url": [f"in/c/{i}.jpg" for i in range(a, b)],
        "label": ["c"] * (b - a)}) for a, b in pieces])
    shards = shards_of(table, skip={2})
    first = next(shards)  # the others are not made yet
    assert (first.index, [e.url for e in first.entries]) == (0, ["in/c/0.jpg", "in/c/1.jpg",
                                                                  "in/c/2.jpg"])
    assert [(s.index, len(s)) for s in shards] == [(1, 2), (3, 4)]


def test_a_configured_driver_writes_the_plan_without_mimalloc(tmp_path):
    # Parquet's writer takes its buffers from Arrow's C++ default pool, not set_memory_pool's.
    code = f"""
import os
from bottleneck.runner.memory import configure_driver
configure_driver()
import pyarrow as pa
from bottleneck.inputs.source import page
from bottleneck.runner.plan import PlanState, PlanWriter
from bottleneck.storage import Storage
w = PlanWriter(Storage({str(tmp_path)!r}), 256, PlanState())
w.add(page([f"in/c/{{i:06d}}.jpg" for i in range(50_000)], ["c"] * 50_000))
w.finish(0, 0.0, {{}})
try:
    used = pa.mimalloc_memory_pool().max_memory()
except NotImplementedError:  # a pyarrow built without it
    used = 0
print(used, "ARROW_DEFAULT_MEMORY_POOL" in os.environ)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_a_rerun_reads_the_plan_and_skips_committed_shards(tmp_path):
    src = PagedList(urls(3000))
    first = drain(ShardFeed(store(tmp_path), src, 100, committed=set()))
    again = PagedList(urls(3000) + ["in/c0/new.jpg"])
    feed = ShardFeed(store(tmp_path), again, 100, committed={0, 5, 29})
    assert not feed.lists and not feed.nothing_to_do
    shards = drain(feed)
    assert again.reads == 0  # no listing at all
    assert [s.index for s in shards] == [i for i in range(30) if i not in {0, 5, 29}]
    assert [s.entries for s in shards] == [s.entries for s in first if s.index in
                                           {s.index for s in shards}]
    done = ShardFeed(store(tmp_path), again, 100, committed=set(range(30)))
    assert done.nothing_to_do and drain(done) == []


@pytest.mark.parametrize("cut", [0, 1, 3, 9])
def test_a_listing_cut_off_resumes_into_the_same_shards(tmp_path, cut):
    whole = drain(ShardFeed(Storage(str(tmp_path / "ref")), PagedList(urls(20_000)), 64, set()))
    plan = store(tmp_path)
    broken = ShardFeed(plan, PagedList(urls(20_000), seed=cut, fail_after=cut), 64, set())
    got: list = []
    with pytest.raises(ConnectionError):
        drain(broken, got)
    state = read_state(plan)
    assert not state.complete and state.entries % 64 == 0  # only whole shards are written
    if cut >= 3:  # a cut after some pages leaves part of a plan, to resume from its end
        assert state.shards > 0
    # The rerun: the shards handed out before the cut count as committed (their parts were).
    committed = {s.index for s in got}
    rest = drain(ShardFeed(plan, PagedList(urls(20_000), seed=99), 64, committed))
    assert sorted(got + rest, key=lambda s: s.index) == whole


def test_relist_plans_new_files_as_new_shards_and_names_vanished_ones(tmp_path):
    old = urls(1000)
    first = drain(ShardFeed(store(tmp_path), PagedList(old), 100, committed=set()))
    gone = [old[3], old[500]]
    new = ["in/c0/aaa-new.jpg", "in/c6/zzz-new.jpg", "in/c3/img-000500b.jpg"]
    now = [u for u in old if u not in gone] + new
    feed = ShardFeed(store(tmp_path), PagedList(now), 100, committed=set(range(10)),
                     relist=True)
    shards = drain(feed)
    assert [s.index for s in shards] == [10]  # only the new files, after the last shard
    assert sorted(e.url for e in shards[0].entries) == sorted(new)
    assert feed.relist_report["new"] == 3 and feed.relist_report["vanished"] == 2
    vanished = pa.parquet.read_table(str(tmp_path / "out" / "_plan" /
                                         feed.relist_report["vanished_file"]))
    assert vanished.column("url").to_pylist() == sorted(gone)
    state = read_state(store(tmp_path))
    assert state.complete and state.entries == 1003 and state.listed["runs"] == 2
    # The first run's shards are untouched, and a plain rerun lists nothing.
    assert [s.entries for s in drain(ShardFeed(store(tmp_path), PagedList([]), 100, set()))
            ][:10] == [s.entries for s in first]
    # A second relist with nothing new plans nothing.
    again = ShardFeed(store(tmp_path), PagedList(now), 100, set(range(11)), relist=True)
    assert drain(again) == [] and again.relist_report["new"] == 0


def test_an_interrupted_relist_goes_on_as_a_relist(tmp_path):
    old = urls(2000)
    drain(ShardFeed(store(tmp_path), PagedList(old), 50, committed=set()))
    now = old + [f"in/c{i % 7}/new-{i:04d}.jpg" for i in range(900)]
    broken = ShardFeed(store(tmp_path), PagedList(now, fail_after=3), 50, set(range(40)),
                       relist=True)
    got: list = []
    with pytest.raises(ConnectionError):
        drain(broken, got)
    # Rerun without --relist: the relist goes on, and plans each new file once.
    rest = drain(ShardFeed(store(tmp_path), PagedList(now, seed=5), 50,
                           set(range(40)) | {s.index for s in got}))
    planned = [e.url for s in got + rest for e in s.entries]
    assert sorted(planned) == sorted(now[2000:])
    assert not store(tmp_path).exists("_relisting.json") and store(tmp_path).exists(LISTED)


def test_an_empty_input_is_an_error_and_leaves_no_finished_plan(tmp_path):
    feed = ShardFeed(store(tmp_path), PagedList([]), 10, set())
    with pytest.raises(InputError, match="no files"):
        drain(feed)
    assert not read_state(store(tmp_path)).complete


def test_skip_entries_resumes_an_unsorted_source():
    pages = [page([f"u{i}" for i in range(a, b)], [None] * (b - a))
             for a, b in [(0, 3), (3, 4), (4, 10)]]
    for n in range(11):
        got = [u for t in skip_entries(iter(pages), n) for u in t.column("url").to_pylist()]
        assert got == [f"u{i}" for i in range(n, 10)]
