"""What every sharded job writes to OUTPUT, whatever its rows: one committed file per shard
(`part-NNNNN.parquet`), the rows that failed (`_errors/part-NNNNN.parquet`), and the
per-shard result that a worker hands back to the runner."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..schema import ERRORS_SCHEMA, DatasetMetadata, read_metadata
from ..storage import Storage, with_retries
from .planning import PART_RE, part_name

ERRORS_DIR = "_errors"
# Features are mostly zeros after ReLU: zstd shrinks them several-fold at little CPU cost.
COMPRESSION = "zstd"
LABEL_COUNTS_KEY = "bottleneck.label_counts"  # a part file's rows per label (footer)


@dataclass
class ShardResult:
    """What a worker reports for one shard it committed (or, with no OUTPUT, computed)."""

    index: int
    rows: int
    errors: int
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""  # who ran it (a Ray actor id); empty in-process
    node: str = ""  # the Ray node it ran on
    decode_nodes: tuple[str, ...] = ()  # where decode workers decoded its images, if any
    gpu_ids: tuple[str, ...] = ()  # the accelerators Ray gave that worker
    table: Any = None  # the rows themselves, for a job with no OUTPUT (a pa.Table)
    error_rows: list[tuple[str, str]] = field(default_factory=list)


def write_errors(out: Storage, shard_index: int, errors: list[tuple[str, str]]) -> None:
    """OUTPUT/_errors/part-N.parquet with columns path, error. With no errors, removes the
    file an earlier, killed try of the same shard may have left."""
    if not errors:
        out.rm(ERRORS_DIR, part_name(shard_index))
        return
    table = pa.table({"path": [p for p, _ in errors], "error": [e for _, e in errors]},
                     schema=ERRORS_SCHEMA)
    with out.open_atomic(ERRORS_DIR, part_name(shard_index)) as f:
        pq.write_table(table, f, compression=COMPRESSION)


def read_table(store: Storage, path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file of the job's own (a part, its errors, a plan chunk, the assembled
    predictions), whole or some `columns`.

    Not `pq.read_table`, which goes through pyarrow.dataset (6 MB more in the driver), and
    no thread pools (no decoding threads, no read-ahead): Arrow's pools, once they have
    called back into a Python file object, can still be running when the process exits
    and abort it ("terminate called without an active exception", apache/arrow#34314).
    These files gain nothing from them."""
    def read() -> pa.Table:
        with store.fs.open(path, "rb") as f:
            return pq.ParquetFile(f, pre_buffer=False).read(columns=columns, use_threads=False)
    return with_retries(read, what=f"read {path}")


def read_errors(store: Storage) -> list[tuple[str, str]]:
    """Every (path, error) row of OUTPUT/_errors/, in shard order."""
    rows: list[tuple[str, str]] = []
    for n in store.ls_names(ERRORS_DIR):
        if PART_RE.match(n):
            t = read_table(store, store.path(ERRORS_DIR, n))
            rows += zip(t.column("path").to_pylist(), t.column("error").to_pylist())
    return rows


def part_paths(store: Storage) -> list[str]:
    """fsspec paths of the committed part files, in shard order."""
    return [store.path(n) for n in store.ls_names() if PART_RE.match(n)]


def footer_rows(store: Storage, path: str) -> int:
    """A Parquet file's row count, from its footer."""
    def read() -> int:
        with store.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return with_retries(read, what=f"read footer {path}")


def count_rows(store: Storage) -> tuple[int, int]:
    """(rows, error rows) of a whole OUTPUT, from the Parquet footers alone."""
    rows = sum(footer_rows(store, p) for p in part_paths(store))
    errors = sum(footer_rows(store, store.path(ERRORS_DIR, n))
                 for n in store.ls_names(ERRORS_DIR) if PART_RE.match(n))
    return rows, errors


def count_labels(store: Storage) -> dict[str, int]:
    """Rows per label of a whole feature OUTPUT, from the part files' footers (each part
    counts its own: `LABEL_COUNTS_KEY`)."""
    def read(path: str) -> dict[str, int]:
        with store.fs.open(path, "rb") as f:
            raw = (pq.ParquetFile(f).metadata.metadata or {}).get(LABEL_COUNTS_KEY.encode())
        return json.loads(raw) if raw else {}

    total: Counter[str] = Counter()
    for p in part_paths(store):
        total.update(with_retries(lambda p=p: read(p), what=f"read footer {p}"))
    return dict(sorted(total.items()))


def dataset_metadata(store: Storage) -> DatasetMetadata:
    """The bottleneck metadata of a feature dataset (from its first part's footer)."""
    parts = part_paths(store)
    if not parts:
        raise ValueError(f"no part-*.parquet files in {store.url}")
    with store.fs.open(parts[0], "rb") as f:
        return read_metadata(pq.ParquetFile(f).schema_arrow)
