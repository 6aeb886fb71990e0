"""INPUT as Parquet tables that hold the images themselves, as Hugging Face datasets do: one
.parquet file, or a folder or bucket prefix of them (`data/train-00000-of-00002.parquet`…).

Each table row is one plan entry, named `FILE#row=N`. Planning reads the footers and the
label column only, a row group at a time, never the image bytes; a worker reads only the
row groups of its shard's rows, and only their image column, so neither side ever holds a
whole file.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate, groupby
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa

from ..runner.planning import url_path
from ..storage import Storage, is_transient, with_retries
from .samples import Sample, failed, loaded
from .source import START, InputError, ListingStats, Position, one_line, page, reading

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from ..runner.planning import Entry
    from .samples import StorageFor

LABEL_NAMES = ("label", "labels", "class", "category", "target")  # by preference
ROW = "#row="


def is_hf_image(t: pa.DataType) -> bool:
    """Whether `t` is Hugging Face's Image feature: struct<bytes: binary, path: string>."""
    if not pa.types.is_struct(t):
        return False
    fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return ("bytes" in fields and "path" in fields and _is_binary(fields["bytes"])
            and (pa.types.is_string(fields["path"]) or pa.types.is_large_string(fields["path"])))


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _columns(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema) or "none"


def _open(storage: Storage, path: str) -> IO[bytes]:
    # No read-ahead: Parquet reads exact ranges (footer, column chunks), and s3fs' default
    # cache would fetch up to 50 MiB past each, image bytes included, for a few labels.
    return with_retries(lambda: storage.fs.open(path, "rb", cache_type="none"),
                        what=f"open {path}")


def is_image_table(url: str, storage_options: dict[str, Any]) -> bool:
    """Whether `url` is a .parquet file holding images (a Hugging Face Image column, or a
    binary one and no `path` column of text), not a list file of paths. Reads the footer
    only. False for a file missing or not Parquet (the list file reader then says what is
    wrong); transient storage errors are raised, so that a throttled store does not change
    INPUT's kind."""
    import pyarrow.parquet as pq

    if not url.rstrip("/").lower().endswith(".parquet"):
        return False
    try:
        storage = Storage(url, storage_options)
        with _open(storage, storage.root) as f:
            schema = pq.read_schema(f)
    except Exception as e:  # filtered just below
        if is_transient(e):
            raise
        return False
    if any(is_hf_image(f.type) for f in schema):
        return True
    # A binary column beside a `path` column of text is a list file's checksum, say.
    has_paths = any(f.name == "path" and (pa.types.is_string(f.type)
                                          or pa.types.is_large_string(f.type)) for f in schema)
    return not has_paths and any(_is_binary(f.type) for f in schema)


