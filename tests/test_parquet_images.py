"""Parquet image tables as INPUT: planning by row, resuming, choosing columns, reading rows.

The tables are written the way Hugging Face writes them (`datasets`), and as plain pyarrow
tables of raw bytes; the images are small real JPEGs and PNGs.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from s3fixtures import s3, s3_server  # noqa: F401 - fixtures

from bottleneck.images import DecodeOptions, ImageError, decode_image
from bottleneck.inputs.parquet_images import (
    ParquetImageSource,
    ParquetRowReader,
    is_hf_image,
    is_image_table,
)
from bottleneck.inputs.source import PAGE_SCHEMA, START, InputError, Position
from bottleneck.runner.planning import Entry, url_path
from bottleneck.storage import Storage

NAMES = ["cat", "dog", "bird"]


def encoded(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 40x30 noise images, JPEG and PNG in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG" if i % 2 == 0 else "PNG")
        out.append(buf.getvalue())
    return out


def write_hf(path: Path, images: list, labels: list[int], row_group: int) -> None:
    """A table as `datasets` writes it: an Image column, a ClassLabel column."""
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=NAMES)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path), batch_size=row_group)


def as_cells(data: list[bytes], tag: str) -> list[dict]:
    # A path that does not exist, so that `datasets` keeps the bytes, as on the Hub.
    return [{"bytes": d, "path": f"no-such-dir/{tag}-{i}.jpg"} for i, d in enumerate(data)]


@pytest.fixture
def hf_folder(tmp_path: Path) -> tuple[Path, list[bytes], list[str]]:
    """data/train-0000{0,1}-of-00002.parquet: 7 + 5 rows in row groups of 2, and files that
    are not part of the table."""
    data = encoded(12)
    labels = [i % 3 for i in range(12)]
    root = tmp_path / "ds"
    write_hf(root / "data/train-00000-of-00002.parquet", as_cells(data[:7], "a"), labels[:7], 2)
    write_hf(root / "data/train-00001-of-00002.parquet", as_cells(data[7:], "b"), labels[7:], 2)
    (root / "README.md").write_text("# a dataset card\n")
    (root / "data/_SUCCESS").write_text("")
    pq.write_table(pa.table({"x": [1]}), root / "data/.hidden.parquet")
    (root / "_tmp").mkdir()
    pq.write_table(pa.table({"x": [1]}), root / "_tmp/part.parquet")
    return root, data, [NAMES[i] for i in labels]


def plan(source: ParquetImageSource, after: Position = START) -> pa.Table:
    return pa.concat_tables([PAGE_SCHEMA.empty_table(), *source.pages(after)])


def expected_urls(root: Path) -> list[str]:
    files = [root / "data/train-00000-of-00002.parquet", root / "data/train-00001-of-00002.parquet"]
    return [f"{f}#row={r}" for f, n in zip(files, (7, 5)) for r in range(n)]


def test_datasets_writes_metadata_and_image_struct(hf_folder):
    root, _, _ = hf_folder
    schema = pq.read_schema(root / "data/train-00000-of-00002.parquet")
    assert b"huggingface" in schema.metadata
    assert is_hf_image(schema.field("image").type)
    assert pa.types.is_integer(schema.field("label").type)


def test_pages_name_each_row_with_its_class_in_path_order(hf_folder):
    root, _, labels = hf_folder
    source = ParquetImageSource(str(root), {})
    pages = list(source.pages())
    assert len(pages) == 4 + 3  # one page per row group: 2+2+2+1, 2+2+1
    t = pa.concat_tables(pages)
    assert t.column("url").to_pylist() == expected_urls(root)
    assert t.column("label").to_pylist() == labels
    assert source.options == {"image_column": "image", "label_column": "label"}
    assert (source.kind, source.format, source.sorted) == ("parquet table", "parquet", False)
    assert source.reader == ParquetRowReader("image")


def test_one_file_as_input(hf_folder):
    root, _, labels = hf_folder
    file = root / "data/train-00001-of-00002.parquet"
    t = plan(ParquetImageSource(str(file), {}))
    assert t.column("url").to_pylist() == expected_urls(root)[7:]
    assert t.column("label").to_pylist() == labels[7:]


def test_resume_gives_the_tail_and_skips_what_is_planned_unread(hf_folder, monkeypatch):
    root, _, _ = hf_folder
    full = plan(ParquetImageSource(str(root), {}))
    for k in range(full.num_rows + 1):
        assert plan(ParquetImageSource(str(root), {}), Position(entries=k)).equals(full.slice(k))
    reads = record_row_group_reads(monkeypatch)
    source = ParquetImageSource(str(root), {})
    tail = plan(source, Position(entries=9))  # the first file, and a row group of the next
    assert tail.column("url").to_pylist() == expected_urls(root)[9:]
    assert [g for g, _ in reads] == [1, 2]
    # listing, the first footer (check), two footers, two row groups' labels
    assert source.stats.requests == 1 + 1 + 2 + 2


def record_row_group_reads(monkeypatch) -> list[tuple[int, list[str]]]:
    reads: list[tuple[int, list[str]]] = []
    original = pq.ParquetFile.read_row_group

    def read_row_group(self, i, columns=None, **kwargs):
        reads.append((i, list(columns)))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    return reads


def test_planning_reads_only_the_label_column(hf_folder, monkeypatch):
    root, _, _ = hf_folder
    reads = record_row_group_reads(monkeypatch)
    plan(ParquetImageSource(str(root), {}))
    assert len(reads) == 7 and all(columns == ["label"] for _, columns in reads)


def test_no_label_column_plans_from_the_footer_alone(tmp_path, monkeypatch):
    path = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"png": encoded(5)}), path, row_group_size=2)
    reads = record_row_group_reads(monkeypatch)
    source = ParquetImageSource(str(path), {})
    t = plan(source)
    assert t.column("url").to_pylist() == [f"{path}#row={i}" for i in range(5)]
    assert t.column("label").null_count == 5
    assert reads == [] and source.stats.requests == 1 + 1 + 1
    assert source.options == {"image_column": "png", "label_column": None}


def test_plain_binary_table_with_text_and_number_labels(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "data": pa.array(encoded(3), pa.large_binary()),
                             "label": ["x", "", None]}), path, row_group_size=2)
    assert plan(ParquetImageSource(str(path), {})).column("label").to_pylist() == ["x", None, None]
    pq.write_table(pa.table({"data": encoded(2), "target": [3, 40]}), path)
    source = ParquetImageSource(str(path), {})
    assert plan(source).column("label").to_pylist() == ["3", "40"]
    assert source.options == {"image_column": "data", "label_column": "target"}


def test_class_indices_past_the_names_are_an_input_error(tmp_path):
    meta = {b"huggingface": b'{"info": {"features": {"label": '
                            b'{"_type": "ClassLabel", "names": ["a", "b"]}}}}'}
    path = tmp_path / "t.parquet"
    table = pa.table({"image": encoded(3), "label": [1, -1, 0]}).replace_schema_metadata(meta)
    pq.write_table(table, path)
    assert plan(ParquetImageSource(str(path), {})).column("label").to_pylist() == ["b", None, "a"]
    pq.write_table(pa.table({"image": encoded(2), "label": [0, 2]}).replace_schema_metadata(meta),
                   path)
    with pytest.raises(InputError, match="label 2 .* 2 classes"):
        plan(ParquetImageSource(str(path), {}))


@pytest.mark.parametrize("columns, given, message", [
    ({"a": [b"x"], "b": [b"y"]}, None, r"several image columns \(a, b\).*--image-column"),
    ({"path": ["x.jpg"], "label": ["cat"]}, None,
     r"no image column.*path: string, label: string.*--image-column"),
    ({"a": [b"x"]}, "img", r"no column 'img' \(columns: a: binary\)"),
    ({"a": [b"x"], "s": ["x"]}, "s", r"column 's' .* is string, not images"),
])
def test_column_choice_errors_say_what_is_there(tmp_path, columns, given, message):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table(columns), path)
    source = ParquetImageSource(str(path), {}, image_column=given)
    with pytest.raises(InputError, match=message):
        source.check()
    with pytest.raises(InputError, match=message):
        list(source.pages())


def test_named_columns_win_and_bad_ones_are_errors(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"a": [b"x"], "b": [b"y"], "kind": ["k"], "label": ["l"]}), path)
    source = ParquetImageSource(str(path), {}, image_column="b", label_column="kind")
    assert source.options == {"image_column": "b", "label_column": "kind"}
    assert plan(source).column("label").to_pylist() == ["k"]
    with pytest.raises(InputError, match="no column 'nope'.*kind: string"):
        ParquetImageSource(str(path), {}, image_column="a", label_column="nope").check()
    pq.write_table(pa.table({"a": [b"x"], "labels": [[1, 2]]}), path)
    with pytest.raises(InputError, match="'labels' .* no text form"):
        ParquetImageSource(str(path), {}).check()


def test_inputs_that_are_not_tables(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .parquet files"):
        ParquetImageSource(str(tmp_path / "empty"), {}).check()
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="bad.parquet is not a Parquet file"):
        ParquetImageSource(str(tmp_path / "bad.parquet"), {}).check()


def entries_of(t: pa.Table) -> tuple[Entry, ...]:
    """A plan's entries, as the runner hands them to a reader."""
    return tuple(Entry(url_path(r["url"]), r["url"], r["label"]) for r in t.to_pylist())


