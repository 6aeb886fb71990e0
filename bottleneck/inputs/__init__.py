"""Where images come from: each kind of INPUT streamed as pages of (url, label) entries
for the plan, and read by workers as samples (`samples.SampleReader`).

- a folder or bucket prefix of image files, listed in parallel (`listing.FolderSource`);
- a list file: Parquet, CSV or JSON lines with a `path` column (`listfile.ListFileSource`);
- an S3 Inventory report's manifest.json (`inventory.InventorySource`);
- WebDataset tar shards, as img2dataset writes them (`webdataset.WebDatasetSource`);
- Parquet tables holding the images, as Hugging Face writes them
  (`parquet_images.ParquetImageSource`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..storage import Storage
from .source import InputError, Source

INPUT_FORMATS = ("auto", "folder", "list", "inventory", "webdataset", "parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(kw_only=True)
class InputOptions:
    """How INPUT is read: the same options for every sharded job (extract, predict)."""

    input_format: str = "auto"
    list_requests: int | None = None  # listing requests in flight; None: by store
    relist: bool = False  # list again and plan what is new (runner)
    prefix: str | None = None  # an inventory report's key prefix
    label_field: str | None = None  # WebDataset: the label is this field of KEY.json
    image_column: str | None = None  # Parquet tables: the column of encoded images
    label_column: str | None = None  # Parquet tables: the label column


def open_source(input_url: str, output_url: str | None, storage_options: dict[str, Any],
                how: InputOptions | None = None, allow_file: bool = False
                ) -> tuple[Source, Storage | None]:
    """INPUT as a Source, of the kind `how.input_format` names or, with "auto", that INPUT is
    (a brace pattern or a .tar: WebDataset; a manifest.json: an inventory report; a .parquet
    file with an image column: a Parquet table; a .parquet/.csv/.jsonl file: a list file;
    a folder holding tars: WebDataset, holding .parquet files and no images: Parquet tables;
    else a folder of images, or with `allow_file` one image), and OUTPUT as Storage. Checks
    only what costs no listing (a folder's kind: one request): INPUT exists and is of that
    kind, unless OUTPUT holds a finished plan of it. Raises UsageError (InputError)."""
    from .inventory import InventorySource
    from .listfile import ListFileSource
    from .listing import FolderSource, open_input, probe_input
    from .webdataset import WebDatasetSource, is_brace_pattern, is_tar

    how = how or InputOptions()
    input_format, list_requests, prefix = how.input_format, how.list_requests, how.prefix
    if input_format not in INPUT_FORMATS:
        raise UsageError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, "
                         f"not {input_format!r}")
    if list_requests is not None and list_requests < 1:
        raise UsageError(f"--list-requests must be at least 1, not {list_requests}")
    brace = is_brace_pattern(input_url)
    source, out = open_input(_first(input_url) if brace else input_url, output_url,
                             storage_options)
    # A rerun reads INPUT as OUTPUT's manifest says it was read; over a finished plan of
    # this INPUT it sends INPUT no request at all.
    url = (input_url if "://" in input_url else os.path.abspath(input_url)) if brace else source.url
    # --overwrite replaces OUTPUT: nothing in it says how to read INPUT.
    replaced = out is None or getattr(how, "overwrite", False)
    recorded, listed, options = (None, False, {}) if replaced else recorded_format(out, url)
    kind = input_format
    if kind == "auto":
        kind = recorded or _detect(input_url, source, storage_options, brace)
    for flag, value, kinds in (("--prefix", prefix, ("inventory",)),
                               ("--label-field", how.label_field, ("webdataset",)),
                               ("--image-column", how.image_column, ("parquet",)),
                               ("--label-column", how.label_column, ("parquet",))):
        if value is not None and kind not in kinds:
            raise UsageError(f"{flag} is for {' or '.join(kinds)} INPUT; INPUT {input_url} "
                             f"is read as {kind} (--input-format sets it)")
    if brace and kind != "webdataset":
        raise UsageError(f"a brace pattern names WebDataset tars; INPUT {input_url} is read "
                         f"as {kind}")
    found = None
    if not listed:  # a brace pattern: its first tar is there
        found = probe_input(source, allow_file or kind != "folder",
                            file_only=brace or kind in ("list", "inventory"))
    if kind == "inventory":
        return InventorySource(source.url, storage_options, prefix or ""), out
    if kind == "list":
        return ListFileSource(source.url, storage_options), out
    if kind == "webdataset":
        if found == "file" and not is_tar(source.url):
            raise InputError(f"a WebDataset INPUT is a folder of .tar files, a .tar or a brace "
                             f"pattern of them, not {source.url}")
        return WebDatasetSource(url, storage_options, how.label_field, list_requests,
                                root_type=found), out
    if kind == "parquet":
        from .parquet_images import ParquetImageSource

        # Columns asked for now that differ from the plan's are chosen afresh, and refused.
        same = all(how_col in (None, options.get(key)) for key, how_col in (
            ("image_column", how.image_column), ("label_column", how.label_column)))
        table = ParquetImageSource(source.url, storage_options, how.image_column,
                                   how.label_column, chosen=options if listed and same else None)
        if not listed:
            table.check()
        return table, out
    return FolderSource(source, list_requests, allow_file=allow_file, root_type=found), out


def _first(pattern: str) -> str:
    from braceexpand import braceexpand

    return next(iter(braceexpand(pattern)))


def _detect(url: str, source: Storage, storage_options: dict[str, Any], brace: bool) -> str:
    """The kind of INPUT by its name, or for a folder by the first names listed in it (one
    request): tars make it WebDataset, Parquet files without images a Parquet table."""
    from .inventory import is_inventory
    from .listfile import is_list_file
    from .listing import first_names
    from .webdataset import is_tar

    if brace or is_tar(url):
        return "webdataset"
    if is_inventory(url):
        return "inventory"
    if url.rstrip("/").lower().endswith(".parquet"):
        from .listing import root_type
        from .parquet_images import is_image_table

        try:
            if root_type(source) == "directory":  # a dataset written as a folder (Spark)
                return "parquet"
            return "parquet" if is_image_table(source.url, storage_options) else "list"
        except FileNotFoundError:
            return "list"  # probe_input says that it is missing
        except Exception as e:  # noqa: BLE001 - a store that keeps failing: one line, exit 2
            raise InputError(f"cannot reach INPUT {source.url}: {e}") from None
    if is_list_file(url):
        return "list"
    try:
        names = [n.lower() for n in first_names(source)]
    except Exception:  # noqa: BLE001 - probe_input says what is wrong with INPUT
        return "folder"
    tars = any(n.endswith(".tar") for n in names)
    images = any(n.endswith(IMAGE_SUFFIXES) for n in names)
    if tars and images:
        raise InputError(f"INPUT {url} holds both .tar files and images: say how to read it "
                         "with --input-format webdataset (the tars) or folder (the images)")
    if tars:
        return "webdataset"
    if any(n.endswith(".parquet") for n in names) and not images:
        return "parquet"
    return "folder"


def recorded_format(out: Storage, input_url: str
                    ) -> tuple[str | None, bool, dict[str, Any]]:
    """The INPUT format OUTPUT's manifest records for `input_url` (None: no manifest of this
    INPUT), whether its plan is finished, and the INPUT options recorded. A manifest made
    before formats were recorded was read by INPUT's name alone (an inventory, a list file,
    else a folder)."""
    from ..runner.manifest import read_manifest
    from ..runner.plan import LISTED, PLAN_DIR
    from .inventory import is_inventory
    from .listfile import is_list_file

    try:
        m = read_manifest(out)
        if m is None or m.input_url != input_url:
            return None, False, {}
        listed = out.exists(PLAN_DIR, LISTED)
    except Exception:  # noqa: BLE001 - unreadable: the checks go on as for a new OUTPUT
        return None, False, {}
    legacy = ("inventory" if is_inventory(input_url)
              else "list" if is_list_file(input_url) else "folder")
    return m.input_format or legacy, listed, m.input_options or {}


__all__ = ["INPUT_FORMATS", "InputError", "InputOptions", "Source", "open_source"]