class ParquetImageSource:
    """The rows of Parquet image tables, file by file in path order, one page per row group:
    url `FILE#row=N` (N from 0 in each file), label the row's label as text.

    - The image column is `image_column`, else the one Hugging Face Image column, else the
      one binary column; the label column is `label_column`, else the first present of
      LABEL_NAMES, else none. Both are chosen on the first file's footer.
    - An integer label with class names in the file's Hugging Face metadata is its class's
      name (-1, HF's "no label", is null); one without is its number; "" is no label.

    Nothing is read until `check()`, `pages()`, `options` or `reader` needs it. Raises
    InputError (one line) for no .parquet file, no image column or several, a named column
    missing, a file missing a chosen column or not Parquet, a label with no text form or
    past its class names; transient storage errors are raised as they are.
    """

    kind = "parquet table"
    format = "parquet"
    sorted = False
    entries_per_shard = None

    def __init__(self, url: str, storage_options: dict[str, Any],
                 image_column: str | None = None, label_column: str | None = None,
                 chosen: dict[str, Any] | None = None):
        """`chosen`: the columns a finished plan of this INPUT was read with (its manifest's
        options), so that `options` and `reader` need no request to INPUT."""
        try:
            self.storage = Storage(url, storage_options)
        except (ValueError, ImportError) as e:
            raise InputError(f"cannot open parquet table {url}: {one_line(e)}") from None
        self.url = self.storage.url
        self.image_column, self.label_column = image_column, label_column
        self.stats = ListingStats()
        self._files: list[str] | None = None  # set by check(), with the three below
        self._image = ""
        self._label: str | None = None
        self._names: list[str] | None = None  # the label's class names in the first file
        self._chosen = dict(chosen) if chosen and chosen.get("image_column") else None

    @property
    def options(self) -> dict[str, Any]:
        """The columns read, as chosen (recorded in the manifest)."""
        if self._chosen is not None:
            return dict(self._chosen)
        self.check()
        return {"image_column": self._image, "label_column": self._label}

    @property
    def reader(self) -> ParquetRowReader:
        return ParquetRowReader(self.options["image_column"])

    def check(self) -> None:
        """List the files and choose the columns on the first one's footer (once only).
        Raises InputError."""
        if self._files is not None:
            return
        with reading(f"parquet table {self.url}"):
            root = self.storage.root
            found = with_retries(lambda: self.storage.fs.find(self.storage.fresh(root)),
                                 what=f"list {self.url}")
            self.stats.requests += 1
            self.stats.keys += len(found)
            # INPUT itself is read whatever its name; below it, .parquet files not hidden
            # (`_SUCCESS`, `.crc`, `_delta_log/` are a writer's bookkeeping).
            files = sorted(p for p in found if p == root or (
                p.lower().endswith(".parquet")
                and not any(n[:1] in "._" for n in p[len(root):].split("/") if n)))
            if not files:
                raise InputError(f"no .parquet files in {self.url}")
            with _open(self.storage, files[0]) as f:
                schema = self._parquet(f, files[0]).schema_arrow
            self._image = self._choose_image(schema, files[0])
            self._label = self._choose_label(schema, files[0])
            self._names = _class_names(schema, self._label)
            self._files = files

    def _parquet(self, f: IO[bytes], path: str) -> pq.ParquetFile:
        import pyarrow.parquet as pq

        self.stats.requests += 1
        try:
            return pq.ParquetFile(f)
        except pa.ArrowInvalid as e:
            raise InputError(f"{self.storage.to_url(path)} is not a Parquet file: "
                             f"{one_line(e)}") from None

    def _missing(self, name: str, schema: pa.Schema, path: str) -> InputError:
        return InputError(f"{self.storage.to_url(path)} has no column {name!r} "
                          f"(columns: {_columns(schema)})")

    def _choose_image(self, schema: pa.Schema, path: str) -> str:
        if self.image_column is not None:
            if self.image_column not in schema.names:
                raise self._missing(self.image_column, schema, path)
            t = schema.field(self.image_column).type
            if not (is_hf_image(t) or _is_binary(t)):
                raise InputError(f"column {self.image_column!r} of {self.url} is {t}, not "
                                 "images (a binary column or Hugging Face Image struct)")
            return self.image_column
        for is_image in (is_hf_image, _is_binary):  # an Image struct wins over raw bytes
            found = [f.name for f in schema if is_image(f.type)]
            if len(found) == 1:
                return found[0]
            if found:
                raise InputError(f"{self.url} has several image columns ({', '.join(found)})"
                                 "; pass --image-column to choose one")
        raise InputError(f"{self.url} has no image column, binary or Hugging Face Image "
                         f"(columns: {_columns(schema)}); pass --image-column")

    def _choose_label(self, schema: pa.Schema, path: str) -> str | None:
        name = self.label_column
        if name is not None and name not in schema.names:
            raise self._missing(name, schema, path)
        name = name or next((n for n in LABEL_NAMES if n in schema.names), None)
        if name is not None:
            t = schema.field(name).type
            if pa.types.is_nested(t) or _is_binary(t):
                raise InputError(f"label column {name!r} of {self.url} is {t}, which has no "
                                 "text form; pass --label-column to choose another")
        return name

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        """Entries after the first `after.entries` rows, as PAGE_SCHEMA tables. Files and
        row groups among those rows are skipped by their footer's counts, unread."""
        self.check()
        with reading(f"parquet table {self.url}"):
            yield from self._pages(after.entries)

    def _pages(self, skip: int) -> Iterator[pa.Table]:
        assert self._files is not None
        for path in self._files:
            url = self.storage.to_url(path)
            with _open(self.storage, path) as f:
                pf = self._parquet(f, path)
                if pf.metadata.num_rows <= skip:
                    skip -= pf.metadata.num_rows
                    continue
                for name in (self._image, self._label):
                    if name is not None and name not in pf.schema_arrow.names:
                        raise self._missing(name, pf.schema_arrow, path)
                names = _class_names(pf.schema_arrow, self._label) or self._names
                first = 0  # the row group's first row in the file
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    start, skip = min(skip, n), max(0, skip - n)
                    if start < n:
                        labels = self._labels(pf, g, n, names, url).slice(start)
                        yield page([f"{url}{ROW}{r}" for r in range(first + start, first + n)],
                                   labels)
                    first += n

    def _labels(self, pf: pq.ParquetFile, group: int, n: int, names: list[str] | None,
                url: str) -> pa.Array:
        """The row group's labels as text (nulls without a label column)."""
        import pyarrow.compute as pc

        self.stats.keys += n
        if self._label is None:
            return pa.nulls(n, pa.string())
        self.stats.requests += 1
        label = self._label
        column = with_retries(lambda: pf.read_row_group(group, columns=[label]),
                              what=f"read {url}").column(0).combine_chunks()
        if pa.types.is_integer(column.type) and names is not None:
            low, high = (s.as_py() for s in pc.min_max(column).values())
            if low is not None and (low < -1 or high >= len(names)):
                raise InputError(f"{url}: label {low if low < -1 else high} in column "
                                 f"{label!r} is not one of its {len(names)} classes")
            index = pc.if_else(pc.equal(column, -1), pa.scalar(None, column.type), column)
            return pc.take(pa.array(names, pa.string()), index)
        try:
            text = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"{url}: label column {label!r} of type {column.type} "
                             "cannot be read as text") from None
        return pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)


