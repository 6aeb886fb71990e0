"""List → plan shards → plan what is left. Pure functions, no Ray, no TensorFlow.

The same listing always gives the same shards: the listing is sorted, and shard i holds
entries [i*shard_size, (i+1)*shard_size).  `listing_digest` fingerprints a listing so a
rerun can tell that INPUT is still what OUTPUT was made from.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One input file: its fsspec path, the URL we report, and its label (or None)."""

    path: str
    url: str
    label: str | None


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    entries: tuple[Entry, ...]

    def __len__(self) -> int:
        return len(self.entries)


def url_path(url: str) -> str:
    """The fsspec path of a URL we store: the URL without its protocol (a local path is
    its own URL)."""
    return url.split("://", 1)[1] if "://" in url else url


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def is_hidden(relative: str) -> bool:
    """Files and folders whose name starts with '.' are not inputs (.DS_Store, .git…)."""
    return any(p.startswith(".") for p in relative.split("/"))


def label_of(relative: str) -> str | None:
    """flow_from_directory's layout: the first folder level is the label; files at the top
    have none."""
    parts = relative.split("/")
    return parts[0] if len(parts) > 1 else None


def make_entries(root: str, paths: Iterable[str], to_url=lambda p: p) -> list[Entry]:
    """Turn fsspec paths under `root` into sorted, labelled entries, skipping hidden files."""
    prefix = root.rstrip("/") + "/"
    out = []
    for p in paths:
        if not p.startswith(prefix):
            continue
        rel = p[len(prefix):]
        if not rel or is_hidden(rel):
            continue
        label = label_of(rel)
        # One string per distinct label, not one per file: a million entries share a few.
        out.append(Entry(path=p, url=to_url(p), label=sys.intern(label) if label else None))
    out.sort(key=lambda e: e.path)
    return out


def plan_shards(entries: Sequence[Entry], shard_size: int) -> list[Shard]:
    """Cut a sorted listing into consecutive shards of at most `shard_size` entries."""
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, not {shard_size}")
    return [
        Shard(index=i, entries=tuple(entries[start:start + shard_size]))
        for i, start in enumerate(range(0, len(entries), shard_size))
    ]


def listing_digest(entries: Iterable[Entry]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(e.url.encode())
        h.update(b"\0")
        h.update((e.label if e.label is not None else "\x01").encode())
        h.update(b"\n")
    return h.hexdigest()


def committed_shards(names: Iterable[str]) -> set[int]:
    """Shard numbers that have a committed part file among `names` (base names in OUTPUT)."""
    done = set()
    for n in names:
        m = PART_RE.match(n)
        if m:
            done.add(int(m.group(1)))
    return done


def plan_remaining(shards: Sequence[Shard], done: set[int]) -> list[Shard]:
    """The shards still to do, in order. Shards already committed are never redone."""
    return [s for s in shards if s.index not in done]


def labels_of(entries: Iterable[Entry]) -> list[str]:
    return sorted({e.label for e in entries if e.label is not None})
