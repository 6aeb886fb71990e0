"""What a worker reads for one shard: the shard's plan entries become samples.

A plan entry is a unit of INPUT: one image file (folders, buckets, list files, inventory
reports), one tar (WebDataset), or one row of a table (Parquet). A `SampleReader` turns a
shard's entries into `Sample`s: the row to report (its URL and label) and a way to get its
encoded image. `images.ShardImages` decodes them, the same way for every kind of INPUT.

Readers are plain picklable data: the job hands its source's reader to the actors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..runner.planning import Entry
    from ..storage import Storage

    StorageFor = Callable[[str], Storage]  # a URL → the Storage that reads it (cached)


@dataclass(frozen=True, slots=True)
class Sample:
    """One image row: `entry.url` names it in the output and `_errors/`, `entry.label` is
    its label, and `load()` returns its encoded bytes or raises images.ImageError(reason)."""

    entry: Entry
    load: Callable[[], bytes]


class SampleReader(Protocol):
    def samples(self, entries: tuple[Entry, ...], storage_for: StorageFor
                ) -> Iterator[Sample]:
        """The samples of a shard's entries, in a deterministic order. A unit that cannot
        be read at all (a missing tar) is one failing sample named by its URL; an error
        that is not the input's fault (a store that keeps failing) is raised, which fails
        the shard so that the runner retries it."""
        ...


def given(data: bytes) -> bytes:
    return data


def failing(reason: str) -> bytes:
    from ..images import ImageError

    raise ImageError(reason)


def loaded(data: bytes) -> Callable[[], bytes]:
    """`load` for bytes already read (a tar member, a table cell)."""
    return partial(given, data)


def failed(reason: str) -> Callable[[], bytes]:
    """`load` for a sample known to be bad before decoding (no image member, null bytes)."""
    return partial(failing, reason)


@dataclass(frozen=True)
class FileReader:
    """One entry, one image file: read on the decode threads, so reads overlap."""

    def samples(self, entries: tuple[Entry, ...], storage_for: StorageFor
                ) -> Iterator[Sample]:
        from ..images import read_file

        for e in entries:
            yield Sample(e, partial(read_file, storage_for(e.url).read_bytes, e.path))
