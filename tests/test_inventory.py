"""S3 Inventory reports as INPUT, written in AWS's documented layout (manifest.json, and
data files as gzipped header-less CSV with URL-encoded keys, Parquet or ORC), read from a
local copy of the destination bucket and from a bucket on moto's S3 server over HTTP."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3fixtures import s3, s3_server  # noqa: F401 - fixtures

from bottleneck.inputs.inventory import InventorySource, Manifest, is_inventory, local_data_path
from bottleneck.inputs.source import PAGE_SCHEMA, InputError, Position

SOURCE = "photos-src"
REPORT = f"inv/{SOURCE}/config-1"  # <dest-prefix>/<source-bucket>/<config-id>
MANIFEST_KEY = f"{REPORT}/2026-11-29T01-00Z/manifest.json"
CSV_SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate"

# (key, is_latest, is_delete_marker), split over two data files.
FILE_1 = [
    ("images/cat/a.jpg", True, False),
    ("images/cat/", True, False),  # a console's folder marker
    ("images/cat/b b+c.jpg", True, False),  # a space and a plus: '+' and '%2B' in CSV
    ("images/dog/old.jpg", False, False),  # an older version
    ("images/dog/new.jpg", True, False),
    ("other/z.jpg", True, False),
    ("images/.hidden/x.jpg", True, False),
]
FILE_2 = [
    ("images/dog/gone.jpg", True, True),  # deleted: the latest version is a delete marker
    ("images/top.jpg", True, False),
    ("images-sibling/q.jpg", True, False),
    ("images/dog/deep/ünï,code.jpg", True, False),
    ("images/dog/.DS_Store", True, False),
    ("0042", True, False),  # a key that looks like a number
]
UNDER_IMAGES = [
    (f"s3://{SOURCE}/images/cat/a.jpg", "cat"),
    (f"s3://{SOURCE}/images/cat/b b+c.jpg", "cat"),
    (f"s3://{SOURCE}/images/dog/new.jpg", "dog"),
    (f"s3://{SOURCE}/images/top.jpg", None),
    (f"s3://{SOURCE}/images/dog/deep/ünï,code.jpg", "dog"),
]


def data_file(rows: list[tuple[str, bool, bool]], fmt: str) -> bytes:
    if fmt == "CSV":
        text = io.StringIO()
        w = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for i, (key, latest, deleted) in enumerate(rows):
            encoded = quote_plus(key, safe="/" if i % 2 else "")  # '/' as is, or as %2F
            w.writerow([SOURCE, encoded, f"v{i}", str(latest).lower(), str(deleted).lower(),
                        "0" if deleted else "1234", "2026-11-28T10:00:00.000Z"])
        return gzip.compress(text.getvalue().encode())
    table = pa.table({
        "bucket": [SOURCE] * len(rows), "key": [k for k, _, _ in rows],
        "version_id": [f"v{i}" for i in range(len(rows))],
        "is_latest": [latest for _, latest, _ in rows],
        "is_delete_marker": [deleted for _, _, deleted in rows],
        "size": pa.array([1234] * len(rows), pa.int64()),
    })
    buf = io.BytesIO()
    if fmt == "Parquet":
        pq.write_table(table, buf, row_group_size=3)
    else:
        from pyarrow import orc

        orc.write_table(table, buf)
    return buf.getvalue()


def report(fmt: str, dest: str = "dest-bucket") -> dict[str, bytes]:
    """The report's objects in the destination bucket, by key."""
    ext = {"CSV": "csv.gz", "Parquet": "parquet", "ORC": "orc"}[fmt]
    keys = [f"{REPORT}/data/{name}.{ext}" for name in ("f1c5", "0ab2")]  # not in name order
    manifest = {
        "sourceBucket": SOURCE, "destinationBucket": f"arn:aws:s3:::{dest}",
        "version": "2016-11-30", "creationTimestamp": "1764378000000", "fileFormat": fmt,
        "fileSchema": CSV_SCHEMA if fmt == "CSV" else "message s3.inventory { ... }",
        "files": [{"key": k, "size": 1, "MD5checksum": "0" * 32} for k in keys],
    }
    return {MANIFEST_KEY: json.dumps(manifest).encode(),
            keys[0]: data_file(FILE_1, fmt), keys[1]: data_file(FILE_2, fmt)}


