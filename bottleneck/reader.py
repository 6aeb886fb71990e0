"""Read a bottleneck feature dataset back: counts, metadata, and streamed record batches."""

from __future__ import annotations

import pyarrow.parquet as pq

from .planning import PART_RE
from .schema import DatasetMetadata, read_metadata
from .storage import Storage, with_retries
from .writer import ERRORS_DIR


def part_paths(store: Storage) -> list[str]:
    """fsspec paths of the committed part files, in shard order."""
    return [store.path(n) for n in store.ls_names() if PART_RE.match(n)]


def _footer_rows(store: Storage, path: str) -> int:
    def read() -> int:
        with store.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata.num_rows
    return with_retries(read)


def count_rows(store: Storage) -> tuple[int, int]:
    """(feature rows, error rows) from the Parquet footers alone."""
    rows = sum(_footer_rows(store, p) for p in part_paths(store))
    errors = sum(_footer_rows(store, store.path(ERRORS_DIR, n))
                 for n in store.ls_names(ERRORS_DIR) if PART_RE.match(n))
    return rows, errors


def dataset_metadata(store: Storage) -> DatasetMetadata:
    """The bottleneck metadata of a feature dataset (from its first part's footer)."""
    parts = part_paths(store)
    if not parts:
        raise ValueError(f"no part-*.parquet files in {store.url}")
    with store.fs.open(parts[0], "rb") as f:
        return read_metadata(pq.ParquetFile(f).schema_arrow)
