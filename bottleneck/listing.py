"""List an INPUT folder or bucket prefix once, into sorted, labelled entries."""

from __future__ import annotations

from .planning import Entry, make_entries
from .storage import Storage, with_retries


class InputError(ValueError):
    """INPUT is missing, empty or not a folder."""


def list_inputs(source: Storage) -> list[Entry]:
    """Every non-hidden file under the root, sorted by path.

    On object stores `find` pages through the listing (one request per 1000 keys on S3),
    never one request per object.
    """
    fs, root = source.fs, source.root
    if not with_retries(lambda: fs.exists(root)):
        raise InputError(f"INPUT does not exist: {source.url}")
    if with_retries(lambda: fs.isfile(root)):
        raise InputError(f"INPUT must be a folder or bucket prefix, not a file: {source.url}")
    paths = with_retries(lambda: fs.find(root, withdirs=False))
    return make_entries(root, paths, source.to_url)
