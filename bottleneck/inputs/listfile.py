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

from ..storage import Storage, is_transient, with_retries
from .source import InputError, ListingStats, Position, page

FORMATS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv", ".jsonl": "jsonl",
           ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".ndjson.gz": "jsonl"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
START = Position()


def list_format(url: str) -> str | None:
    """"parquet", "csv" or "jsonl" by the name's extension (any case); None for any other."""
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((f for ext, f in FORMATS.items() if name.endswith(ext)), None)


def is_list_file(url: str) -> bool:
    """Whether INPUT names a list file we read (by its extension alone; nothing is opened)."""
    return list_format(url) is not None


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


class ListFileSource:
    """The rows of a list file, in file order, as pages of at most `chunk_rows` entries.

    - `path` may hold absolute URLs (s3://bucket/k.jpg), absolute local paths (kept as they
      are), or relative paths, resolved against the list file's folder (a full URL for a
      list in a bucket, an absolute path for a local one). That resolved name is the url.
    - `label`, when present, is read as text (3 → "3"; a float column of whole numbers, as
      pandas writes ints with gaps, → "3"); an empty or null label is no label.
    - A row whose path is null or blank is kept, with the url `<list file>#row=<i>` (i: the
      data row's index from 0): reading it fails, so it becomes an error row of the output
      instead of an image silently missing.

    `pages` raises InputError (one line, naming the file) for an unsupported extension, a
    missing file, a file that is not of its format, a missing `path` column or a malformed
    JSON line. Transient storage errors are raised as they are.
    """

    kind = "list file"
    sorted = False

    def __init__(self, url: str, storage_options: dict[str, Any], chunk_rows: int = 65536):
        self.format = list_format(url)
        if self.format is None:
            raise InputError(f"list file {url}: unsupported extension; expected one of "
                             f"{', '.join(FORMATS)}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, not {chunk_rows}")
        try:
            self.storage = Storage(url, storage_options)
        except (ValueError, ImportError) as e:
            raise InputError(f"cannot open list file {url}: {_one_line(e)}") from None
        self.url = self.storage.url
        self.chunk_rows = chunk_rows
        self.stats = ListingStats()
        self._folder = posixpath.dirname(self.storage.root)

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        """Entries after the first `after.entries` rows, as PAGE_SCHEMA tables."""
        try:
            yield from self._pages(after.entries)
        except InputError:
            raise
        except Exception as e:  # filtered just below
            if is_transient(e):
                raise
            raise InputError(f"cannot read list file {self.url}: {_one_line(e)}") from e

    def _pages(self, skip: int) -> Iterator[pa.Table]:
        for first, t in self._read(skip):
            self.stats.requests += 1
            self.stats.keys += t.num_rows
            if first + t.num_rows <= skip:
                continue
            if first < skip:
                t, first = t.slice(skip - first), skip
            for start in range(0, t.num_rows, self.chunk_rows):
                yield self._page(t.slice(start, self.chunk_rows), first + start)

    def _open(self) -> IO[bytes]:
        gz = self.storage.root.lower().endswith(".gz")
        return with_retries(
            lambda: self.storage.fs.open(self.storage.root, "rb",
                                         compression="gzip" if gz else None),
            what=f"open {self.url}")

    def _read(self, skip: int) -> Iterator[tuple[int, pa.Table]]:
        """(index of its first row, table with a `path` and maybe a `label` column), in file
        order; tables wholly among the first `skip` rows may be left out unread."""
        if self.format == "parquet":
            yield from self._read_parquet(skip)
            return
        row = 0
        for t in self._read_csv() if self.format == "csv" else self._read_jsonl():
            yield row, t
            row += t.num_rows

    def _missing_path(self) -> InputError:
        return InputError(f"list file {self.url} has no 'path' column")

    def _read_parquet(self, skip: int) -> Iterator[tuple[int, pa.Table]]:
        import pyarrow.parquet as pq

        with self._open() as f:
            pf = pq.ParquetFile(f)
            columns = [c for c in ("path", "label") if c in pf.schema_arrow.names]
            if "path" not in columns:
                raise self._missing_path()
            row = 0
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if row + n > skip:  # row groups wholly before `skip` are not read at all
                    for b in pf.iter_batches(self.chunk_rows, row_groups=[i], columns=columns):
                        yield row, pa.Table.from_batches([b])
                        row += b.num_rows
                else:
                    row += n

    def _read_csv(self) -> Iterator[pa.Table]:
        import pyarrow.csv as csv

        read = csv.ReadOptions(block_size=min(max(self.chunk_rows * 256, 1 << 16), 1 << 24))
        with self._open() as f:
            names = csv.open_csv(f, read_options=read).schema.names
        if "path" not in names:
            raise self._missing_path()
        # Only path and label are read: the reader fixes a column's type from its first
        # block, and a later block of another column could fail to convert.
        columns = [c for c in ("path", "label") if c in names]
        convert = csv.ConvertOptions(include_columns=columns,
                                     column_types={c: pa.string() for c in columns})
        with self._open() as f:
            for b in csv.open_csv(f, read_options=read, convert_options=convert):
                yield pa.Table.from_batches([b])

    def _read_jsonl(self) -> Iterator[pa.Table]:
        # By hand, not pyarrow.json: that reader refuses a label that is 3 in one row and
        # "cat" in another, and cannot tell a missing `path` key from a null one.
        paths: list[str | None] = []
        labels: list[str | None] = []
        first = True
        with self._open() as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise InputError(f"list file {self.url}: line {number} is not JSON") from None
                if not isinstance(record, dict):
                    raise InputError(f"list file {self.url}: line {number} is not a JSON object")
                if first and "path" not in record:
                    raise self._missing_path()
                first = False
                p = record.get("path")
                paths.append(None if p is None else str(p))
                labels.append(_label_text(record.get("label")))
                if len(paths) == self.chunk_rows:
                    yield _path_label_table(paths, labels)
                    paths, labels = [], []
        if paths:
            yield _path_label_table(paths, labels)

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
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _path_label_table(paths: list[str | None], labels: list[str | None]) -> pa.Table:
    return pa.table({"path": pa.array(paths, pa.string()), "label": pa.array(labels, pa.string())})


def _labels_text(labels: pa.ChunkedArray, url: str) -> pa.ChunkedArray:
    """Labels as text: ints (and floats that are all whole numbers) as digits; "" as null.
    Raises InputError for a type with no text form (lists, structs…)."""
    import pyarrow.compute as pc

    if pa.types.is_floating(labels.type):
        try:
            labels = labels.cast(pa.int64())  # a safe cast: fails on 3.5, keeps 3.0 → 3
        except pa.ArrowInvalid:
            pass
    try:
        text = labels.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise InputError(f"list file {url}: its label column, of type {labels.type}, "
                         "cannot be read as text") from None
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
