"""The extraction job end to end on a real local Ray cluster and real image files.

One input tree (good JPEGs and PNGs in two labels, a deeper folder, top-level files, hidden
files and four kinds of bad file) is extracted once per setting; the tests read what the
job wrote with pyarrow, pandas and DuckDB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import committed_parts, run_cli, write_images

from bottleneck.extraction import ExtractOptions, run_extract
from bottleneck.runner.manifest import MANIFEST, SUCCESS, OutputConflict
from bottleneck.runner.planning import Entry, Shard
from bottleneck.runner.pool import choose_layout
from bottleneck.schema import METADATA_KEY, MODEL_NAME, read_metadata

SIZE = 64  # 2×2×512 features: big enough to see the H, W, C order
SHARD = 5
BATCH = 4

BAD = {  # name → the reason the errors table must give
    "cat/empty.jpg": "empty file",
    "cat/notes.txt": "not an image",
    "dog/truncated.jpg": "unreadable image",
    "dog/header-only.png": "truncated PNG",
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """INPUT with 19 good images, 4 bad files and 3 hidden ones; what each should give."""
    from PIL import Image

    root = tmp_path_factory.mktemp("extract") / "in"
    good = write_images(root, {"cat": 9, None: 2}, size=(40, 48), fmt="JPEG", seed=1)
    good += write_images(root, {"dog": 7}, size=(50, 36), fmt="PNG", seed=2)
    deep = root / "dog" / "puppies" / "deep.jpg"
    deep.parent.mkdir()
    Image.fromarray(np.full((30, 30, 3), 90, np.uint8)).save(deep)
    good.append(deep)

    jpeg = (root / "cat" / "img-000.jpg").read_bytes()
    png = (root / "dog" / "img-000.png").read_bytes()
    (root / "cat" / "empty.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("a text file among the images\n" * 20)
    (root / "dog" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "dog" / "header-only.png").write_bytes(png[:33])
    for hidden in [".DS_Store", "cat/.thumb.jpg", ".cache/x.jpg"]:
        (root / hidden).parent.mkdir(parents=True, exist_ok=True)
        (root / hidden).write_bytes(jpeg)

    labels = {str(p): (p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1
                       else None) for p in good}
    return {"root": root, "good": labels, "bad": {str(root / k): v for k, v in BAD.items()},
            "listed": len(labels) + len(BAD)}


def options(tree: dict, out: Path, **kw) -> ExtractOptions:
    base = dict(input=str(tree["root"]), output=str(out), weights="random", image_size=SIZE,
                shard_size=SHARD, batch_size=BATCH, progress=False)
    base.update(kw)
    return ExtractOptions(**base)


@pytest.fixture(scope="module")
def first_run(ray_cluster, tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "features"
    summary = run_extract(options(tree, out))
    return out, summary


# -- the first run ------------------------------------------------------------------------

@pytest.mark.ray
def test_counts_are_exact(first_run, tree):
    out, s = first_run
    n_good, n_bad = len(tree["good"]), len(tree["bad"])
    assert (n_good, n_bad) == (19, 4)
    assert s.ok and not s.failed
    assert (s.images, s.rows, s.errors) == (23, 19, 4)
    assert (s.shards, s.shards_run, s.shards_skipped) == (5, 5, 0)
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{i}.parquet" for i in range(5)]
    assert pq.read_table(out).num_rows == 19


@pytest.mark.ray
def test_each_image_exactly_once_with_its_label(first_run, tree):
    out, _ = first_run
    t = pq.read_table(out, columns=["path", "label"])
    paths = t.column("path").to_pylist()
    assert len(paths) == len(set(paths))
    assert set(paths) == set(tree["good"])  # the listing minus the errors, hidden files skipped
    assert dict(zip(paths, t.column("label").to_pylist())) == tree["good"]
    # Rows come in listing order (sorted paths), shard after shard.
    assert paths == sorted(paths)


@pytest.mark.ray
def test_features_column_type_and_hwc_order(first_run, tree):
    out, _ = first_run
    t = pq.read_table(out)
    assert t.schema.field("features").type == pa.list_(pa.float32(), 2 * 2 * 512)
    assert t.schema.field("path").type == pa.string()
    assert t.schema.field("label").type == pa.string()

    # The same image through the conv base in this process, as Keras returns it (H, W, C).
    from bottleneck.images import DecodeOptions, decode_image, preprocess
    from bottleneck.model import build_conv_base, resolve_weights

    path = sorted(tree["good"])[3]
    x = preprocess(decode_image(Path(path).read_bytes(), DecodeOptions(SIZE, "bilinear"))[None])
    want = np.asarray(build_conv_base(resolve_weights("random"), SIZE)(x, training=False))[0]
    assert want.shape == (2, 2, 512)
    row = t.filter(pa.compute.equal(t.column("path"), path))
    got = np.asarray(row.column("features")[0].values, dtype=np.float32)
    scale = np.abs(want).max()
    assert scale > 0
    assert np.abs(got - want.reshape(-1)).max() <= 1e-4 * scale
    # Channels last: the wrong order would not match.
    assert np.abs(got - want.transpose(2, 0, 1).reshape(-1)).max() > 1e-2 * scale


@pytest.mark.ray
def test_schema_metadata_records_the_settings(first_run):
    out, _ = first_run
    for p in out.glob("part-*.parquet"):
        schema = pq.read_schema(p)
        meta = read_metadata(schema)
        # Each part names the labels of its shard's files (unreadable ones too); the whole
        # class list is in _SUCCESS.json.
        rows = set(pq.read_table(p).column("label").to_pylist()) - {None}
        assert rows <= set(meta.labels) <= {"cat", "dog"}
        s = meta.settings
        assert (s.weights, s.image_size, s.interpolation, s.pooling, s.dtype) == (
            "random:0", SIZE, "bilinear", "none", "float32")
        assert s.model == MODEL_NAME and "caffe" in s.preprocessing
        raw = json.loads(schema.metadata[METADATA_KEY])
        assert raw["feature_shape"] == [2, 2, 512]
        assert raw["settings"]["weights"] == "random:0"


@pytest.mark.ray
def test_pandas_and_duckdb_read_output_as_it_is(first_run, tree):
    import duckdb
    import pandas as pd

    out, _ = first_run
    df = pd.read_parquet(out)
    assert len(df) == 19 and list(df.columns) == ["path", "label", "features"]
    assert set(df["path"]) == set(tree["good"])
    assert df["label"].isna().sum() == 2
    assert len(df["features"].iloc[0]) == 2048

    con = duckdb.connect()
    n, distinct, length = con.execute(
        f"SELECT count(*), count(DISTINCT path), min(len(features)) "
        f"FROM read_parquet('{out}/*.parquet')").fetchone()
    assert (n, distinct, length) == (19, 19, 2048)
    by_label = dict(con.execute(
        f"SELECT coalesce(label, '<none>'), count(*) FROM read_parquet('{out}/*.parquet') "
        "GROUP BY 1").fetchall())
    assert by_label == {"cat": 9, "dog": 8, "<none>": 2}


@pytest.mark.ray
def test_errors_table_has_each_bad_file_once_with_its_reason(first_run, tree):
    out, _ = first_run
    errors = pq.read_table(out / "_errors")
    assert errors.schema.names == ["path", "error"]
    got = dict(zip(errors.column("path").to_pylist(), errors.column("error").to_pylist()))
    assert len(got) == errors.num_rows == 4
    assert set(got) == set(tree["bad"])
    for path, reason in tree["bad"].items():
        assert reason in got[path], (path, got[path])


@pytest.mark.ray
def test_markers_and_nothing_else_beside_the_results(first_run, tree):
    out, _ = first_run
    marker = json.loads((out / SUCCESS).read_text())
    assert (marker["images"], marker["rows"], marker["errors"], marker["shards"]) == (23, 19, 4, 5)
    assert marker["settings"]["image_size"] == SIZE
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["shard_size"] == SHARD and manifest["input_url"] == str(tree["root"])
    listed = json.loads((out / "_plan" / "_listed.json").read_text())
    assert (listed["entries"], listed["shards"]) == (23, 5)
    # Everything that is not a result starts with _ or . (so readers skip it).
    for p in out.iterdir():
        assert p.name.startswith(("part-", "_", ".")), p.name
    assert not (out / "_lock.json").exists()


# -- reruns -------------------------------------------------------------------------------

@pytest.mark.ray
def test_rerun_does_nothing(first_run, tree):
    out, _ = first_run
    before = committed_parts(out)
    s = run_extract(options(tree, out))
    assert (s.shards_run, s.shards_skipped, s.rows, s.errors) == (0, 5, 19, 4)
    assert committed_parts(out) == before
    assert json.loads((out / SUCCESS).read_text())["rows"] == 19


@pytest.mark.ray
def test_a_deleted_part_is_the_only_one_redone(first_run, tree):
    out, _ = first_run
    before = committed_parts(out)
    rows_before = pq.read_table(out / "part-00002.parquet").to_pydict()
    (out / "part-00002.parquet").unlink()
    s = run_extract(options(tree, out))
    assert (s.shards_run, s.shards_skipped, s.rows, s.errors) == (1, 4, 19, 4)
    assert [r.index for r in s.results] == [2]
    after = committed_parts(out)
    assert after.keys() == before.keys()
    for name in before:
        if name != "part-00002.parquet":
            assert after[name] == before[name], name
    assert after["part-00002.parquet"][1] != before["part-00002.parquet"][1]  # rewritten
    assert pq.read_table(out / "part-00002.parquet").to_pydict()["path"] == rows_before["path"]
    # Errors are still each listed once.
    assert pq.read_table(out / "_errors").num_rows == 4


@pytest.mark.ray
def test_settings_mismatch_is_refused_then_overwrite_replaces(first_run, tree, tmp_path):
    """Runs last on this OUTPUT: it replaces it with avg-pooled features."""
    out, _ = first_run
    before = committed_parts(out)
    with pytest.raises(OutputConflict) as e:
        run_extract(options(tree, out, image_size=32))
    assert "image_size: 64 in OUTPUT, 32 now" in str(e.value)
    with pytest.raises(OutputConflict) as e:
        run_extract(options(tree, out, pooling="avg", weights="random:1"))
    assert "pooling: 'none' in OUTPUT, 'avg' now" in str(e.value)
    assert "weights: 'random:0' in OUTPUT, 'random:1' now" in str(e.value)
    with pytest.raises(OutputConflict, match="shard_size: 5 in OUTPUT, 4 now"):
        run_extract(options(tree, out, shard_size=4))
    assert committed_parts(out) == before  # nothing touched

    # --overwrite replaces, and --pooling avg gives 512 values.
    s = run_extract(options(tree, out, pooling="avg", overwrite=True))
    assert (s.shards_run, s.rows, s.errors) == (5, 19, 4)
    t = pq.read_table(out)
    assert t.schema.field("features").type == pa.list_(pa.float32(), 512)
    assert t.num_rows == 19 and set(t.column("path").to_pylist()) == set(tree["good"])
    for p in out.glob("part-*.parquet"):
        assert read_metadata(pq.read_schema(p)).settings.pooling == "avg"
    assert json.loads((out / MANIFEST).read_text())["settings"]["pooling"] == "avg"


@pytest.mark.ray
def test_another_input_into_the_same_output_is_refused(ray_cluster, tree, tmp_path):
    other = tmp_path / "other-in"
    write_images(other, {"x": 3}, size=(32, 32))
    out = tmp_path / "out"
    run_extract(options(tree, out, image_size=32, pooling="max"))
    with pytest.raises(OutputConflict, match="INPUT: "):
        run_extract(options(tree, out, image_size=32, pooling="max", input=str(other)))
    # A file added to INPUT is not seen by a rerun, which reads the plan in OUTPUT; --relist
    # plans it as a new shard, leaving the finished ones as they are.
    extra = tree["root"] / "cat" / "zz-late.jpg"
    extra.write_bytes((tree["root"] / "cat" / "img-001.jpg").read_bytes())
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    try:
        again = run_extract(options(tree, out, image_size=32, pooling="max"))
        assert (again.images, again.shards_run) == (23, 0)
        relisted = run_extract(options(tree, out, image_size=32, pooling="max", relist=True))
        assert (relisted.images, relisted.shards_run, relisted.rows) == (24, 1, 20)
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")
                if p.name in before} == before
    finally:
        extra.unlink()


@pytest.mark.ray
def test_float16_features(ray_cluster, tree, tmp_path):
    out = tmp_path / "f16"
    s = run_extract(options(tree, out, image_size=32, dtype="float16", shard_size=16, batch_size=8))
    assert (s.rows, s.errors, s.shards) == (19, 4, 2)
    t = pq.read_table(out)
    assert t.schema.field("features").type == pa.list_(pa.float16(), 512)
    assert read_metadata(t.schema).settings.dtype == "float16"
    values = t.column("features").combine_chunks().values.to_numpy(zero_copy_only=False)
    assert values.dtype == np.float16 and np.isfinite(values).all() and values.max() > 0


# -- scheduling ---------------------------------------------------------------------------

def test_choose_layout():
    gpu = choose_layout(2, 2)
    assert (gpu.actors, gpu.num_gpus) == (2, 1.0) and gpu.num_cpus <= 1
    assert choose_layout(16, 4).actors == 4
    assert choose_layout(8, 4, gpus_per_actor=0.5).actors == 8
    assert choose_layout(8, 4, actors=2).actors == 2
    cpu = choose_layout(2, 0)
    assert (cpu.actors, cpu.num_gpus, cpu.num_cpus, cpu.threads) == (1, 0.0, 2, 2)
    big = choose_layout(32, 0)
    assert big.actors * big.num_cpus <= 32 and big.actors >= 2
    assert choose_layout(8, 0, actors=4).num_cpus == 2
    # Four nodes of 4 CPUs: actors of 4, one a node, never one that no node can hold.
    small_nodes = choose_layout(16, 0, node_cpus=4)
    assert (small_nodes.actors, small_nodes.num_cpus) == (4, 4)
    assert choose_layout(16, 0, actors=2, node_cpus=4).num_cpus == 4


GPU_SCRIPT = """
import json, sys
import ray
from bottleneck.extraction import ExtractOptions, run_extract