def storage_for(url: str) -> Storage:
    return Storage(url, {})


def test_reader_gives_each_rows_bytes_across_files_and_row_groups(hf_folder, monkeypatch):
    root, data, _ = hf_folder
    source = ParquetImageSource(str(root), {})
    entries = entries_of(plan(source))
    reader = pickle.loads(pickle.dumps(source.reader))  # as the actors get it
    got = []
    for start in range(0, len(entries), 5):  # shards of 5: the second spans both files
        shard = entries[start:start + 5]
        samples = list(reader.samples(shard, storage_for))
        assert [s.entry.url for s in samples] == [e.url for e in shard]
        assert [s.entry.label for s in samples] == [e.label for e in shard]
        got += [s.load() for s in samples]
    assert got == data
    reads = record_row_group_reads(monkeypatch)
    list(reader.samples(entries[5:9], storage_for))  # rows 5, 6 of one file; 0, 1 of the next
    assert reads == [(2, ["image"]), (3, ["image"]), (0, ["image"])]


def test_reader_fails_null_and_path_only_rows_and_passes_any_bytes(tmp_path):
    real = tmp_path / "real.png"
    real.write_bytes(encoded(2)[1])
    path = tmp_path / "t.parquet"
    cells = [*as_cells(encoded(1), "ok"), None, {"bytes": b"not an image", "path": "x.jpg"},
             str(real)]  # an existing path: `datasets` stores the path alone
    write_hf(path, cells, [0, 1, 2, 0], row_group=3)
    entries = entries_of(plan(ParquetImageSource(str(path), {})))
    ok, null, junk, path_only = ParquetRowReader("image").samples(entries, storage_for)
    options = DecodeOptions(image_size=32)
    assert decode_image(ok.load(), options).shape == (32, 32, 3)
    with pytest.raises(ImageError, match="null image"):
        null.load()
    with pytest.raises(ImageError, match="not an image"):
        decode_image(junk.load(), options)
    with pytest.raises(ImageError, match=r"no image bytes \(path only: .*real.png\)"):
        path_only.load()


