"""List files as INPUT: Parquet, CSV (plain and gzipped) and JSON lines, on disk and in a
bucket (moto's S3 server over HTTP), read a chunk at a time."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3fixtures import s3, s3_server  # noqa: F401 - fixtures

from bottleneck.inputs.listfile import ListFileSource, is_list_file, list_format
from bottleneck.inputs.source import PAGE_SCHEMA, InputError, Position

FORMATS = ["parquet", "csv", "csv.gz", "jsonl"]


def encode(df: pd.DataFrame, fmt: str, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "parquet":
        df.to_parquet(buf, index=False, row_group_size=row_group_size)
    elif fmt in ("csv", "csv.gz"):
        df.to_csv(buf, index=False, compression="gzip" if fmt == "csv.gz" else None)
    else:
        df.to_json(buf, orient="records", lines=True)
    return buf.getvalue()


def write(folder: Path, df: pd.DataFrame, fmt: str, name: str = "list", **kw) -> str:
    path = folder / f"{name}.{fmt}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(df, fmt, **kw))
    return str(path)


def read(source: ListFileSource, after: int = 0) -> list[tuple[str, str | None]]:
    pages = list(source.pages(Position(entries=after)))
    for p in pages:
        assert p.schema == PAGE_SCHEMA
    table = pa.concat_tables(pages) if pages else PAGE_SCHEMA.empty_table()
    return list(zip(table["url"].to_pylist(), table["label"].to_pylist()))


def test_format_by_extension():
    assert [list_format(u) for u in ("a.parquet", "s3://b/x/L.CSV", "l.csv.gz", "l.jsonl",
                                     "l.ndjson", "l.jsonl.gz")] == \
        ["parquet", "csv", "csv", "jsonl", "jsonl", "jsonl"]
    assert not any(is_list_file(u) for u in ("a.json", "a.txt", "folder/", "a.gz", "a.jpg",
                                              "s3://b/images", "manifest.json"))
    with pytest.raises(InputError, match=r"list\.txt: unsupported extension"):
        ListFileSource("/tmp/list.txt", {})


@pytest.mark.parametrize("fmt", FORMATS)
def test_local_paths_resolved_and_labels_as_text(tmp_path, fmt):
    df = pd.DataFrame({
        "path": ["a.jpg", "sub/b c.jpg", "../up.jpg", "/abs/d.jpg", "s3://bk/k/e.jpg",
                 "https://host/f.jpg"],
        "label": [3, 3, 10, 4, 5, 6],
        "caption": ["x", "y, z", "1", "2", "3", "4"],  # extra columns are not read
    })
    url = write(tmp_path / "lists", df, fmt)
    lists = tmp_path / "lists"
    assert read(ListFileSource(url, {})) == [
        (str(lists / "a.jpg"), "3"), (str(lists / "sub" / "b c.jpg"), "3"),
        (str(tmp_path / "up.jpg"), "10"), ("/abs/d.jpg", "4"), ("s3://bk/k/e.jpg", "5"),
        ("https://host/f.jpg", "6"),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_label_column_and_null_paths_kept_as_error_urls(tmp_path, fmt):
    df = pd.DataFrame({"path": ["a.jpg", None, "b.jpg", "", "c.jpg"]})
    url = write(tmp_path, df, fmt)
    got = read(ListFileSource(url, {}))
    # CSV cannot tell an empty string from a missing value; both are no path.
    assert got == [(str(tmp_path / "a.jpg"), None), (f"{url}#row=1", None),
                   (str(tmp_path / "b.jpg"), None), (f"{url}#row=3", None),
                   (str(tmp_path / "c.jpg"), None)]
    # The row number survives a resume.
    assert read(ListFileSource(url, {}), after=2)[1] == (f"{url}#row=3", None)


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_labels_typed_values(tmp_path, fmt):
    # pandas stores ints with a gap as floats: 3.0 must still be the label "3".
    df = pd.DataFrame({"path": ["a", "b", "c", "d"], "label": [3, None, 7, 0]})
    assert df["label"].dtype == "float64"
    url = write(tmp_path, df, fmt)
    assert [label for _, label in read(ListFileSource(url, {}))] == ["3", None, "7", "0"]
    text = pd.DataFrame({"path": ["a", "b", "c"], "label": ["cat", "", None]})
    url = write(tmp_path, text, fmt, name="text")
    assert [label for _, label in read(ListFileSource(url, {}))] == ["cat", None, None]


def test_label_column_with_no_text_form(tmp_path):
    url = str(tmp_path / "l.parquet")
    pq.write_table(pa.table({"path": ["a"], "label": [[1, 2]]}), url)
    with pytest.raises(InputError, match=f"list file {url}: its label column, of type "
                                         r"list<element: int64>, cannot be read as text"):
        list(ListFileSource(url, {}).pages())


def test_jsonl_mixed_label_types_and_blank_lines(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"path": "a", "label": 3}\n\n{"path": "b", "label": "cat"}\n'
                    '{"path": "c", "label": true, "x": [1]}\n{"label": "no path"}\n')
    assert read(ListFileSource(str(path), {})) == [
        (str(tmp_path / "a"), "3"), (str(tmp_path / "b"), "cat"),
        (str(tmp_path / "c"), "true"), (f"{path}#row=3", "no path")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_path_column(tmp_path, fmt):
    url = write(tmp_path, pd.DataFrame({"url": ["a.jpg"], "label": ["x"]}), fmt)
    with pytest.raises(InputError) as e:
        list(ListFileSource(url, {}).pages())
    assert str(e.value) == f"list file {url} has no 'path' column"


@pytest.mark.parametrize("name, content, message", [
    ("list.parquet", b"path\na.jpg\n", "cannot read list file"),
    ("list.csv.gz", b"path\na.jpg\n", "cannot read list file"),  # not gzip
    ("list.csv", b"", "cannot read list file"),
    ("list.jsonl", b'{"path": "a"}\n{"path": \n', "line 2 is not a JSON object"),
    ("list.jsonl", b'["a"]\n', "line 1 is not a JSON object"),
])
def test_unreadable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        list(ListFileSource(str(path), {}).pages())
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    url = str(tmp_path / "nope.csv")
    with pytest.raises(InputError, match="cannot read list file .*nope.csv.*FileNotFound"):
        list(ListFileSource(url, {}).pages())


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunked_reads_bounded_pages_and_resume(tmp_path, fmt):
    n, chunk = 5000, 64
    df = pd.DataFrame({"path": [f"images/some-longer-folder-name/img-{i:06d}.jpg"
                                for i in range(n)],
                       "label": [f"class-{i % 7}" for i in range(n)],
                       # Numbers in the first CSV block, text in the last: not to be read.
                       "width": [str(i) for i in range(n - 1)] + ["wide"]})
    url = write(tmp_path, df, fmt, **({"row_group_size": 1000} if fmt == "parquet" else {}))
    expected = [(str(tmp_path / p), label) for p, label in zip(df["path"], df["label"])]

    source = ListFileSource(url, {}, chunk_rows=chunk)
    pages = list(source.pages())
    assert all(0 < p.num_rows <= chunk for p in pages)
    assert len(pages) >= n // chunk
    assert read(source) == expected
    assert source.stats.requests > 1  # more than one read: the file is never read whole
    assert source.stats.keys == 2 * n  # two passes over every row

    for k in (1, chunk - 1, chunk, chunk + 1, 1000, 2500, n - 1, n, n + 10):
        assert read(ListFileSource(url, {}, chunk_rows=chunk), after=k) == expected[k:], k
    if fmt == "parquet":  # whole row groups before the position are not read at all
        resumed = ListFileSource(url, {}, chunk_rows=chunk)
        assert read(resumed, after=2500) == expected[2500:]
        assert resumed.stats.keys == 3000


# -- in a bucket ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["parquet", "csv.gz", "jsonl"])
def test_list_file_in_a_bucket(s3, fmt):
    df = pd.DataFrame({"path": ["cat/a.jpg", "../elsewhere/b.jpg", "s3://other/c.jpg",
                                "/local/d.jpg", None],
                       "label": ["cat", "dog", None, "cat", "x"]})
    s3.put(f"lists/train.{fmt}", encode(df, fmt))
    url = s3.url(f"lists/train.{fmt}")
    b = s3.name
    source = ListFileSource(url, s3.options(), chunk_rows=2)
    assert source.url == url
    assert read(source) == [(f"s3://{b}/lists/cat/a.jpg", "cat"),
                            (f"s3://{b}/elsewhere/b.jpg", "dog"), ("s3://other/c.jpg", None),
                            ("/local/d.jpg", "cat"), (f"{url}#row=4", "x")]
    assert read(ListFileSource(url, s3.options(), chunk_rows=2), after=3) == [
        ("/local/d.jpg", "cat"), (f"{url}#row=4", "x")]
    assert all(r.method in ("GET", "HEAD") for r in s3.proxy.to(b))  # read over HTTP
    assert s3.proxy.to(b)


def test_missing_path_column_in_a_bucket(s3):
    s3.put("l.csv", b"url,label\na.jpg,x\n")
    with pytest.raises(InputError, match=f"list file s3://{s3.name}/l.csv has no 'path'"):
        list(ListFileSource(s3.url("l.csv"), s3.options()).pages())


def test_an_output_made_before_input_formats_were_recorded_is_read_as_then(tmp_path):
    """Such a manifest has no `input_format`: its INPUT was read by name alone, so a rerun
    reads a list file as a list file (not by what is in it now), finished plan or not; and
    --overwrite, which replaces OUTPUT, goes by INPUT alone."""
    import json

    from bottleneck.extraction.job import ExtractOptions
    from bottleneck.inputs import open_source
    from bottleneck.runner.plan import LISTED, PLAN_DIR

    lst = tmp_path / "list.parquet"
    # Image bytes beside the paths: read afresh, it is an image table.
    pq.write_table(pa.table({"png": [b"\x89PNG"], "name": ["a"]}), lst)
    out = tmp_path / "out"
    out.mkdir()
    (out / "_bottleneck.json").write_text(json.dumps(
        {"kind": "features", "settings": {}, "input_url": str(lst), "shard_size": 256}))
    for finished in (False, True):
        if finished:
            (out / PLAN_DIR).mkdir()
            (out / PLAN_DIR / LISTED).write_text("{}")
        source, _ = open_source(str(lst), str(out), {})
        assert source.format == "list", finished
    o = ExtractOptions(input=str(lst), output=str(out), overwrite=True)
    assert open_source(str(lst), str(out), {}, o)[0].format == "parquet"
