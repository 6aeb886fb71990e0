"""A real OUTPUT read by the tools people feed features to: Ray Data, Hugging Face datasets,
DuckDB and Polars each get pyarrow's rows, labels and feature values, and the metadata
where the reader exposes it."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_images

from bottleneck.extraction import ExtractOptions, run_extract
from bottleneck.schema import METADATA_KEY

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def output(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("readers")
    write_images(root / "in", {"cat": 6, "dog": 5}, size=(40, 40))
    (root / "in" / "dog" / "broken.jpg").write_bytes(b"not an image")  # so _errors/ exists
    s = run_extract(ExtractOptions(str(root / "in"), str(root / "out"), weights="random",
                                   image_size=32, shard_size=4, progress=False))
    assert s.ok and (s.rows, s.errors) == (11, 1)
    out = root / "out"
    assert (out / "_errors").is_dir()
    reference = pq.read_table(out).sort_by("path")
    return out, reference


def features_of(values) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float32) for v in values])


def assert_same_rows(out_ref, paths, labels, features) -> None:
    _, ref = out_ref
    order = np.argsort(paths)
    assert [paths[i] for i in order] == ref.column("path").to_pylist()
    assert [labels[i] for i in order] == ref.column("label").to_pylist()
    np.testing.assert_array_equal(features_of(features)[order],
                                  features_of(ref.column("features").to_pylist()))


def test_ray_data(output):
    import ray

    out, _ = output
    ds = ray.data.read_parquet(str(out))  # skips _errors/ and _bottleneck.json
    rows = ds.take_all()
    assert_same_rows(output, [r["path"] for r in rows], [r["label"] for r in rows],
                     [r["features"] for r in rows])


def test_hugging_face_datasets(output):
    """datasets keeps only its own schema metadata: ours is read with pyarrow, DuckDB…"""
    import datasets

    out, _ = output
    ds = datasets.load_dataset("parquet", data_files=str(out / "part-*.parquet"),
                               split="train")
    assert_same_rows(output, ds["path"], ds["label"], ds["features"])


def test_duckdb(output):
    import duckdb

    out, _ = output
    glob = str(out / "part-*.parquet")
    t = duckdb.sql(f"select path, label, features from read_parquet('{glob}')").arrow()
    if not hasattr(t, "column"):  # newer DuckDB hands out a record batch reader
        t = t.read_all()
    assert_same_rows(output, t.column("path").to_pylist(), t.column("label").to_pylist(),
                     t.column("features").to_pylist())
    meta = duckdb.sql(f"select value from parquet_kv_metadata('{out / 'part-00000.parquet'}') "
                      f"where key = '{METADATA_KEY.decode()}'").fetchall()[0][0]
    assert json.loads(meta)["labels"] == labels_of_part(out / "part-00000.parquet")


def labels_of_part(path) -> list[str]:
    """What a part's metadata names: the labels of its shard's files (all readable here)."""
    return sorted(set(pq.read_table(path).column("label").to_pylist()) - {None})


def test_polars(output):
    import polars as pl

    out, _ = output
    df = pl.read_parquet(str(out / "part-*.parquet"))
    assert_same_rows(output, df["path"].to_list(), df["label"].to_list(),
                     df["features"].to_list())
    meta = pl.read_parquet_metadata(str(out / "part-00000.parquet"))
    assert json.loads(meta[METADATA_KEY.decode()])["labels"] == labels_of_part(
        out / "part-00000.parquet")
