"""Pure tests of how listed names become labelled entries, and of part names."""

from __future__ import annotations

from bottleneck.inputs.listing import labelled_page
from bottleneck.runner.planning import committed_shards, part_name, url_path

ROOT = "/data/in/"


def rows(names: list[str], prefix: str = ROOT) -> list[tuple[str, str | None]]:
    t = labelled_page(names, prefix)
    return list(zip(t.column("url").to_pylist(), t.column("label").to_pylist()))


def test_labels_come_from_the_first_folder_level():
    assert rows(["cat/b.jpg", "cat/x/y/deep.png", "dog/a.jpg", "loose.jpg"]) == [
        (f"{ROOT}cat/b.jpg", "cat"), (f"{ROOT}cat/x/y/deep.png", "cat"),
        (f"{ROOT}dog/a.jpg", "dog"), (f"{ROOT}loose.jpg", None)]


def test_hidden_files_folders_and_folder_markers_are_skipped():
    names = [".DS_Store", "cat/.hidden.jpg", ".git/objects/ab", "cat/.thumbs/t.jpg",
             "cat/ok.jpg", "cat/not.hidden.jpg", "cat/", "dog/deep/", "", "é/ü.jpg"]
    assert rows(names) == [(f"{ROOT}cat/ok.jpg", "cat"), (f"{ROOT}cat/not.hidden.jpg", "cat"),
                           (f"{ROOT}é/ü.jpg", "é")]


def test_urls_of_a_bucket_and_their_fsspec_paths():
    assert rows(["cat/a b.jpg"], "s3://bucket/pre/") == [("s3://bucket/pre/cat/a b.jpg", "cat")]
    assert url_path("s3://bucket/pre/cat/a b.jpg") == "bucket/pre/cat/a b.jpg"
    assert url_path("/data/in/x.jpg") == "/data/in/x.jpg"


def test_committed_shards_reads_only_committed_part_names():
    names = ["part-00000.parquet", "part-00007.parquet", "part-123456.parquet",
             "_SUCCESS.json", "_bottleneck.json", "_errors", "_tmp", ".part-00001.parquet.crc",
             "part-00002.parquet.tmp", "part-3.parquet", "xpart-00004.parquet",
             "part-0000a.parquet", "_plan"]
    assert committed_shards(names) == {0, 7, 123456}


def test_part_name_round_trips_through_committed_shards():
    for i in [0, 1, 99999, 100000, 1234567]:
        assert committed_shards([part_name(i)]) == {i}
