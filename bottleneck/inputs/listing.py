"""Where images come from: a folder or bucket prefix, listed into sorted, labelled entries."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from ..runner.planning import Entry, make_entries
from ..storage import Storage, with_retries
from .source import InputError


def open_input(input_url: str, output_url: str | None, storage_options: dict[str, Any],
               allow_file: bool = False) -> tuple[Storage, Storage | None]:
    """INPUT and OUTPUT as Storage, checked: INPUT exists and is reachable, is a folder (or,
    with `allow_file`, a single file), and OUTPUT does not lie inside it (a rerun would
    list OUTPUT as images). Raises UsageError (InputError) saying what is wrong."""
    try:
        source = Storage(input_url, storage_options)
        out = Storage(output_url, storage_options) if output_url else None
    except (ValueError, ImportError) as e:
        raise UsageError(f"cannot open storage: {e}") from None
    try:
        exists = with_retries(lambda: source.fs.exists(source.root), what=f"exists {source.url}")
        is_dir = exists and with_retries(lambda: source.fs.isdir(source.root),
                                         what=f"info {source.url}")
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, DNS…
        raise InputError(f"cannot reach INPUT {source.url}: {e}") from None
    if not exists:
        raise InputError(f"INPUT does not exist: {source.url}")
    if not is_dir and not allow_file:
        raise InputError(f"INPUT must be a folder or bucket prefix, not a file: {source.url}")
    if (out is not None and out.protocol == source.protocol
            and (out.root + "/").startswith(source.root + "/")):
        raise InputError(f"OUTPUT {out.url} must not be inside INPUT {source.url}")
    return source, out


def list_inputs(source: Storage, allow_file: bool = False) -> list[Entry]:
    """Every non-hidden file under the root, sorted by path, labelled by its first folder;
    with `allow_file`, a root that is a single file is that file alone.

    On object stores `find` pages through a flat listing (one request per 1,000 keys on
    S3), never one request per object. Folder placeholders (the empty `name/` keys that
    consoles create) are folders, not inputs.
    Raises InputError when the root is missing, or is a file without `allow_file`.
    """
    fs = source.fs
    root = source.fresh(source.root)
    if not with_retries(lambda: fs.exists(root), what=f"exists {source.url}"):
        raise InputError(f"INPUT does not exist: {source.url}")
    if with_retries(lambda: fs.isfile(root), what=f"info {source.url}"):
        if not allow_file:
            raise InputError(f"INPUT must be a folder or bucket prefix, not a file: {source.url}")
        return make_entries(root.rsplit("/", 1)[0], [root], source.to_url)
    found = with_retries(lambda: fs.find(source.fresh(root), withdirs=False, detail=True),
                         what=f"list {source.url}")
    paths = [p for p, info in found.items()
             if not p.endswith("/") and info.get("type", "file") != "directory"]
    return make_entries(root, paths, source.to_url)
