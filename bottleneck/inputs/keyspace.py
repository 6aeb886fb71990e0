"""Split a range of object keys into smaller ones, knowing nothing of where the keys lie.

Pure functions, no storage. S3 lists one key range with one chain of requests (each page
names where the next one starts), so a range is listed in parallel only by cutting it: the
range lister (`bucket_listing.py`) asks for cut points between the last key it has seen and
the end of its range, and lists each piece with its own chain. A piece that holds no key
costs one request; a piece that holds many is cut again, so the listing adapts to where the
keys are without knowing it in advance.

Keys compare by code point, which is the order S3 lists them in (UTF-8 byte order).
"""

from __future__ import annotations

ASCII_END = 0x80  # keys are mostly ASCII: cut within it first
UNICODE_END = 0x110000
SURROGATES = range(0xD800, 0xE000)  # not encodable as UTF-8: never part of a cut point


def split_points(lo: str, hi: str | None, k: int, floor: str = "") -> list[str]:
    """Up to `k` increasing strings strictly between `lo` and `hi`, spread over the first
    character position where there is room for them.

    `hi` None means no upper bound, in which case every key begins with `floor` (the listing
    prefix) and the cut points do too. Returns [] when `lo` and `hi` are adjacent."""
    if k < 1 or (hi is not None and lo >= hi):
        return []
    if hi is None:
        i, y = len(floor), None
        if not lo.startswith(floor):
            return []
    else:
        i = 0
        while i < len(lo) and i < len(hi) and lo[i] == hi[i]:
            i += 1
        if i == len(hi):  # hi is a prefix of lo, so lo > hi
            return []
        y = ord(hi[i])
    while True:
        x = ord(lo[i]) if i < len(lo) else -1
        top = y if y is not None else (ASCII_END if x < ASCII_END - 1 else UNICODE_END)
        if top - x >= 2:
            zs = sorted({x + (top - x) * j // (k + 1) for j in range(1, k + 1)})
            zs = [z for z in zs if x < z < top and z not in SURROGATES]
            if zs:
                return [lo[:i] + chr(z) for z in zs]
        if x < 0:
            return []
        # No room at this position: keep lo's character and cut one position further on,
        # where nothing above bounds the cut (lo[:i+1] is already below hi).
        i, y = i + 1, None
        if i > len(lo) + 1:
            return []
