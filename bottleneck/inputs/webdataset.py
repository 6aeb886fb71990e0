"""WebDataset INPUT: tar shards as img2dataset writes them (`00000.tar` holding `KEY.jpg`,
and optionally `KEY.txt`, `KEY.json`, `KEY.cls`).

The plan's unit is the tar: one tar, one shard. INPUT is a folder or bucket prefix (its
`*.tar` files, listed like any folder), a brace pattern (`s3://b/laion/{00000..00999}.tar`,
expanded with `braceexpand`, the library WebDataset itself uses), or one `.tar`.

A worker streams each tar from storage in blocks (`TAR_BLOCK` bytes a read: never whole on
disk nor in memory) and groups its members by key: the name up to the first dot of its
base name, as WebDataset does. A row is named `TARURL#KEY`. What cannot be read costs only
itself, each loss an error row: a sample with no image, a duplicate key, a member cut
short, a broken header (and everything after it, named by the tar's URL).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from ..runner.planning import Entry, url_path
from ..storage import Storage, is_transient
from .listing import FolderSource
from .samples import Sample, failed, loaded
from .source import START, ListingStats, Position, page

if TYPE_CHECKING:
    from .samples import StorageFor

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TAR_BLOCK = 8 * 2**20  # bytes a storage read asks for: 8 MiB, a few requests a tar
_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def is_brace_pattern(url: str) -> bool:
    return bool(_BRACES.search(url))


def is_tar(url: str) -> bool:
    return url.lower().endswith(".tar")


class WebDatasetSource:
    """The tars of INPUT, one plan entry each, in path order (a brace pattern: its order)."""

    kind = "webdataset tars"
    format = "webdataset"
    entries_per_shard = 1

    def __init__(self, url: str, storage_options: dict[str, Any],
                 label_field: str | None = None, list_requests: int | None = None,
                 root_type: str | None = None):
        """`root_type`: what INPUT's root was just found to be (`listing.probe_input`)."""
        self.options = {"label_field": label_field} if label_field else {}
        self.reader = TarReader(label_field)
        self.stats = ListingStats()
        self._folder: FolderSource | None = None
        self._urls: list[str] = []
        if is_brace_pattern(url):
            from braceexpand import braceexpand

            self._urls = [u if "://" in u else os.path.abspath(u) for u in braceexpand(url)]
            self.url = url if "://" in url else os.path.abspath(url)
        elif is_tar(url):
            one = Storage(url, storage_options)
            self._urls, self.url = [one.url], one.url
        else:
            self._folder = FolderSource(Storage(url, storage_options), list_requests,
                                        root_type=root_type)
            self.stats = self._folder.stats
            self.url = self._folder.url
        self.sorted = self._folder is not None

    def pages(self, after: Position = START) -> Iterator[pa.Table]:
        if self._folder is None:
            urls = self._urls[after.entries:]
            for i in range(0, len(urls), 1000):
                yield page(urls[i:i + 1000], [None] * len(urls[i:i + 1000]))
            return
        # Other files (img2dataset's .parquet and _stats.json beside each tar) are left out.
        for p in self._folder.pages(after):
            tars = p.filter(pc.ends_with(pc.utf8_lower(p.column("url")), ".tar"))
            yield page(tars.column("url"), pa.nulls(tars.num_rows, pa.string()))


@dataclass(frozen=True)
class TarReader:
    """Reads the samples of a shard's tars; picklable, for the actors."""

    label_field: str | None = None

    def samples(self, entries: tuple[Entry, ...], storage_for: StorageFor
                ) -> Iterator[Sample]:
        for e in entries:
            yield from self.tar_samples(e.url, storage_for(e.url))

    def tar_samples(self, url: str, store: Storage) -> Iterator[Sample]:
        path = url_path(url)
        try:
            f = store.fs.open(path, "rb", **({} if store.is_local else {"block_size": TAR_BLOCK}))
        except FileNotFoundError:
            yield _lost(url, "tar not found")
            return
        except PermissionError:
            yield _lost(url, "tar not readable: permission denied")
            return
        with f:
            yield from read_tar(f, url, self.label_field)