def _class_names(schema: pa.Schema, label: str | None) -> list[str] | None:
    """The label's class names in the schema's Hugging Face metadata (a ClassLabel), if any."""
    try:
        feature = json.loads(schema.metadata[b"huggingface"])["info"]["features"][label]
        if feature["_type"] == "ClassLabel" and isinstance(feature["names"], list):
            return [str(n) for n in feature["names"]]
    except (KeyError, TypeError, ValueError):
        pass  # no metadata, or not of this shape: labels are their numbers
    return None


@dataclass(frozen=True)
class ParquetRowReader:
    """A shard's entries `FILE#row=N` → the bytes in `image_column` of those rows."""

    image_column: str

    def samples(self, entries: tuple[Entry, ...], storage_for: StorageFor
                ) -> Iterator[Sample]:
        """One sample per entry, in entry order. A file is opened once per run of its
        entries, and only the row groups holding them are read, one held at a time. A row
        that is null, holds no bytes or lies past the file's end, and the rows of a file
        missing, not Parquet or without the column, are failing samples; other errors
        (a store that keeps failing) are raised, so the runner retries the shard."""
        for file, run in groupby(entries, key=lambda e: e.url.rsplit(ROW, 1)[0]):
            yield from self._file_samples(file, tuple(run), storage_for(file))

    def _file_samples(self, file: str, entries: tuple[Entry, ...], storage: Storage
                      ) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        done = 0
        try:
            with _open(storage, url_path(file)) as f:
                pf = pq.ParquetFile(f)
                if self.image_column not in pf.schema_arrow.names:
                    raise KeyError(f"no column {self.image_column!r}")
                for s in self._rows(pf, entries):
                    yield s
                    done += 1
        except (FileNotFoundError, IsADirectoryError, PermissionError, KeyError,
                pa.ArrowInvalid) as e:
            # The file's fault: its rows not yet given become error rows, rather than a
            # shard that fails on every retry.
            reason = f"cannot read table: {one_line(e)}"
            for rest in entries[done:]:
                yield Sample(rest, failed(reason))

    def _rows(self, pf: pq.ParquetFile, entries: tuple[Entry, ...]) -> Iterator[Sample]:
        ends = list(accumulate(pf.metadata.row_group(g).num_rows
                               for g in range(pf.metadata.num_row_groups)))
        rows = ends[-1] if ends else 0
        group, first, cells = -1, 0, None  # the one row group held: its image cells
        for e in entries:
            row = int(e.url.rsplit(ROW, 1)[1])
            if not 0 <= row < rows:
                yield Sample(e, failed(f"row {row} is past the table's end ({rows} rows)"))
                continue
            if cells is None or not first <= row < ends[group]:
                cells = None  # let the row group held go before reading the next
                group = bisect_right(ends, row)
                first = ends[group - 1] if group else 0
                try:
                    cells = with_retries(lambda g=group: pf.read_row_group(
                        g, columns=[self.image_column]).column(0), what=f"read {e.url}")
                except (OSError, pa.ArrowException) as err:
                    if is_transient(err):
                        raise
                    # A corrupt row group (a bad page, a bad codec block): its rows only.
                    cells = _Broken(f"unreadable row group {group}: {one_line(err)}")
            if isinstance(cells, _Broken):
                yield Sample(e, failed(cells.reason))
                continue
            yield Sample(e, _cell_load(cells[row - first].as_py()))


@dataclass(frozen=True)
class _Broken:
    reason: str


def _cell_load(cell: Any) -> Callable[[], bytes]:
    """`load` for one image cell: Hugging Face's {bytes, path} struct, or plain bytes."""
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return loaded(cell["bytes"])
        if cell.get("path"):
            return failed(f"no image bytes (path only: {cell['path']})")
        return failed("null image")
    return failed("null image") if cell is None else loaded(cell)
