"""A folder or bucket prefix as INPUT: listed in parallel into sorted, labelled pages.

A row's label is its first folder level under INPUT (flow_from_directory's layout; files
directly in INPUT have none). Hidden files and folders (a name starting with '.') and the
empty `name/` keys that consoles create for folders are not inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UsageError
from ..runner.planning import Entry, url_path
from ..storage import Storage, with_retries
from .bucket_listing import PAGE_KEYS, BucketLister, ListFn, ListPage
from .samples import FileReader
from .source import START, InputError, ListingStats, Position, page
from .tree_listing import TreeLister, fsspec_dir_reader, read_local_dir

# Listing requests in flight: S3 answers a LIST in 30-100 ms, so 64 keep one driver busy
# (README, Listing). Directory reads on a local disk gain little past 16.
DEFAULT_LIST_REQUESTS = 64
LOCAL_LIST_REQUESTS = 16


def open_input(input_url: str, output_url: str | None, storage_options: dict[str, Any]
               ) -> tuple[Storage, Storage | None]:
    """INPUT and OUTPUT as Storage, with no request sent: OUTPUT must not lie inside INPUT
    (a rerun would list OUTPUT as images). Raises UsageError (InputError) saying what is
    wrong; `probe_input` checks that INPUT is there."""
    try:
        source = Storage(input_url, storage_options)
        out = Storage(output_url, storage_options) if output_url else None
    except (ValueError, ImportError) as e:
        raise UsageError(f"cannot open storage: {e}") from None
    if (out is not None and out.protocol == source.protocol
            and (out.root + "/").startswith(source.root + "/")):
        raise InputError(f"OUTPUT {out.url} must not be inside INPUT {source.url}")
    return source, out


def root_type(source: Storage) -> str | None:
    """"file" or "directory", or None when INPUT's root does not exist: one HEAD on S3 (and
    for a prefix one LIST of one key), never a listing of the prefix, however large."""
    try:
        info = with_retries(lambda: source.fs.info(source.fresh(source.root)),
                            what=f"info {source.url}")
    except FileNotFoundError:
        return None
    return "directory" if info.get("type") == "directory" else "file"


def probe_input(source: Storage, allow_file: bool, file_only: bool = False) -> str:
    """INPUT exists, is reachable, and is a folder (or, with `allow_file`, a file; with
    `file_only`, a file). Returns what it is, "file" or "directory"; raises InputError."""
    try:
        kind = root_type(source)
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, DNS…
        raise InputError(f"cannot reach INPUT {source.url}: {e}") from None
    if kind is None:
        raise InputError(f"INPUT does not exist: {source.url}")
    if file_only and kind == "directory":
        raise InputError(f"INPUT must be a file here, not a folder: {source.url}")
    if kind == "file" and not allow_file:
        raise InputError(f"INPUT must be a folder or bucket prefix, not a file: {source.url}")
    return kind


def labelled_page(relative: list[str] | pa.Array, url_prefix: str) -> pa.Table:
    """A page from names relative to INPUT: hidden names and folder markers left out, the
    first folder level as label, `url_prefix + name` as URL."""
    rel = relative if isinstance(relative, pa.Array) else pa.array(relative, pa.string())
    keep = pc.and_(pc.invert(pc.ends_with(rel, "/")),
                   pc.invert(pc.match_substring_regex(rel, r"(^|/)\.")))
    rel = rel.filter(pc.and_(keep, pc.greater(pc.utf8_length(rel), 0)))
    label = pc.struct_field(pc.extract_regex(rel, r"^(?P<label>[^/]+)/"), [0])
    return page(pc.binary_join_element_wise(url_prefix, rel, ""), label)


class FolderSource:
    """Every file under a folder or bucket prefix, in path order, listed `requests` at a
    time; with `allow_file`, a root that is one file is that file alone (predict)."""

    kind = "folder"
    format = "folder"
    options: dict[str, Any] = {}
    reader = FileReader()
    entries_per_shard = None
    sorted = True

    def __init__(self, source: Storage, requests: int | None = None, allow_file: bool = False,
                 list_page: ListFn | None = None, root_type: str | None = None):
        """`list_page` lists through that ListObjectsV2 function (keys relative to the
        root) instead of the store's own listing: the listing benchmark's timed store.
        `root_type` is what `probe_input` found the root to be, if it was just asked."""
        self.root_type = root_type
        self.storage = source
        self.list_page = list_page
        self.url = source.url
        self.requests = requests or (LOCAL_LIST_REQUESTS if source.is_local
                                     else DEFAULT_LIST_REQUESTS)
        self.allow_file = allow_file
        self.stats = ListingStats()

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        s = self.storage
        kind = self.root_type or root_type(s)
        if kind is None:
            raise InputError(f"INPUT does not exist: {s.url}")
        if kind == "file":
            if not self.allow_file:
                raise InputError(f"INPUT must be a folder or bucket prefix, not a file: {s.url}")
            if after.entries == 0:
                yield page([s.url], [None])
            return
        url_prefix = s.url.rstrip("/") + "/"
        start = None
        if after.last_url is not None:
            start = after.last_url[len(url_prefix):]
        for names in self._names(start):
            self.stats.keys += len(names)
            yield labelled_page(names, url_prefix)

    def _names(self, start_after: str | None) -> Iterator[pa.Array]:
        """Pages of names relative to the root, sorted, after `start_after` (relative)."""
        s = self.storage
        if s.protocol in ("s3", "s3a") or self.list_page is not None:
            bucket, _, key = s.root.partition("/")
            prefix = f"{key}/" if key else ""
            if self.list_page is not None:
                list_page, prefix = self.list_page, ""
            else:
                list_page = s3_list_page(s, bucket, self.requests)
            lister = BucketLister(list_page, prefix, self.requests)
            n = len(prefix)
            first = None if start_after is None else prefix + start_after
            for keys in self._counted(lister, lister.pages(first)):
                yield pc.utf8_slice_codeunits(keys, n) if n else keys
            return
        read = read_local_dir if s.is_local else fsspec_dir_reader(s.fs)
        tree = TreeLister(read, self.requests)
        n = len(s.root) + 1
        first = None if start_after is None else f"{s.root}/{start_after}"
        for paths in self._counted(tree, tree.pages(s.root, first)):
            yield pc.utf8_slice_codeunits(pa.array(paths, pa.string()), n)

    def _counted(self, lister: Any, pages: Iterator[Any]) -> Iterator[Any]:
        for p in pages:
            self.stats.requests = lister.requests
            yield p
        self.stats.requests = lister.requests


def s3_list_page(source: Storage, bucket: str, requests: int) -> Any:
    """ListObjectsV2 through s3fs' botocore client (its retry policy and credentials), with
    a connection pool as large as the requests in flight."""
    config = dict(source.options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", requests)
    options = {**source.options, "config_kwargs": config}
    if not {"session", "profile"} & options.keys():
        options["session"] = keys_only_session()
    fs = Storage(source.url, options).fs

    def list_page(prefix: str, start_after: str | None, delimiter: str | None) -> ListPage:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_KEYS}
        if start_after:
            kw["StartAfter"] = start_after
        if delimiter:
            kw["Delimiter"] = delimiter
        r = with_retries(lambda: fs.call_s3("list_objects_v2", **kw),
                         what=f"list s3://{bucket}/{prefix}")
        return ListPage([c["Key"] for c in r.get("Contents", ())],
                        [c["Prefix"] for c in r.get("CommonPrefixes", ())],
                        bool(r.get("IsTruncated")))
    return list_page


def keys_only_session() -> Any:
    """An aiobotocore session whose answers keep their dates as text. Keys are all the
    listing reads, and botocore's date parsing of each LastModified is most of its CPU per
    page (37 of 52 ms per 1,000 keys, measured here), all of it under the GIL."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session


