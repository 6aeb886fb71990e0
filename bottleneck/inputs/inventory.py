"""INPUT as an S3 Inventory report: its `manifest.json`, and the data files it names.

The layout is AWS's (Amazon S3 user guide, "Locating your inventory list"): the manifest
sits at `<dest-prefix>/<source-bucket>/<config-id>/<timestamp>/manifest.json` in the
destination bucket and lists its data files (`files[].key`, keys in that bucket) with their
`fileFormat` (CSV, Parquet or ORC). CSV files are gzipped, have no header, follow the
manifest's `fileSchema` ("Bucket, Key, Size, …") and hold URL-encoded keys (a space as '+').
Parquet and ORC files name their columns (bucket, key, is_latest, is_delete_marker…).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import unquote_plus

import pyarrow as pa

from ..storage import Storage, with_retries
from .listing import labelled_page
from .samples import FileReader
from .source import (
    PAGE_ROWS,
    START,
    InputError,
    ListingStats,
    Position,
    one_line,
    reading,
    skip_entries,
)

FORMATS = ("CSV", "Parquet", "ORC")
COLUMNS = ("key", "is_latest", "is_delete_marker")  # the ones we read
FLAGS = {"islatest", "isdeletemarker"}


def is_inventory(url: str) -> bool:
    """Whether INPUT names an inventory report's manifest (a file named manifest.json)."""
    return url.rstrip("/").rsplit("/", 1)[-1] == "manifest.json"


def _column(name: str) -> str:
    """One spelling for CSV's "IsDeleteMarker" and Parquet's "is_delete_marker"."""
    return name.replace("_", "").replace(" ", "").lower()


@dataclass(frozen=True)
class Manifest:
    source_bucket: str
    destination_bucket: str | None  # the name, without the ARN's "arn:aws:s3:::"
    file_format: str  # one of FORMATS
    csv_columns: tuple[str, ...]  # the CSV files' columns, from fileSchema
    files: tuple[str, ...]  # data file keys in the destination bucket, in manifest order

    @classmethod
    def parse(cls, data: bytes, url: str) -> Manifest:
        """The manifest in `data`; raises InputError (one line naming `url`) for JSON that
        is not an inventory manifest of a format we read."""
        def bad(what: str) -> InputError:
            return InputError(f"inventory manifest {url}: {what}")

        try:
            m = json.loads(data)
        except ValueError as e:
            raise bad(f"not JSON ({one_line(e)})") from None
        if not isinstance(m, dict):
            raise bad("not a JSON object")
        fmt = next((f for f in FORMATS if f.lower() == str(m.get("fileFormat")).lower()), None)
        if fmt is None:
            raise bad(f"fileFormat {m.get('fileFormat')!r} is not one of {', '.join(FORMATS)}")
        files = m.get("files")
        if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("key"), str) and f["key"]
                for f in files):
            raise bad("'files' is not a list of {\"key\": …} objects")
        columns: tuple[str, ...] = ()
        if fmt == "CSV":
            schema = m.get("fileSchema")
            columns = tuple(c.strip() for c in schema.split(",")) if isinstance(schema, str) else ()
            if "key" not in {_column(c) for c in columns}:
                raise bad(f"fileSchema {schema!r} has no Key column")
        source, dest = m.get("sourceBucket"), m.get("destinationBucket")
        if not isinstance(source, str) or not source:
            raise bad("no sourceBucket")
        return cls(source,
                   dest.rsplit(":::", 1)[-1] or None if isinstance(dest, str) else None,
                   fmt, columns, tuple(f["key"] for f in files))


def local_data_path(manifest_path: str, key: str) -> str:
    """Where a data file of a report copied out of its bucket lies, by its key.

    In a copy of the destination bucket (at /x, or from some folder of it down), the
    folder playing the bucket's root is the manifest's ancestor below which the manifest's
    path shares the most leading folders with the key: manifest
    /x/p/src/cfg/2026-11-29T01-00Z/manifest.json and key p/src/cfg/data/a.csv.gz give
    /x/p/src/cfg/data/a.csv.gz. When no ancestor holds the key's first folder (a copy of
    the report from `<config-id>` or `<source-bucket>` down), AWS's layout decides: the
    data files are in `data/` beside the manifest's timestamp folder.
    """
    folders = manifest_path.rstrip("/").split("/")[:-1]
    parts = key.split("/")
    best, root = 0, None
    for i in range(len(folders)):
        shared = 0
        while (shared < len(parts) - 1 and i + shared < len(folders)
               and folders[i + shared] == parts[shared]):
            shared += 1
        if shared and shared >= best:  # a tie goes to the deeper root
            best, root = shared, folders[:i]
    if root is None:
        return "/".join([*folders[:-1], *parts[-2:]])
    return "/".join([*root, *parts])