def test_reader_fails_rows_of_a_missing_file_or_past_the_end(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": encoded(2)}), path)
    gone = str(tmp_path / "gone.parquet")
    entries = (Entry("", f"{path}#row=1", None), Entry("", f"{path}#row=2", None),
               Entry("", f"{gone}#row=0", "a"), Entry("", f"{gone}#row=1", "a"))
    samples = list(ParquetRowReader("img").samples(entries, storage_for))
    assert samples[0].load() == encoded(2)[1]
    with pytest.raises(ImageError, match="row 2 is past the table's end"):
        samples[1].load()
    for s in samples[2:]:
        with pytest.raises(ImageError, match="cannot read table: FileNotFoundError"):
            s.load()


def test_is_image_table(hf_folder, tmp_path):
    root, _, _ = hf_folder
    assert is_image_table(str(root / "data/train-00000-of-00002.parquet"), {})
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"png": encoded(1)}), raw)
    assert is_image_table(str(raw), {})
    listing = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "label": ["cat"]}), listing)
    assert not is_image_table(str(listing), {})
    assert not is_image_table(str(tmp_path / "missing.parquet"), {})
    assert not is_image_table(str(root), {})
    # A list file's checksum column is binary too: a `path` column of text says list file.
    sums = tmp_path / "sums.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "label": ["cat"], "md5": [b"\x00" * 16]}), sums)
    assert not is_image_table(str(sums), {})


def test_a_corrupt_row_group_fails_its_rows_only(tmp_path):
    path = tmp_path / "t.parquet"
    data = encoded(9)
    pq.write_table(pa.table({"img": data}), path, row_group_size=3, compression="none")
    meta = pq.read_metadata(path)
    chunk = meta.row_group(1).column(0)
    start = chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start:start + 64] = b"\xff" * 64  # the page header of the middle row group
    path.write_bytes(bytes(raw))
    entries = tuple(Entry("", f"{path}#row={i}", None) for i in range(9))
    samples = list(ParquetRowReader("img").samples(entries, storage_for))
    assert [s.load() for s in samples[:3]] == data[:3]
    for s in samples[3:6]:
        with pytest.raises(ImageError, match="unreadable row group 1"):
            s.load()
    assert [s.load() for s in samples[6:]] == data[6:]  # the row groups after it are read


