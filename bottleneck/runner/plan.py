"""The shard plan, kept in OUTPUT (`_plan/`) as the listing produces it, never whole in memory.

- ``_plan/chunk-NNNNNN.parquet``: consecutive shards (columns shard, url, label), written
  as the listing goes; each file's metadata carries the totals up to its end, so the last
  one says where an interrupted listing stopped.
- ``_plan/_listed.json``: written once the listing is finished (entries, shards, labels
  with their counts, requests). A rerun then reads the plan and never lists INPUT.
- ``_plan/vanished-RUN.parquet``: what a `--relist` found gone.

Shard i holds entries [i*shard_size, (i+1)*shard_size) of the source's order, as before the
plan was streamed: a listing cut at any point resumes into the same shards. A `--relist`
adds a run: the entries new since the plan was made, as new shards after the last one.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..storage import Storage, with_retries
from .output import COMPRESSION, read_table
from .planning import Entry, Shard, url_path

PLAN_DIR = "_plan"
LISTED = "_listed.json"
RELISTING = "_relisting.json"  # a --relist under way: a rerun goes on with it
CHUNK_RE = re.compile(r"^chunk-(\d{6,})\.parquet$")
PLAN_SCHEMA = pa.schema([("shard", pa.int64()), ("url", pa.string()), ("label", pa.string())])
META_KEY = b"bottleneck_plan"
# A chunk holds at most this many shards (32,768 entries at 256 a shard, ~2 MiB).
CHUNK_SHARDS = 128


def chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.parquet"


@dataclass
class PlanState:
    """What a plan in OUTPUT holds: read from its last chunk's footer and `_listed.json`."""

    chunks: int = 0
    shards: int = 0
    entries: int = 0
    last_url: str | None = None  # of the last entry planned by the current run
    run: int = 0  # 0: the first listing; each --relist adds one
    relist: bool = False  # the current run is a relist (it diffs against earlier runs)
    labels: dict[str, int] = field(default_factory=dict)  # rows planned per label
    relisting: bool = False  # a --relist was cut short: the next run goes on with it
    listed: dict[str, Any] | None = None  # _listed.json, once the listing is finished

    @property
    def complete(self) -> bool:
        return self.listed is not None


def read_state(store: Storage) -> PlanState:
    names = store.ls_names()
    chunks = sorted(n for n in names if CHUNK_RE.match(n))
    state = PlanState(chunks=len(chunks))
    if chunks:
        meta = chunk_meta(store, chunks[-1])
        state.shards, state.entries = meta["shards_total"], meta["entries_total"]
        state.last_url, state.run, state.relist = meta["last_url"], meta["run"], meta["relist"]
        state.labels = meta["labels"]
    if LISTED in names:
        state.listed = store.read_json(LISTED)
    state.relisting = RELISTING in names
    return state


def chunk_meta(store: Storage, name: str) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        with store.fs.open(store.path(name), "rb") as f:
            return json.loads(pq.ParquetFile(f).schema_arrow.metadata[META_KEY])
    return with_retries(read, what=f"read {store.path(name)}")


def read_chunk(store: Storage, i: int) -> pa.Table:
    return read_table(store, store.path(chunk_name(i)))


def shards_of(table: pa.Table, skip: set[int] | frozenset[int] = frozenset()) -> Iterator[Shard]:
    """The shards of one chunk, in order, leaving out those in `skip`. Each shard's entries
    are made as it is asked for: a whole chunk's at once would peak at ~15 MB of Python objects."""
    runs = pc.run_end_encode(table.column("shard").combine_chunks())  # one run a shard
    start = 0
    for sid, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist()):
        if sid not in skip:
            rows = table.slice(start, end - start)
            yield Shard(sid, tuple(Entry(url_path(u), u, lab) for u, lab in zip(
                rows.column("url").to_pylist(), rows.column("label").to_pylist())))
        start = end


