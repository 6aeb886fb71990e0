"""Entries, shards and part names: what the plan (`plan.py`) is made of. Pure, no Ray,
no TensorFlow."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PART_RE = re.compile(r"^part-(\d{5,})\.parquet$")


@dataclass(frozen=True, slots=True)
class Entry:
    """One input file: its fsspec path, the URL we report, and its label (or None)."""

    path: str
    url: str
    label: str | None

    def __reduce__(self) -> tuple:
        # A third of the default's unpickling time (which looks up the fields per object):
        # every shard sent to an actor, and every batch from a decode worker, carries these.
        return Entry, (self.path, self.url, self.label)


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


def committed_shards(names: Iterable[str]) -> set[int]:
    """Shard numbers that have a committed part file among `names` (base names in OUTPUT)."""
    done = set()
    for n in names:
        m = PART_RE.match(n)
        if m:
            done.add(int(m.group(1)))
    return done