def first_names(source: Storage, limit: int = PAGE_KEYS) -> list[str]:
    """Up to `limit` names under `source`'s root, the first in path order (one LIST on a
    bucket; locally, folders walked until there are enough), to tell what kind of files
    INPUT holds. Empty when INPUT is missing or holds nothing."""
    if source.protocol in ("s3", "s3a"):
        bucket, _, key = source.root.partition("/")
        keys = s3_list_page(source, bucket, 1)(f"{key}/" if key else "", None, None).keys
        return keys[:limit]
    if source.is_local:
        names: list[str] = []
        for _folder, dirs, files in os.walk(source.root):
            dirs.sort()
            names += sorted(files)
            if len(names) >= limit:
                break
        return names[:limit]
    return list(source.fs.find(source.root, maxdepth=2))[:limit]


def list_inputs(source: Storage, allow_file: bool = False, requests: int | None = None
                ) -> list[Entry]:
    """The whole listing at once, as entries (small INPUTs and tests; jobs stream pages).
    Raises InputError when the root is missing, or is a file without `allow_file`."""
    out = []
    for t in FolderSource(source, requests, allow_file=allow_file).pages():
        for url, label in zip(t.column("url").to_pylist(), t.column("label").to_pylist()):
            out.append(Entry(path=url_path(url), url=url, label=label))
    return out