# -- in a bucket ----------------------------------------------------------------------------

def test_tables_in_a_bucket(s3, hf_folder):
    root, data, labels = hf_folder
    for f in sorted(root.rglob("*")):
        if f.is_file():
            s3.put(f"hf/{f.relative_to(root)}", f.read_bytes())
    url = s3.url("hf")
    source = ParquetImageSource(url, s3.options())
    t = plan(source)
    files = [f"s3://{s3.name}/hf/data/train-0000{i}-of-00002.parquet" for i in (0, 1)]
    assert t.column("url").to_pylist() == [f"{f}#row={r}" for f, n in zip(files, (7, 5))
                                           for r in range(n)]
    assert t.column("label").to_pylist() == labels
    assert plan(ParquetImageSource(url, s3.options()), Position(entries=8)).equals(t.slice(8))
    stores: dict[str, Storage] = {}
    entries = entries_of(t)
    samples = source.reader.samples(
        entries, lambda u: stores.setdefault("s3", Storage(u, s3.options())))
    assert [s.load() for s in samples] == data
    assert is_image_table(files[0], s3.options())
    assert all(r.method in ("GET", "HEAD") for r in s3.proxy.to(s3.name))


def test_bucket_reads_fetch_labels_and_the_rows_images_only(s3, tmp_path, monkeypatch):
    import s3fs

    blobs = [bytes([i]) * 200_000 for i in range(60)]  # 12 MB in 6 row groups of 2 MB
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"img": blobs, "label": [str(i % 4) for i in range(60)]}), path,
                   row_group_size=10, compression="none")
    s3.put("big.parquet", path.read_bytes())
    fetched: list[int] = []
    original = s3fs.core.S3File._fetch_range

    def fetch_range(self, start, end):
        fetched.append(end - start)
        return original(self, start, end)

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", fetch_range)
    source = ParquetImageSource(s3.url("big.parquet"), s3.options())
    t = plan(source)
    assert t.num_rows == 60 and sum(fetched) < 200_000  # footers and labels, no image
    fetched.clear()
    samples = source.reader.samples(entries_of(t)[31:33], lambda u: Storage(u, s3.options()))
    assert [s.load() for s in samples] == blobs[31:33]
    assert 2_000_000 < sum(fetched) < 2_200_000  # the footer, and one row group's images


def test_a_rerun_over_a_finished_plan_reads_nothing_of_the_table(tmp_path):
    """The manifest records the columns chosen; over a finished plan, the source takes
    them from there: the table itself may be gone. Other columns asked for now are chosen
    afresh (then refused by the manifest), never taken on trust."""
    import json

    from bottleneck.inputs import InputOptions, open_source
    from bottleneck.runner.plan import LISTED, PLAN_DIR

    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": encoded(2), "label": ["a", "b"]}), table)
    out = tmp_path / "out"
    (out / PLAN_DIR).mkdir(parents=True)
    (out / PLAN_DIR / LISTED).write_text("{}")
    chosen = {"image_column": "img", "label_column": "label"}
    (out / "_bottleneck.json").write_text(json.dumps(
        {"kind": "features", "settings": {}, "input_url": str(table), "shard_size": 256,
         "input_format": "parquet", "input_options": chosen}))
    table.unlink()
    source, _ = open_source(str(table), str(out), {})
    assert source.options == chosen and source.reader == ParquetRowReader("img")
    other, _ = open_source(str(table), str(out), {}, InputOptions(image_column="label"))
    with pytest.raises(InputError, match="no .parquet files|does not exist"):
        assert other.options  # asks INPUT, which is gone


def test_a_folder_named_like_a_parquet_file_is_a_table(tmp_path):
    """Spark and others write a dataset as a folder `NAME.parquet/` of part files."""
    from bottleneck.inputs import open_source

    folder = tmp_path / "ds.parquet"
    folder.mkdir()
    pq.write_table(pa.table({"img": encoded(2), "label": ["a", "b"]}), folder / "part-0.parquet")
    source, _ = open_source(str(folder), None, {})
    assert source.format == "parquet" and plan(source).num_rows == 2
