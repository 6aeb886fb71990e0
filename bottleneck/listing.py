"""List an INPUT folder or bucket prefix once, into sorted, labelled entries."""

from __future__ import annotations

from .planning import Entry, make_entries
from .storage import Storage, with_retries


class InputError(ValueError):
    """INPUT is missing, empty or not a folder."""


def list_inputs(source: Storage) -> list[Entry]:
    """Every non-hidden file under the root, sorted by path, labelled by its first folder.

    On object stores `find` pages through a flat listing (one request per 1,000 keys on
    S3), never one request per object. Folder placeholders (the empty `name/` keys that
    consoles create) are folders, not inputs.
    Raises InputError when the root is missing or is a file.
    """
    fs = source.fs
    root = source.fresh(source.root)
    if not with_retries(lambda: fs.exists(root), what=f"exists {source.url}"):
        raise InputError(f"INPUT does not exist: {source.url}")
    if with_retries(lambda: fs.isfile(root), what=f"info {source.url}"):
        raise InputError(f"INPUT must be a folder or bucket prefix, not a file: {source.url}")
    found = with_retries(lambda: fs.find(source.fresh(root), withdirs=False, detail=True),
                         what=f"list {source.url}")
    paths = [p for p, info in found.items()
             if not p.endswith("/") and info.get("type", "file") != "directory"]
    return make_entries(root, paths, source.to_url)
