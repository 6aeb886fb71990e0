"""Where images come from: each kind of INPUT streamed as pages of (url, label) entries.

- a folder or bucket prefix, listed in parallel (`listing.FolderSource`);
- a list file: Parquet, CSV or JSON lines with a `path` column (`listfile.ListFileSource`);
- an S3 Inventory report's manifest.json (`inventory.InventorySource`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..storage import Storage
from .source import InputError, Source

INPUT_FORMATS = ("auto", "folder", "list", "inventory")


@dataclass(kw_only=True)
class InputOptions:
    """How INPUT is read: the same options for every sharded job (extract, predict)."""

    input_format: str = "auto"
    list_requests: int | None = None  # listing requests in flight; None: by store
    relist: bool = False  # list again and plan what is new (runner)
    prefix: str | None = None  # an inventory report's key prefix


def open_source(input_url: str, output_url: str | None, storage_options: dict[str, Any],
                how: InputOptions | None = None, allow_file: bool = False
                ) -> tuple[Source, Storage | None]:
    """INPUT as a Source, of the kind `how.input_format` names or, with "auto", that INPUT is
    (a manifest.json: an inventory report; a .parquet/.csv/.jsonl file: a list file; else a
    folder, or with `allow_file` one image), and OUTPUT as Storage. Checks only what costs
    no listing: INPUT exists and is of that kind, unless OUTPUT holds a finished plan of it.
    Raises UsageError (InputError)."""
    from ..runner.manifest import input_listed
    from .inventory import InventorySource, is_inventory
    from .listfile import ListFileSource, is_list_file
    from .listing import FolderSource, open_input, probe_input

    how = how or InputOptions()
    input_format, list_requests, prefix = how.input_format, how.list_requests, how.prefix
    if input_format not in INPUT_FORMATS:
        raise UsageError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, "
                         f"not {input_format!r}")
    if list_requests is not None and list_requests < 1:
        raise UsageError(f"--list-requests must be at least 1, not {list_requests}")
    kind = input_format
    if kind == "auto":
        kind = ("inventory" if is_inventory(input_url)
                else "list" if is_list_file(input_url) else "folder")
    if prefix is not None and kind != "inventory":
        raise UsageError("--prefix selects keys of an S3 Inventory report; INPUT "
                         f"{input_url} is read as a {kind}")
    source, out = open_input(input_url, output_url, storage_options)
    # A rerun over a finished plan of this INPUT sends INPUT no request at all.
    probe = out is None or not input_listed(out, source.url)
    if probe:
        probe_input(source, allow_file or kind != "folder", file_only=kind != "folder")
    if kind == "inventory":
        return InventorySource(source.url, storage_options, prefix or ""), out
    if kind == "list":
        return ListFileSource(source.url, storage_options), out
    return FolderSource(source, list_requests, allow_file=allow_file), out


__all__ = ["INPUT_FORMATS", "InputError", "InputOptions", "Source", "open_source"]