def save(root: Path, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)


def read(source: InventorySource, after: int = 0) -> list[tuple[str, str | None]]:
    pages = list(source.pages(Position(entries=after)))
    assert all(p.schema == PAGE_SCHEMA and p.num_rows for p in pages)
    table = pa.concat_tables(pages) if pages else PAGE_SCHEMA.empty_table()
    return list(zip(table["url"].to_pylist(), table["label"].to_pylist()))


FORMATS = ["CSV", "Parquet", "ORC"]


def test_is_inventory():
    assert is_inventory("s3://d/inv/src/cfg/2026-11-29T01-00Z/manifest.json")
    assert is_inventory("/x/manifest.json")
    assert not any(is_inventory(u) for u in ("/x/manifest.json.bak", "/x/my-manifest.json",
                                              "s3://b/images", "list.parquet"))


def test_local_data_path():
    m = "/x/dest/src-bucket/config-1/2026-11-29T01-00Z/manifest.json"
    # A copy of the bucket at /x, or of its dest/ folder at /x/dest.
    assert local_data_path(m, "dest/src-bucket/config-1/data/a.csv.gz") == \
        "/x/dest/src-bucket/config-1/data/a.csv.gz"
    assert local_data_path(m, "src-bucket/config-1/data/a.csv.gz") == \
        "/x/dest/src-bucket/config-1/data/a.csv.gz"
    # A copy of the report from its config folder down: data/ beside the timestamp folder.
    assert local_data_path("/r/2026-11-29T01-00Z/manifest.json",
                           "inv/src/config-1/data/a.parquet") == "/r/data/a.parquet"
    # The deepest of equally good roots.
    assert local_data_path("/a/b/a/b/ts/manifest.json", "a/b/data/f.orc") == \
        "/a/b/a/b/data/f.orc"


@pytest.mark.parametrize("fmt", FORMATS)
def test_local_copy_prefix_labels_and_skips(tmp_path, fmt):
    save(tmp_path / "dest-copy", report(fmt))
    manifest = str(tmp_path / "dest-copy" / MANIFEST_KEY)
    source = InventorySource(manifest, {}, prefix="images/")
    assert (source.url, source.kind, source.sorted) == (manifest, "inventory", False)
    assert read(source) == UNDER_IMAGES
    assert source.stats.requests == 3  # the manifest and two data files
    assert source.stats.keys == len(FILE_1) + len(FILE_2)
    assert read(InventorySource(manifest, {}, prefix="/images")) == UNDER_IMAGES

    everything = read(InventorySource(manifest, {}))
    assert everything == [
        (f"s3://{SOURCE}/images/cat/a.jpg", "images"),
        (f"s3://{SOURCE}/images/cat/b b+c.jpg", "images"),
        (f"s3://{SOURCE}/images/dog/new.jpg", "images"),
        (f"s3://{SOURCE}/other/z.jpg", "other"),
        (f"s3://{SOURCE}/images/top.jpg", "images"),
        (f"s3://{SOURCE}/images-sibling/q.jpg", "images-sibling"),
        (f"s3://{SOURCE}/images/dog/deep/ünï,code.jpg", "images"),
        (f"s3://{SOURCE}/0042", None),
    ]
    assert read(InventorySource(manifest, {}, prefix="images/dog")) == [
        (f"s3://{SOURCE}/images/dog/new.jpg", None),
        (f"s3://{SOURCE}/images/dog/deep/ünï,code.jpg", "deep")]
    assert read(InventorySource(manifest, {}, prefix="nothing-here")) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_gives_exactly_the_rest(tmp_path, fmt):
    save(tmp_path, report(fmt))
    manifest = str(tmp_path / MANIFEST_KEY)
    everything = read(InventorySource(manifest, {}))
    for k in range(len(everything) + 2):
        assert read(InventorySource(manifest, {}), after=k) == everything[k:], k