class InventorySource:
    """The objects an inventory report lists under `prefix` (a folder of the source bucket),
    in report order: data files in manifest order, rows in file order.

    Left out, as when a folder is listed: keys outside the prefix, folder markers (keys
    ending in '/'), hidden keys (a component below the prefix starting with '.'); and,
    in a report of all versions, versions that are not the latest or are delete markers.
    A row's url is s3://<sourceBucket>/<key>; its label is the key's first folder below the
    prefix (None for a key directly in it).

    Data files: with the manifest in S3, s3://<destinationBucket>/<files[].key>, read with
    the same storage options. With it anywhere else (a local copy of the destination bucket,
    or of the report from some folder down), where `local_data_path` finds them.
    Each file is read a block (CSV), row group (Parquet) or stripe (ORC) at a time.

    `pages` raises InputError (one line) for a missing or malformed manifest, and for a data
    file that is missing or unreadable; transient storage errors are raised as they are.
    """

    kind = "inventory"
    format = "inventory"
    reader = FileReader()
    entries_per_shard = None
    sorted = False

    def __init__(self, manifest_url: str, storage_options: dict[str, Any], prefix: str = ""):
        try:
            self.storage = Storage(manifest_url, storage_options)
        except (ValueError, ImportError) as e:
            raise InputError(f"cannot open inventory manifest {manifest_url}: "
                             f"{one_line(e)}") from None
        self.url = self.storage.url
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        # --prefix changes the rows and their labels: a rerun with another is refused.
        self.options: dict[str, Any] = {"prefix": self.prefix} if self.prefix else {}
        self.stats = ListingStats()
        self.batch_rows = PAGE_ROWS  # Parquet rows per batch

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        """The entries after the first `after.entries`, as PAGE_SCHEMA tables."""
        return skip_entries(self._pages(), after.entries)

    def _pages(self) -> Iterator[pa.Table]:
        manifest = self._manifest()
        for key in manifest.files:
            path = self._data_path(manifest, key)
            with reading(f"inventory data file {self.storage.to_url(path)}"):
                yield from self._file_pages(manifest, path)

    def _manifest(self) -> Manifest:
        with reading(f"inventory manifest {self.url}"):
            data = self.storage.read_bytes(self.storage.root)
        self.stats.requests += 1
        return Manifest.parse(data, self.url)

    def _data_path(self, manifest: Manifest, key: str) -> str:
        """The fsspec path of a data file (see the class docstring)."""
        if self.storage.protocol in ("s3", "s3a"):
            if manifest.destination_bucket is None:
                raise InputError(f"inventory manifest {self.url}: no destinationBucket")
            return f"{manifest.destination_bucket}/{key}"
        return local_data_path(self.storage.root, key)

    def _file_pages(self, manifest: Manifest, path: str) -> Iterator[pa.Table]:
        gz = path.lower().endswith(".gz")
        with with_retries(lambda: self.storage.fs.open(path, "rb",
                                                       compression="gzip" if gz else None),
                          what=f"open {path}") as f:
            self.stats.requests += 1
            for t in self._tables(manifest, f, path):
                self.stats.keys += t.num_rows
                entries = self._entries(t, manifest)
                if entries.num_rows:
                    yield entries

    def _tables(self, manifest: Manifest, f: IO[bytes], path: str) -> Iterator[pa.Table]:
        """The data file's blocks, with only COLUMNS, under those names."""
        canonical = {_column(c): c for c in COLUMNS}
        if manifest.file_format == "CSV":
            import pyarrow.csv as csv

            names = [c for c in manifest.csv_columns if _column(c) in canonical]
            # Keys stay text ("0042" is not 42); the flags are "true"/"false".
            types = {c: pa.bool_() if _column(c) in FLAGS else pa.string() for c in names}
            batches: Any = csv.open_csv(
                f, read_options=csv.ReadOptions(column_names=list(manifest.csv_columns)),
                convert_options=csv.ConvertOptions(include_columns=names, column_types=types))
        elif manifest.file_format == "Parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f, pre_buffer=False)  # read as list files are
            names = [c for c in pf.schema_arrow.names if _column(c) in canonical]
            batches = pf.iter_batches(self.batch_rows, columns=names, use_threads=False)
        else:
            import pyarrow.orc as orc

            of = orc.ORCFile(f)
            names = [c for c in of.schema.names if _column(c) in canonical]
            batches = (of.read_stripe(i, columns=names) for i in range(of.nstripes))
        if canonical["key"] not in {_column(c) for c in names}:
            raise InputError(f"inventory data file {self.storage.to_url(path)} has no key "
                             "column")
        for b in batches:
            yield pa.Table.from_batches([b]).rename_columns([canonical[_column(c)] for c in names])

    def _entries(self, t: pa.Table, manifest: Manifest) -> pa.Table:
        """The rows of `t` that are inputs, as a page: the latest versions, not deleted, of
        keys under the prefix, left out and labelled as a listed folder's names are."""
        import pyarrow.compute as pc

        keys = t["key"]
        if manifest.file_format == "CSV":
            keys = pa.array([k if k is None else unquote_plus(k) for k in keys.to_pylist()],
                            pa.string())
        keep = pc.starts_with(keys, self.prefix)
        if "is_latest" in t.column_names:
            keep = pc.and_(keep, pc.fill_null(t["is_latest"], True))
        if "is_delete_marker" in t.column_names:
            keep = pc.and_(keep, pc.invert(pc.fill_null(t["is_delete_marker"], False)))
        below = pc.utf8_slice_codeunits(keys.filter(pc.fill_null(keep, False)), len(self.prefix))
        return labelled_page(below, f"s3://{manifest.source_bucket}/{self.prefix}")
