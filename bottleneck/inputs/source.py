"""What every kind of INPUT gives the runner: a deterministic stream of pages of entries.

A page is an Arrow table of `PAGE_SCHEMA` (url, label). The runner cuts the stream into
shards as it comes and writes them to OUTPUT's plan (`runner/plan.py`), so no source ever
hands over its whole listing, and none is read whole.

A source that stops part-way (a killed job) is resumed from a `Position`: a sorted source
(a listed folder or bucket) lists again only after the last URL already planned; any other
(a list file, an inventory report) skips the entries already planned.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from ..errors import UsageError
from ..storage import is_transient

if TYPE_CHECKING:
    from .samples import SampleReader

PAGE_SCHEMA = pa.schema([("url", pa.string()), ("label", pa.string())])


class InputError(UsageError):
    """INPUT is missing, empty, unreadable or of no kind we read."""


@dataclass(frozen=True)
class Position:
    """How far an earlier, interrupted plan got: entries planned, and the last one's URL."""

    entries: int = 0
    last_url: str | None = None


# Rows of a table INPUT (a list file, an inventory report) read at a time. Each page is
# decoded, made into URLs and cut into shards at once, so its size sets the driver's working
# set: a job over a 1M-row list file peaked at 258 MB with 64k-row pages read on Arrow's
# threads, 253 MB on one thread, 230 MB with 16k-row pages as well (README, Listing).
PAGE_ROWS = 16384

START = Position()  # a source read from its beginning


@dataclass
class ListingStats:
    """What a source has done so far, for the progress bar and the benchmark (read from
    another thread while the listing runs)."""

    requests: int = 0  # listing requests sent (LIST on S3, one directory read locally)
    keys: int = 0  # names seen, before hidden files and folder markers are left out
    extra: dict[str, float] = field(default_factory=dict)


class Source(Protocol):
    url: str  # INPUT's identity, recorded in the manifest
    kind: str  # "folder", "list file", "inventory": what the log says
    format: str  # its --input-format name, recorded in the manifest
    options: dict[str, Any]  # what else changes its rows (a label field), in the manifest
    sorted: bool  # pages come sorted by URL: `--relist` can compare listings by merging
    stats: ListingStats
    reader: SampleReader  # how a worker reads a shard's entries (picklable)
    entries_per_shard: int | None  # entries in a shard when fixed (a tar); else --shard-size

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        """The entries after `after`, in the source's deterministic order, as PAGE_SCHEMA
        tables. Raises InputError for an INPUT that cannot be read."""
        ...


def page(urls: list[str] | pa.Array, labels: list[str | None] | pa.Array) -> pa.Table:
    return pa.table({"url": urls, "label": labels}, schema=PAGE_SCHEMA)


def skip_entries(pages: Iterator[pa.Table], n: int) -> Iterator[pa.Table]:
    """`pages` without its first `n` entries (resuming a source that is not sorted)."""
    for t in pages:
        if n >= t.num_rows:
            n -= t.num_rows
            continue
        yield t.slice(n) if n else t
        n = 0


def one_line(e: BaseException) -> str:
    """An exception as one short line, for an InputError's message."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Errors in the block as InputError("cannot read <what>: …"), except InputErrors and
    transient storage errors (see `is_transient`), which pass as they are."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # filtered just below
        if is_transient(e):
            raise
        raise InputError(f"cannot read {what}: {one_line(e)}") from e