# A fresh private cluster that declares 2 GPUs (no GPU is needed to schedule on them).
ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False,
         logging_level="WARNING")
s = run_extract(ExtractOptions(input=sys.argv[1], output=sys.argv[2], weights="random",
                               image_size=32, shard_size=4, batch_size=4, progress=False))
res = ray.cluster_resources()
print("RESULT " + json.dumps({
    "layout": s.layout, "rows": s.rows, "errors": s.errors, "shards_run": s.shards_run,
    "workers": {r.index: [r.worker, list(r.gpu_ids)] for r in s.results},
    "gpus": res.get("GPU"),
}))
ray.shutdown()
"""


@pytest.mark.ray
def test_one_actor_per_gpu(tree, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    script = tmp_path / "gpu_job.py"
    script.write_text(textwrap.dedent(GPU_SCRIPT))
    proc = subprocess.run([sys.executable, str(script), str(tree["root"]), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line.removeprefix("RESULT "))
    assert r["gpus"] == 2
    assert r["layout"].startswith("2 actor(s), each 1 GPU")
    assert (r["rows"], r["errors"], r["shards_run"]) == (19, 4, 6)
    workers = {w for w, _ in r["workers"].values()}
    assert len(workers) == 2, r["workers"]  # both actors really ran shards
    gpu_of = {w: tuple(g) for w, g in r["workers"].values()}
    assert all(len(g) == 1 for g in gpu_of.values())  # each reserved exactly one GPU
    assert set(gpu_of.values()) == {("0",), ("1",)}  # and not the same one


# -- the per-shard work without Ray -------------------------------------------------------

@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    from bottleneck.extraction.extractor import ExtractConfig, Extractor
    from bottleneck.model import resolve_weights
    from bottleneck.schema import FeatureSettings

    out = tmp_path_factory.mktemp("inproc") / "out"
    out.mkdir()
    weights = resolve_weights("random")
    config = ExtractConfig(settings=FeatureSettings(weights=weights.identity, image_size=32),
                           weights=weights, output_url=str(out), batch_size=BATCH)
    ex = Extractor(config)
    yield ex, out
    ex.close()


def entry(path: str, label: str | None) -> Entry:
    return Entry(path=path, url=path, label=label)


def test_process_shard_in_process(extractor, tree):
    ex, out = extractor
    good = sorted(tree["good"])[:6]
    bad = sorted(tree["bad"])[:2]
    es = tuple(sorted([entry(p, tree["good"][p]) for p in good] + [entry(p, "x") for p in bad],
                      key=lambda e: e.path))
    seen = []
    r = ex.process_shard(Shard(7, es),
                         progress=lambda i, done, err: seen.append((i, done, err)))
    assert (r.index, r.rows, r.errors) == (7, 6, 2)
    assert r.seconds["total"] >= r.seconds["inference"] > 0
    assert seen[-1] == (7, 8, 2)
    t = pq.read_table(out / "part-00007.parquet")
    assert t.column("path").to_pylist() == good
    assert t.column("label").to_pylist() == [tree["good"][p] for p in good]
    assert t.schema.field("features").type == pa.list_(pa.float32(), 512)
    # The labels of the shard's files, readable or not.
    assert read_metadata(t.schema).labels == sorted({tree["good"][p] for p in good} - {None}
                                                    | {"x"})
    errs = pq.read_table(out / "_errors" / "part-00007.parquet")
    assert sorted(errs.column("path").to_pylist()) == bad
    # Nothing but the committed files: the staging area is empty.
    assert list((out / "_tmp").iterdir()) == []


def test_a_shard_of_only_bad_files_commits_an_empty_part(extractor, tree):
    ex, out = extractor
    es = tuple(entry(p, None) for p in sorted(tree["bad"]))
    r = ex.process_shard(Shard(8, es))
    assert (r.rows, r.errors) == (0, 4)
    assert pq.read_table(out / "part-00008.parquet").num_rows == 0
    assert pq.read_table(out / "_errors" / "part-00008.parquet").num_rows == 4


def test_a_redone_shard_drops_the_errors_of_an_earlier_try(extractor, tree):
    ex, out = extractor
    bad = sorted(tree["bad"])[0]
    good = sorted(tree["good"])[0]
    ex.process_shard(Shard(9, (entry(bad, None), entry(good, "cat"))))
    assert (out / "_errors" / "part-00009.parquet").exists()
    ex.process_shard(Shard(9, (entry(good, "cat"),)))  # the file was fixed meanwhile
    assert not (out / "_errors" / "part-00009.parquet").exists()
    assert pq.read_table(out / "part-00009.parquet").num_rows == 1


def test_in_process_features_equal_the_model(extractor, tree):
    from bottleneck.images import DecodeOptions, decode_image, preprocess

    ex, out = extractor
    paths = sorted(tree["good"])[:5]  # 5 images, batch 4: one padded batch
    ex.process_shard(Shard(10, tuple(entry(p, None) for p in paths)))
    got = np.stack(pq.read_table(out / "part-00010.parquet").column("features").to_numpy(
        zero_copy_only=False)).astype(np.float32)
    x = preprocess(np.stack([decode_image(Path(p).read_bytes(), DecodeOptions(32, "bilinear"))
                             for p in paths]))
    want = np.asarray(ex.run_model.model(x, training=False)).reshape(5, -1)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# -- OUTPUT bookkeeping without Ray -------------------------------------------------------

def a_manifest(**kw):
    from bottleneck.runner.manifest import Manifest

    base = dict(kind="features", settings={"image_size": 32, "pooling": "none"},
                input_url="/in", shard_size=4)
    base.update(kw)
    return Manifest(**base)


def test_a_rerun_removes_the_earlier_success_marker_until_it_succeeds(tmp_path):
    """A deleted part being redone (or failing) must not sit beside an old 'finished'."""
    from bottleneck.runner.manifest import prepare_output
    from bottleneck.storage import Storage

    out = Storage(str(tmp_path))
    prepare_output(out, a_manifest(), overwrite=False)
    out.write_json_atomic({"rows": 10}, SUCCESS)
    assert prepare_output(out, a_manifest(), overwrite=False) is True  # resumes
    assert not (tmp_path / SUCCESS).exists()


def test_mismatch_is_found_before_ray_with_every_difference_named(tmp_path, tree):
    from bottleneck.extraction import check_extract
    from bottleneck.runner.manifest import prepare_output
    from bottleneck.storage import Storage

    out = tmp_path / "out"
    c = check_extract(options(tree, out, image_size=32))
    prepare_output(Storage(str(out)), a_manifest(settings=c.settings.to_dict(),
                                                  input_url=c.source.url, shard_size=SHARD),
                   overwrite=False)
    check_extract(options(tree, out, image_size=32))  # same settings: fine
    with pytest.raises(OutputConflict) as e:
        check_extract(options(tree, out, image_size=48, interpolation="nearest", shard_size=8))
    msg = str(e.value)
    for diff in ["image_size: 32 in OUTPUT, 48 now", "interpolation: 'bilinear' in OUTPUT, "
                 "'nearest' now", "shard_size: 5 in OUTPUT, 8 now", "--overwrite"]:
        assert diff in msg
    check_extract(options(tree, out, image_size=48, overwrite=True))  # allowed


def test_a_corrupt_manifest_is_a_conflict_not_a_crash(tmp_path, tree):
    from bottleneck.extraction import check_extract

    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text("{not json")
    with pytest.raises(OutputConflict, match="unreadable _bottleneck.json"):
        check_extract(options(tree, out))


def test_part_files_without_a_manifest_are_not_adopted(tmp_path):
    from bottleneck.runner.manifest import prepare_output
    from bottleneck.storage import Storage

    (tmp_path / "part-00000.parquet").write_bytes(b"x")
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(OutputConflict, match="no _bottleneck.json"):
        prepare_output(Storage(str(tmp_path)), a_manifest(), overwrite=False)
    prepare_output(Storage(str(tmp_path)), a_manifest(), overwrite=True)
    assert not (tmp_path / "part-00000.parquet").exists()
    assert (tmp_path / "mine.txt").exists()  # --overwrite removes only what is ours


@pytest.mark.ray
def test_reader_counts_and_metadata_from_footers(first_run):
    from bottleneck.runner.output import count_rows, dataset_metadata, part_paths
    from bottleneck.storage import Storage

    out, _ = first_run
    store = Storage(str(out))
    assert count_rows(store) == (19, 4)
    assert [p.rsplit("/", 1)[-1] for p in part_paths(store)] == [
        f"part-0000{i}.parquet" for i in range(5)]
    first = pq.read_table(out / "part-00000.parquet").column("label").to_pylist()
    assert set(first) - {None} <= set(dataset_metadata(store).labels)  # its own shard's
    # The whole class list, counting every file planned (unreadable ones too).
    assert json.loads((out / "_SUCCESS.json").read_text())["labels"] == {"cat": 11, "dog": 10}


@pytest.mark.ray
def test_info_names_the_missing_shards_of_a_half_finished_output(ray_cluster, tree, tmp_path):
    out = tmp_path / "out"  # its own: other tests change first_run's OUTPUT
    assert run_extract(options(tree, out)).ok
    half = tmp_path / "half"
    shutil.copytree(out, half)
    (half / "part-00002.parquet").unlink()
    (half / SUCCESS).unlink()
    proc = run_cli("info", str(half))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "NO-RAY"
    assert "NOT finished: 1 shard(s) missing, 4 of 5 shards committed" in proc.stdout
    assert "missing:  part-00002.parquet" in proc.stdout
    info = json.loads(run_cli("info", str(half), "--json").stdout)
    assert info["kind"] == "features" and info["finished"] is False
    assert info["shards"] == {"planned": 5, "committed": 4, "missing": ["part-00002.parquet"]}
    assert info["listing"]["finished"] is True and info["listing"]["entries"] == 23
    assert info["rows"] == 19 - pq.read_metadata(out / "part-00002.parquet").num_rows
    assert sum(info["labels"].values()) == info["rows"] and info["errors"] == 4
    assert info["settings"]["image_size"] == SIZE and info["feature_shape"] == [2, 2, 512]
    done = json.loads(run_cli("info", str(out), "--json").stdout)
    assert done["finished"] is True and done["shards"]["missing"] == [] and done["rows"] == 19


def test_the_ceiling_benchmarks_stand_in_replays_recorded_outputs_in_place_of_the_model(
        tree, tmp_path):
    """`benchmark --ceiling` swaps the conv base for recorded outputs: the rows must be
    those outputs in turn, through the same reader, writer and commit, and no model built."""
    from bottleneck.extraction.extractor import ExtractConfig, Extractor, Replay
    from bottleneck.model import resolve_weights
    from bottleneck.schema import FeatureSettings

    recorded = np.random.default_rng(3).random((5, 1, 1, 512), dtype=np.float32)
    weights = resolve_weights("random")
    config = ExtractConfig(settings=FeatureSettings(weights=weights.identity, image_size=32),
                           weights=weights, output_url=str(tmp_path), batch_size=BATCH,
                           stand_in=recorded)
    ex = Extractor(config)
    assert isinstance(ex.run_model, Replay)
    good = sorted(tree["good"])[:7]
    r = ex.process_shard(Shard(0, tuple(entry(p, tree["good"][p]) for p in good)))
    ex.close()
    assert r.rows == 7 and r.seconds["total"] >= r.seconds["write"] > 0
    got = np.stack(pq.read_table(tmp_path / "part-00000.parquet").column("features")
                   .to_numpy(zero_copy_only=False))
    want = recorded.reshape(5, -1)[np.arange(7) % 5]
    assert np.array_equal(got, want)