def plan_urls(store: Storage, state: PlanState, run: int) -> Iterator[str]:
    """Every URL planned by `run`, in plan order."""
    for i in range(state.chunks):
        t = read_chunk(store, i)
        if chunk_run(t) == run:
            yield from t.column("url").to_pylist()


def chunk_run(table: pa.Table) -> int:
    return json.loads(table.schema.metadata[META_KEY])["run"]


@dataclass
class PlanWriter:
    """Cuts pages of entries into shards and writes them to the plan, chunk by chunk.

    Only whole shards are written before `finish`, so the totals in each chunk say exactly
    where the listing can resume."""

    store: Storage
    shard_size: int
    state: PlanState
    committed: set[int] | frozenset[int] = frozenset()
    todo_entries: int = 0  # entries in planned shards that are not committed yet
    _pending: list[pa.Table] = field(default_factory=list)
    _pending_rows: int = 0

    @property
    def pending_rows(self) -> int:
        return self._pending_rows

    @property
    def ready_shards(self) -> int:
        return self._pending_rows // self.shard_size

    def add(self, page: pa.Table) -> None:
        if page.num_rows:
            self._pending.append(page)
            self._pending_rows += page.num_rows

    def flush(self, final: bool = False) -> int:
        """Write the whole shards pending (every entry, when `final`); returns shards written."""
        rows = self._pending_rows if final else self.ready_shards * self.shard_size
        written = 0
        if not rows:
            return 0
        table = pa.concat_tables(self._pending)  # no copy: `rest` then holds only its pages
        for start in range(0, rows, CHUNK_SHARDS * self.shard_size):
            n = min(CHUNK_SHARDS * self.shard_size, rows - start)
            written += self._write(table.slice(start, n))
        rest = table.slice(rows)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows
        return written

    def _write(self, part: pa.Table) -> int:
        s = self.state
        n = part.num_rows
        shards = -(-n // self.shard_size)
        ids = pa.array(s.shards + np.arange(n, dtype=np.int64) // self.shard_size)
        last = part.column("url")[n - 1].as_py()
        labels = Counter(s.labels)
        for label, count in zip(*_value_counts(part.column("label"))):
            if label is not None:
                labels[label] += count
        meta = {"first_shard": s.shards, "shards_total": s.shards + shards,
                "entries_total": s.entries + n, "last_url": last, "run": s.run,
                "relist": s.relist, "labels": dict(sorted(labels.items()))}
        table = pa.table([ids, part.column("url"), part.column("label")],
                         schema=PLAN_SCHEMA.with_metadata({META_KEY: json.dumps(meta)}))
        with self.store.open_atomic(chunk_name(s.chunks)) as f:
            # URLs never repeat: a dictionary of them only grows the file and the time. No
            # statistics but the shard ids': nothing reads a chunk's URL or label range.
            pq.write_table(table, f, compression=COMPRESSION, use_dictionary=["shard", "label"],
                           write_statistics=["shard"])
        for sid in range(s.shards, s.shards + shards):
            if sid not in self.committed:
                self.todo_entries += _shard_rows(sid, s, n, self.shard_size)
        s.chunks += 1
        s.shards += shards
        s.entries += n
        s.last_url = last
        s.labels = meta["labels"]
        return shards

    def finish(self, requests: int, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
        """Write what is left and `_listed.json`; returns what it records."""
        self.flush(final=True)
        s = self.state
        listed = {"entries": s.entries, "shards": s.shards, "shard_size": self.shard_size,
                  "runs": s.run + 1, "labels": s.labels,
                  "requests": requests, "seconds": round(seconds, 3),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
        self.store.write_json_atomic(listed, LISTED)
        s.listed = listed
        return listed


def _shard_rows(sid: int, s: PlanState, n: int, shard_size: int) -> int:
    """Rows of shard `sid` in a chunk of `n` rows starting at shard `s.shards`."""
    start = (sid - s.shards) * shard_size
    return min(shard_size, n - start)


def _value_counts(col: pa.ChunkedArray) -> tuple[list[Any], list[int]]:
    vc = col.value_counts()
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