def _lost(url: str, reason: str) -> Sample:
    return Sample(Entry("", url, None), failed(reason))


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: split at the first dot of the base
    name; the extension is lower-cased."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def read_tar(f: IO[bytes], url: str, label_field: str | None = None) -> Iterator[Sample]:
    """The samples of one tar read from `f` in order, with every loss as a failing sample.

    Holds one sample's members at a time (the decode pipeline ahead of the model holds a
    few batches more). Errors of the store (a connection lost mid-tar) propagate: the shard
    is then retried whole."""
    size = f.seek(0, 2)
    f.seek(0)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
        yield _lost(url, f"not a tar file ({e})" if size else "empty tar file")
        return
    group = _Group(url, label_field)
    seen = _Seen()
    last = ""
    problem = None
    while problem is None:
        try:
            member = tar.next()
        except tarfile.ReadError as e:  # the previous member's data ends past the file
            problem = f"tar cut short after {last!r} ({e})"
            break
        tar.members = []  # tarfile keeps every header read; a tar may hold 100k members
        if member is None:
            problem = _end_problem(f, tar.offset, size, last)
            break
        last = member.name
        if not member.isfile():
            continue
        key, ext = split_key(member.name)
        if not ext or not posixpath.basename(key):
            # No key: a hidden file (macOS tar's `._KEY.jpg` beside `KEY.jpg`), which
            # WebDataset skips too; as a group of its own it would split its neighbour.
            continue
        if key == group.key and ext in group.members:
            yield Sample(Entry("", f"{url}#{key}@{member.offset}", None), failed(
                f"duplicate member {member.name!r} at byte {member.offset}: the first is kept"))
            continue
        if key != group.key:
            yield from group.flush(seen)
            group = _Group(url, label_field, key, member.offset)
        if ext in IMAGE_EXTS or ext == "cls" or (ext == "json" and label_field):
            try:
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
            except tarfile.ReadError as e:
                problem = f"tar cut short inside {member.name!r} ({e})"
            except OSError as e:
                if is_transient(e):
                    raise
                problem = f"unreadable member {member.name!r}: {e}"
            else:
                group.members[ext] = data
        else:
            group.members[ext] = b""  # present, not needed
    if problem is None:
        yield from group.flush(seen)
    elif group.key and group.whole(seen):
        # The open sample has its image and its label: what is lost is what followed.
        yield from group.flush(seen)
        yield _lost(url, f"{problem}; the rest of the tar is lost")
    elif group.key:
        # The open sample may have lost members (its label, say): one error row for it,
        # saying that what followed in the tar is lost too.
        group.cut = f"{problem}; this sample and the rest of the tar are lost"
        yield from group.flush(seen)
    else:
        yield _lost(url, problem)


def _end_problem(f: IO[bytes], offset: int, size: int, last: str) -> str | None:
    """Why the tar ended where tarfile stopped, when it is not its end-of-archive marker:
    tarfile stops without a word at a broken or truncated header."""
    after = f" after {last!r}" if last else ""
    if offset >= size:
        return f"tar cut short{after}: no end-of-archive marker"
    f.seek(offset)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return f"tar cut short inside the header at byte {offset}{after}"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"broken tar header at byte {offset} of {size}{after}"
    # A zero block ends the tar only if nothing but zeros follows: a header zeroed in the
    # middle would otherwise drop the rest of the tar without a word.
    pos = offset + tarfile.BLOCKSIZE
    while pos < size:
        chunk = f.read(min(2**20, size - pos))
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            at = pos + len(chunk) - len(chunk.lstrip(b"\0"))
            return (f"broken tar header (all zeros) at byte {offset} of {size}{after}, "
                    f"with data at byte {at}")
        pos += len(chunk)
    return None


@dataclass
class _Seen:
    """What a tar's samples so far were: their keys, and whether any had a label."""

    keys: set[str] = field(default_factory=set)
    labelled: bool = False


@dataclass
class _Group:
    """The members of one key read so far."""

    url: str
    label_field: str | None
    key: str = ""
    offset: int = 0
    members: dict[str, bytes] = field(default_factory=dict)
    cut: str | None = None

    def whole(self, seen: _Seen) -> bool:
        """Whether this sample, interrupted by damage after it, is surely complete: it has
        an image, and a label unless the tar's earlier samples had none."""
        has_image = any(x in self.members for x in IMAGE_EXTS)
        return has_image and (self._label() is not None or (bool(seen.keys)
                                                            and not seen.labelled))

    def flush(self, seen: _Seen) -> Iterator[Sample]:
        if not self.key:
            return
        url = f"{self.url}#{self.key}"
        label = self._label()
        if self.key in seen.keys:
            # Named apart from the first sample's row, which keeps `TARURL#KEY`.
            yield Sample(Entry("", f"{url}@{self.offset}", label), failed(
                f"duplicate key {self.key!r} at byte {self.offset}: its first sample is kept"
                + (f"; {self.cut}" if self.cut else "")))
            return
        if self.cut:
            yield Sample(Entry("", url, label), failed(self.cut))
            return
        seen.keys.add(self.key)
        seen.labelled = seen.labelled or label is not None
        image = next((self.members[x] for x in IMAGE_EXTS if x in self.members), None)
        if image is None:
            have = ", ".join(sorted(self.members)) or "none"
            yield Sample(Entry("", url, label), failed(f"no image in sample (members: {have})"))
            return
        yield Sample(Entry("", url, label), loaded(image))

    def _label(self) -> str | None:
        if self.label_field is None:
            raw = self.members.get("cls")
            text = raw.decode("utf-8", "replace").strip() if raw else ""
            return text or None
        raw = self.members.get("json")
        if not raw:
            return None
        try:
            value = json.loads(raw).get(self.label_field)
        except (ValueError, AttributeError):
            return None
        return None if value is None else str(value)
