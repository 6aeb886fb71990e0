"""Parallel listing returns exactly what one sequential listing returns, in the same order.

Pure parts against an in-memory store (`KeyStore`, which answers as S3 does), a real folder
tree on disk, and moto's S3 server over HTTP with 20,000 keys in folders and under one flat
prefix.
"""

from __future__ import annotations

import os
import random
import string
import time

import pytest
from s3fixtures import s3, s3_server  # noqa: F401

from bottleneck.inputs.bucket_listing import BucketLister, KeyStore, ListPage
from bottleneck.inputs.keyspace import split_points
from bottleneck.inputs.listing import FolderSource, list_inputs
from bottleneck.inputs.source import Position
from bottleneck.inputs.tree_listing import TreeLister, read_local_dir
from bottleneck.storage import Storage

ALPHABET = string.ascii_letters + string.digits + "-_./ ~é☃😀\x7f"


def random_key(rng: random.Random, prefix: str = "p/") -> str:
    return prefix + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 14)))


def test_split_points_lie_strictly_between_and_increase():
    rng = random.Random(1)
    for _ in range(3000):
        pair = sorted({random_key(rng), random_key(rng)})
        if len(pair) < 2:
            continue
        a, b = pair
        hi = None if rng.random() < 0.3 else b
        k = rng.randint(1, 10)
        cuts = split_points(a, hi, k, floor="p/")
        assert len(cuts) <= k
        assert cuts == sorted(set(cuts))
        for c in cuts:
            assert a < c and (hi is None or c < hi), (a, hi, c)
            c.encode()  # valid UTF-8: S3 takes it as StartAfter
            if hi is None:
                assert c.startswith("p/")


def test_split_points_find_room_past_equal_characters():
    assert split_points("p/img-0000999", "p/img-0999999", 4)[0].startswith("p/img-0")
    # Adjacent characters: the cut goes one position further, still between.
    cuts = split_points("p/a", "p/b", 3)
    assert cuts and all("p/a" < c < "p/b" for c in cuts)
    assert split_points("p/a", "p/a\x00", 3) == []  # nothing lies between


@pytest.mark.parametrize("layout", ["flat", "folders", "deep", "random", "tiny"])
@pytest.mark.parametrize("requests,buffer", [(64, 400_000), (3, 1500)])
def test_bucket_lister_returns_the_sorted_listing(layout, requests, buffer):
    rng = random.Random(7)
    keys = {
        "flat": [f"p/img-{i:06d}.jpg" for i in range(30_000)],
        "folders": [f"p/c{i % 37:02d}/img-{i:06d}.jpg" for i in range(30_000)],
        "deep": [f"p/a/{i % 5}/{i % 11}/x{i}.jpg" for i in range(20_000)] + ["p/top.jpg"],
        "random": [random_key(rng) for _ in range(20_000)],
        "tiny": ["p/one.jpg"],
    }[layout] + ["o/outside", "q/outside", "p"]
    store = KeyStore(keys)
    want = [k for k in store.keys if k.startswith("p/")]
    lister = BucketLister(store, "p/", requests=requests, buffer_keys=buffer)
    got = [k for page in lister.pages() for k in page.to_pylist()]
    assert got == want
    sequential = -(-len(want) // 1000)
    assert lister.requests < 4 * sequential + 200  # cuts cost requests, but a bounded few
    # Resuming after any key gives exactly the rest.
    cut = want[len(want) // 3]
    rest = [k for page in BucketLister(store, "p/", requests=requests).pages(cut)
            for k in page.to_pylist()]
    assert rest == want[len(want) // 3 + 1:]


def test_bucket_lister_stops_on_a_store_error():
    store = KeyStore([f"p/{i:05d}" for i in range(5000)])
    calls = []

    def failing(prefix: str, start_after: str | None, delimiter: str | None) -> ListPage:
        calls.append(start_after)
        if len(calls) > 3:
            raise PermissionError("AccessDenied")
        return store(prefix, start_after, delimiter)

    with pytest.raises(PermissionError):
        list(BucketLister(failing, "p/", requests=4).pages())


def test_tree_lister_walks_in_sorted_order(tmp_path):
    rng = random.Random(3)
    root = tmp_path / "in"
    files = set()
    for _ in range(600):
        parts = [rng.choice(["a", "a.b", "a0", "b", "B", "é", "x y"]) for _ in range(rng.randint(1, 4))]
        rel = "/".join(parts[:-1] + [parts[-1] + f"-{rng.randint(0, 9)}.jpg"])
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    for dirpath, _, names in os.walk(root):
        files |= {os.path.join(dirpath, n) for n in names}
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"x")
    (root / "a" / ".DS_Store").parent.mkdir(exist_ok=True)
    (root / "a" / ".DS_Store").write_bytes(b"x")
    lister = TreeLister(read_local_dir, requests=4, page_size=50)
    got = [p for page in lister.pages(str(root)) for p in page]
    assert got == sorted(files)
    assert max(len(p) for p in lister.pages(str(root))) <= 50
    start = got[len(got) // 2]
    rest = [p for page in TreeLister(read_local_dir, 4).pages(str(root), start) for p in page]
    assert rest == got[len(got) // 2 + 1:]


def test_folder_source_resumes_after_the_last_planned_url(tmp_path):
    for label in ("cat", "dog"):
        for i in range(30):
            (tmp_path / "in" / label).mkdir(parents=True, exist_ok=True)
            (tmp_path / "in" / label / f"{i:02d}.jpg").write_bytes(b"x")
    source = FolderSource(Storage(str(tmp_path / "in")), requests=4)
    rows = [r for t in source.pages() for r in t.to_pylist()]
    assert len(rows) == 60 and rows[0]["label"] == "cat" and rows[-1]["label"] == "dog"
    after = Position(entries=25, last_url=rows[24]["url"])
    assert [r for t in source.pages(after) for r in t.to_pylist()] == rows[25:]


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_moto_20000_keys_parallel_equals_sequential(s3, layout, record_property):  # noqa: F811
    """On a real S3 API over HTTP: the parallel listing gives exactly the entries of one
    sequential `find`, with fewer round trips in a row."""
    n = 20_000
    key = ((lambda i: f"{layout}/c{i % 40:02d}/img-{i:05d}.jpg") if layout == "folders"
           else (lambda i: f"{layout}/img-{i:05d}.jpg"))
    s3.seed({key(i): b"x" for i in range(n)})
    s3.seed({f"{layout}/.hidden/x.jpg": b"x", f"{layout}/c00/": b"", f"{layout}x/y.jpg": b"x"})
    store = Storage(s3.url(layout))
    t = time.perf_counter()
    sequential = sorted(p for p in store.fs.find(store.root) if not p.endswith("/")
                        and "/." not in p)
    seq_s = time.perf_counter() - t
    s3.proxy.reset()
    t = time.perf_counter()
    entries = list_inputs(store, requests=8)  # moto answers one request at a time
    par_s = time.perf_counter() - t
    lists = [r for r in s3.proxy.to(s3.name) if r.is_list]
    record_property("parallel_seconds", round(par_s, 2))
    print(f"\n{layout}: {n} keys, sequential find {seq_s:.1f}s, parallel {par_s:.1f}s "
          f"with {len(lists)} LIST requests")
    assert [e.path for e in entries] == sequential
    assert len(entries) == n
    if layout == "folders":
        assert {e.label for e in entries} == {f"c{i:02d}" for i in range(40)}
    else:
        assert {e.label for e in entries} == {None}
    # Cuts that find no key cost a request each: a few times the one chain's 20 pages.
    assert len(lists) < 6 * (n // 1000)
