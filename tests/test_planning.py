"""Pure tests of listing → shards → what is left (embedding-reader style invariants)."""

from __future__ import annotations

import random

import pytest

from bottleneck.runner.planning import (
    Entry,
    committed_shards,
    labels_of,
    listing_digest,
    make_entries,
    part_name,
    plan_remaining,
    plan_shards,
)

ROOT = "/data/in"


def entries_of(n: int) -> list[Entry]:
    """n entries, sorted by path as a listing is."""
    paths = sorted(f"{ROOT}/c{i % 3}/{i:06d}.jpg" for i in range(n))
    return [Entry(path=p, url=p, label=p.split("/")[-2]) for p in paths]


# -- make_entries -------------------------------------------------------------------------

def test_labels_come_from_the_first_folder_level():
    paths = [f"{ROOT}/dog/a.jpg", f"{ROOT}/cat/x/y/deep.png", f"{ROOT}/cat/b.jpg"]
    got = make_entries(ROOT, paths)
    assert [(e.path, e.label) for e in got] == [
        (f"{ROOT}/cat/b.jpg", "cat"),
        (f"{ROOT}/cat/x/y/deep.png", "cat"),
        (f"{ROOT}/dog/a.jpg", "dog"),
    ]


def test_top_level_files_have_a_null_label():
    got = make_entries(ROOT, [f"{ROOT}/loose.jpg", f"{ROOT}/cat/a.jpg"])
    assert {e.path: e.label for e in got} == {f"{ROOT}/loose.jpg": None, f"{ROOT}/cat/a.jpg": "cat"}
    assert labels_of(got) == ["cat"]  # None is not a label


def test_hidden_files_and_folders_are_skipped():
    paths = [f"{ROOT}/.DS_Store", f"{ROOT}/cat/.hidden.jpg", f"{ROOT}/.git/objects/ab",
             f"{ROOT}/cat/.thumbs/t.jpg", f"{ROOT}/cat/ok.jpg", f"{ROOT}/cat/not.hidden.jpg"]
    got = make_entries(ROOT, paths)
    assert [e.path for e in got] == [f"{ROOT}/cat/not.hidden.jpg", f"{ROOT}/cat/ok.jpg"]


def test_paths_outside_the_root_and_the_root_itself_are_ignored():
    paths = [ROOT, f"{ROOT}/", "/data/inside/x.jpg", "/data/in-other/a/b.jpg", f"{ROOT}/a/b.jpg"]
    assert [e.path for e in make_entries(ROOT, paths)] == [f"{ROOT}/a/b.jpg"]
    # A trailing slash on the root changes nothing.
    assert make_entries(ROOT + "/", paths) == make_entries(ROOT, paths)


def test_urls_are_made_by_the_given_function_and_labels_by_the_path():
    got = make_entries("bucket/pre", ["bucket/pre/cat/a.jpg"], to_url=lambda p: "s3://" + p)
    assert got == [Entry("bucket/pre/cat/a.jpg", "s3://bucket/pre/cat/a.jpg", "cat")]


def test_entries_are_sorted_whatever_the_listing_order():
    paths = [f"{ROOT}/{c}/{i}.jpg" for c in "bca" for i in range(5)]
    shuffled = paths[:]
    random.Random(3).shuffle(shuffled)
    assert make_entries(ROOT, shuffled) == make_entries(ROOT, paths)
    assert [e.path for e in make_entries(ROOT, paths)] == sorted(paths)


# -- plan_shards --------------------------------------------------------------------------

def test_plan_shards_cuts_consecutive_shards():
    es = entries_of(10)
    shards = plan_shards(es, 4)
    assert [s.index for s in shards] == [0, 1, 2]
    assert [len(s) for s in shards] == [4, 4, 2]
    assert shards[1].entries == tuple(es[4:8])
    assert [part_name(s.index) for s in shards] == ["part-00000.parquet", "part-00001.parquet",
                                       "part-00002.parquet"]


@pytest.mark.parametrize("bad", [0, -1])
def test_plan_shards_refuses_a_shard_size_below_one(bad):
    with pytest.raises(ValueError, match="at least 1"):
        plan_shards(entries_of(3), bad)


def test_plan_shards_of_nothing_is_nothing():
    assert plan_shards([], 8) == []


def test_plan_shards_invariants_over_random_inputs():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.choice([0, 1, 2, rng.randrange(0, 50), rng.randrange(0, 3000)])
        size = rng.choice([1, 2, 3, rng.randrange(1, 100), rng.randrange(1, 5000)])
        es = entries_of(n)
        shards = plan_shards(es, size)
        flat = [e for s in shards for e in s.entries]
        # Every entry exactly once, in listing order.
        assert flat == es
        # None larger than asked, none empty, all full but the last.
        assert all(1 <= len(s) <= size for s in shards)
        assert all(len(s) == size for s in shards[:-1])
        assert len(shards) == -(-n // size)
        assert [s.index for s in shards] == list(range(len(shards)))
        # Deterministic: same input, same shards.
        assert plan_shards(list(es), size) == shards


# -- resume planning ----------------------------------------------------------------------

def test_committed_shards_reads_only_committed_part_names():
    names = ["part-00000.parquet", "part-00007.parquet", "part-123456.parquet",
             "_SUCCESS.json", "_bottleneck.json", "_errors", "_tmp", ".part-00001.parquet.crc",
             "part-00002.parquet.tmp", "part-3.parquet", "xpart-00004.parquet",
             "part-0000a.parquet"]
    assert committed_shards(names) == {0, 7, 123456}


def test_part_name_round_trips_through_committed_shards():
    for i in [0, 1, 99999, 100000, 1234567]:
        assert committed_shards([part_name(i)]) == {i}


def test_plan_remaining_skips_done_shards_in_order():
    shards = plan_shards(entries_of(20), 3)
    todo = plan_remaining(shards, {0, 2, 6, 99})
    assert [s.index for s in todo] == [1, 3, 4, 5]
    assert plan_remaining(shards, set()) == shards
    assert plan_remaining(shards, set(range(len(shards)))) == []


def test_plan_remaining_invariants_over_random_inputs():
    rng = random.Random(99)
    for _ in range(200):
        shards = plan_shards(entries_of(rng.randrange(0, 500)), rng.randrange(1, 40))
        done = {i for i in range(len(shards) + 3) if rng.random() < 0.4}
        names = [part_name(i) for i in done] + ["_SUCCESS.json", "_errors"]
        todo = plan_remaining(shards, committed_shards(names))
        # Done and todo partition the shards; no done shard is ever redone.
        assert {s.index for s in todo} == {s.index for s in shards} - done
        assert [s.index for s in todo] == sorted(s.index for s in todo)
        left = [e for s in todo for e in s.entries]
        finished = [e for s in shards if s.index in done for e in s.entries]
        assert sorted(left + finished, key=lambda e: e.path) == [e for s in shards
                                                                for e in s.entries]


# -- listing fingerprint ------------------------------------------------------------------

def test_listing_digest_changes_with_files_and_labels_only():
    es = entries_of(7)
    assert listing_digest(es) == listing_digest(list(es))
    assert listing_digest(es) != listing_digest(es[:-1])
    relabelled = [Entry(e.path, e.url, None if i == 0 else e.label) for i, e in enumerate(es)]
    assert listing_digest(relabelled) != listing_digest(es)
    renamed = [Entry(e.path, e.url + "x", e.label) for e in es]
    assert listing_digest(renamed) != listing_digest(es)