def test_parquet_pages_are_bounded(tmp_path):
    save(tmp_path, report("Parquet"))
    source = InventorySource(str(tmp_path / MANIFEST_KEY), {})
    source.batch_rows = 2
    pages = list(source.pages())
    assert len(pages) > 3 and all(p.num_rows <= 2 for p in pages)


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_in_a_bucket(s3, fmt):
    s3.put_many(report(fmt, dest=s3.name))
    url = s3.url(MANIFEST_KEY)
    source = InventorySource(url, s3.options(), prefix="images")
    assert read(source) == UNDER_IMAGES
    assert read(InventorySource(url, s3.options(), prefix="images"), after=2) == \
        UNDER_IMAGES[2:]
    got = {r.key for r in s3.proxy.to(s3.name) if r.method == "GET"}
    assert got == {MANIFEST_KEY, *(k for k in report(fmt) if "/data/" in k)}


def test_data_files_come_from_the_destination_bucket(s3, s3_server):
    from s3fixtures import new_bucket

    dest = new_bucket(s3_server)
    objects = report("CSV", dest=dest.name)
    s3.put(MANIFEST_KEY, objects.pop(MANIFEST_KEY))  # the manifest alone, elsewhere
    dest.put_many(objects)
    assert read(InventorySource(s3.url(MANIFEST_KEY), s3.options(), prefix="images")) == \
        UNDER_IMAGES


@pytest.mark.parametrize("manifest, message", [
    (b"{not json", "not JSON"),
    (b"[]", "not a JSON object"),
    (json.dumps({"fileFormat": "Avro", "files": []}).encode(),
     "fileFormat 'Avro' is not one of CSV, Parquet, ORC"),
    (json.dumps({"fileFormat": "CSV", "fileSchema": "Bucket, Key", "files": [{}]}).encode(),
     "'files' is not a list"),
    (json.dumps({"fileFormat": "CSV", "fileSchema": "Bucket, Size", "files": []}).encode(),
     "fileSchema 'Bucket, Size' has no Key column"),
    (json.dumps({"fileFormat": "Parquet", "files": []}).encode(), "no sourceBucket"),
])
def test_malformed_manifest(tmp_path, manifest, message):
    path = tmp_path / "manifest.json"
    path.write_bytes(manifest)
    with pytest.raises(InputError, match=message) as e:
        list(InventorySource(str(path), {}).pages())
    assert str(e.value).startswith(f"inventory manifest {path}: ")
    assert "\n" not in str(e.value)


def test_missing_manifest_and_data_file(tmp_path):
    with pytest.raises(InputError, match="cannot read inventory manifest .*FileNotFound"):
        list(InventorySource(str(tmp_path / "manifest.json"), {}).pages())
    objects = report("Parquet")
    missing = next(k for k in objects if k.endswith("0ab2.parquet"))
    del objects[missing]
    save(tmp_path, objects)
    pages = InventorySource(str(tmp_path / MANIFEST_KEY), {}).pages()
    assert next(pages).num_rows > 0  # the first file is read before the second is missed
    with pytest.raises(InputError, match=f"cannot read inventory data file {tmp_path / missing}"):
        list(pages)


def test_manifest_parse_keeps_order_and_bucket_name():
    m = Manifest.parse(report("ORC", dest="my-dest")[MANIFEST_KEY], "m")
    assert (m.source_bucket, m.destination_bucket, m.file_format) == (SOURCE, "my-dest", "ORC")
    assert [k.rsplit("/", 1)[-1] for k in m.files] == ["f1c5.orc", "0ab2.orc"]
    csv_manifest = Manifest.parse(report("CSV")[MANIFEST_KEY], "m")
    assert csv_manifest.csv_columns[:5] == ("Bucket", "Key", "VersionId", "IsLatest",
                                            "IsDeleteMarker")
