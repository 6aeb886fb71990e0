"""INPUT as a list file: a Parquet, CSV (.csv, .csv.gz) or JSON-lines (.jsonl, .ndjson, also
gzipped) file with a `path` column and an optional `label` column, local or in a bucket.

The file is read a chunk at a time, never whole, so a list of a hundred million images
costs no more memory than one of a thousand.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa

from ..storage import Storage, with_retries
from .samples import FileReader
from .source import PAGE_ROWS, START, InputError, ListingStats, Position, one_line, page, reading

FORMATS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def list_format(url: str) -> str | None:
    """"parquet", "csv" or "jsonl" by the name's extension (any case); None for any other."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((f for ext, f in FORMATS.items() if name.endswith(ext)), None)


def is_list_file(url: str) -> bool:
    """Whether INPUT names a list file we read (by its extension alone; nothing is opened)."""
    return list_format(url) is not None


class ListFileSource:
    """The rows of a list file, in file order, as pages of at most `chunk_rows` entries.

    - `path` may hold absolute URLs (s3://bucket/k.jpg), absolute local paths (kept as they
      are), or relative paths, resolved against the list file's folder (a full URL for a
      list in a bucket, an absolute path for a local one). That resolved name is the url.
    - `label`, when present, is read as text: 3 → "3", and 3.0 → "3" too (pandas writes ints
      with gaps as floats), except in CSV, whose text is taken as it is; "" is no label.
    - A row whose path is null or blank is kept, with the url `<list file>#row=<i>` (i: the
      data row's index from 0): reading it fails, so it becomes an error row of the output
      instead of an image silently missing.

    Raises InputError (one line, naming the file) for an unsupported extension; `pages`
    for a missing file, a file not of its format, a missing `path` column or a malformed
    JSON line. Transient storage errors are raised as they are.
    """

    kind = "list file"
    format = "list"
    options: dict[str, Any] = {}
    reader = FileReader()
    entries_per_shard = None
    sorted = False

    def __init__(self, url: str, storage_options: dict[str, Any], chunk_rows: int = PAGE_ROWS):
        fmt = list_format(url)
        if fmt is None:
            raise InputError(f"list file {url}: unsupported extension; expected one of "
                             f"{', '.join(FORMATS)}")
        self.file_format = fmt  # parquet, csv or jsonl
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
        try:
            self.storage = Storage(url, storage_options)
        except (ValueError, ImportError) as e:
            raise InputError(f"cannot open list file {url}: {one_line(e)}") from None
        self.url = self.storage.url
        self.chunk_rows = chunk_rows
        self.stats = ListingStats()
        self._folder = posixpath.dirname(self.storage.root)

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        """Entries after the first `after.entries` rows, as PAGE_SCHEMA tables."""
        with reading(f"list file {self.url}"):
            yield from self._pages(after.entries)

    def _pages(self, skip: int) -> Iterator[pa.Table]:
        read = {"parquet": self._read_parquet, "csv": self._read_csv, "jsonl": self._read_jsonl}
        for first, t in read[self.file_format](skip):
            self.stats.requests += 1
            self.stats.keys += t.num_rows
            if first < skip:
                t, first = t.slice(min(skip - first, t.num_rows)), skip
            for start in range(0, t.num_rows, self.chunk_rows):
                yield self._page(t.slice(start, self.chunk_rows), first + start)

    def _open(self) -> IO[bytes]:
        gz = self.storage.root.lower().endswith(".gz")
        return with_retries(lambda: self.storage.fs.open(
            self.storage.root, "rb", compression="gzip" if gz else None), what=f"open {self.url}")

    def _missing_path(self) -> InputError:
        return InputError(f"list file {self.url} has no 'path' column")

    # Each reader yields (index of the first row, table of `path` and maybe `label`), in
    # file order; it may leave out unread what lies wholly among the first `skip` rows.
    def _read_parquet(self, skip: int) -> Iterator[tuple[int, pa.Table]]:
        import pyarrow.parquet as pq

        with self._open() as f:
            # One thread, no read-ahead: a page is small, and Arrow's pools would hold
            # buffers on their threads as well (see PAGE_ROWS).
            pf = pq.ParquetFile(f, pre_buffer=False)
            columns = [c for c in ("path", "label") if c in pf.schema_arrow.names]
            if "path" not in columns:
                raise self._missing_path()
            row = 0
            for i in range(pf.metadata.num_row_groups):
                if row + pf.metadata.row_group(i).num_rows <= skip:
                    row += pf.metadata.row_group(i).num_rows
                    continue
                for b in pf.iter_batches(self.chunk_rows, row_groups=[i], columns=columns,
                                         use_threads=False):
                    yield row, pa.Table.from_batches([b])
                    row += b.num_rows

    def _read_csv(self, skip: int) -> Iterator[tuple[int, pa.Table]]:
        import pyarrow.csv as csv

        read = csv.ReadOptions(block_size=min(max(self.chunk_rows * 256, 1 << 16), 1 << 24))
        with self._open() as f:
            names = csv.open_csv(f, read_options=read).schema.names
        if "path" not in names:
            raise self._missing_path()
        # Only path and label are read, as text: the reader fixes a column's type from its
        # first block, and a later block of another column could fail to convert.
        columns = [c for c in ("path", "label") if c in names]
        convert = csv.ConvertOptions(include_columns=columns,
                                     column_types={c: pa.string() for c in columns})
        row = 0
        with self._open() as f:
            for b in csv.open_csv(f, read_options=read, convert_options=convert):
                yield row, pa.Table.from_batches([b])
                row += b.num_rows

    def _read_jsonl(self, skip: int) -> Iterator[tuple[int, pa.Table]]:
        # By hand, not pyarrow.json: that reader refuses a label that is 3 in one row and
        # "cat" in another, and cannot tell a missing `path` key from a null one.
        rows: list[tuple[str | None, str | None]] = []
        row = 0
        with self._open() as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    raise InputError(f"list file {self.url}: line {number} is not a JSON object")
                if row + len(rows) == 0 and "path" not in record:
                    raise self._missing_path()
                p = record.get("path")
                rows.append((None if p is None else str(p), _label_text(record.get("label"))))
                if len(rows) == self.chunk_rows:
                    yield row, _table(rows)
                    row, rows = row + len(rows), []
        if rows:
            yield row, _table(rows)

    def _page(self, t: pa.Table, first_row: int) -> pa.Table:
        paths = t.column("path")
        if not pa.types.is_string(paths.type):
            paths = paths.cast(pa.string())
        urls = [self._resolve(p, first_row + i) for i, p in enumerate(paths.to_pylist())]
        if "label" in t.column_names:
            labels = _labels_text(t.column("label"), self.url)
        else:
            labels = pa.nulls(t.num_rows, pa.string())
        return page(urls, labels)

    def _resolve(self, path: str | None, row: int) -> str:
        if path is None or not path.strip():
            return f"{self.url}#row={row}"
        if _SCHEME.match(path) or path.startswith("/"):
            return path
        if self.storage.is_local:
            return os.path.normpath(os.path.join(self._folder, path))
        return self.storage.to_url(posixpath.normpath(f"{self._folder}/{path}"))


def _label_text(v: Any) -> str | None:
    """A JSON label as text, as `_labels_text` makes an Arrow one."""
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        return str(v).lower()
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _table(rows: list[tuple[str | None, str | None]]) -> pa.Table:
    return pa.table([pa.array(c, pa.string()) for c in zip(*rows)], names=["path", "label"])


def _labels_text(labels: pa.ChunkedArray, url: str) -> pa.ChunkedArray:
    """Labels as text: 3 and 3.0 as "3" (Arrow's cast), "" as null.
    Raises InputError for a type with no text form (lists, structs…)."""
    import pyarrow.compute as pc

    try:
        text = labels.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"list file {url}: its label column, of type {labels.type}, "
                         "cannot be read as text") from None
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
