"""The three kinds of image INPUT end to end on a real local Ray: loose files in class
folders, img2dataset's WebDataset tars and a Hugging Face Parquet table.

The same photos (24 JPEGs and a PNG of noise, three classes) are written the three ways by
`bottleneck.tools.formats`, the bytes stored as is, so every layout must give the same
features row for row; bad tars and a bad table must cost only their bad samples.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import bottleneck_command, committed_parts
from s3fixtures import KEY_ID, SECRET, s3, s3_server  # noqa: F401 - fixtures

import bottleneck
from bottleneck.runner.output import read_errors
from bottleneck.storage import Storage
from bottleneck.tools.formats import (
    Photo,
    classes,
    tar_member,
    write_hf_parquet,
    write_loose,
    write_tars,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SIZE = 32
WEIGHTS = "random:7"
CLASSES = ("bird", "cat", "dog")
PER_TAR = 9  # write_tars splits 25 photos into 3 tars as 9, 9, 7
PNG_AT = 12  # the one PNG among the JPEGs


def encode(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def make_photos(n: int, per_tar: int, seed: int = 0, png_at: int | None = None
                ) -> list[Photo]:
    """n photos of noise, classes in turn, keyed as img2dataset keys them (tar, index)."""
    rng = np.random.default_rng(seed)
    return [Photo(f"{i // per_tar:04d}{i % per_tar:05d}",
                  encode(rng, "PNG" if i == png_at else "JPEG"), CLASSES[i % 3],
                  "png" if i == png_at else "jpg", f"photo {i}")
            for i in range(n)]


def extract(input: str | Path, output: str | Path, **kw):
    base = dict(weights=WEIGHTS, image_size=SIZE, batch_size=4, shard_size=6, progress=False)
    return bottleneck.extract(str(input), str(output), **{**base, **kw})


Row = tuple[str, "str | None", np.ndarray]  # path, label, features


def rows_by_key(table, key_of: Callable[[str], str]) -> dict[str, Row]:
    """A feature table's rows by photo key; a key met twice fails."""
    paths = table.column("path").to_pylist()
    labels = table.column("label").to_pylist()
    feats = np.asarray(table.column("features").combine_chunks().flatten(),
                       np.float32).reshape(len(paths), -1)
    out: dict[str, Row] = {}
    for path, label, f in zip(paths, labels, feats):
        key = key_of(path)
        assert key not in out, f"{key} twice: {out[key][0]} and {path}"
        out[key] = (path, label, f)
    return out


def tar_key(path: str) -> str:
    return path.rsplit("#", 1)[1]


def row_number(path: str) -> int:
    return int(path.rsplit("#row=", 1)[1])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# -- the inputs --------------------------------------------------------------------------

def sample(tar: tarfile.TarFile, key: str, label: str, image: bytes | None,
           ext: str = "jpg") -> None:
    """One img2dataset sample: KEY.EXT (unless `image` is None), KEY.json, KEY.cls."""
    if image is not None:
        tar_member(tar, f"{key}.{ext}", image)
    tar_member(tar, f"{key}.json", json.dumps({"key": key, "label": label}).encode())
    tar_member(tar, f"{key}.cls", str(CLASSES.index(label)).encode())


def write_bad_tars(folder: Path, rng: np.random.Generator) -> dict:
    """00000.tar: a sample with no image, a duplicate key, a blob that is no image, among
    good ones; 00001.tar: cut short inside its last sample's image. Returns the good keys
    with their labels and the bad keys with the words their error must hold."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        sample(tar, "a0", "cat", encode(rng))
        sample(tar, "a1", "dog", None)
        sample(tar, "a2", "bird", encode(rng, "PNG"), "png")
        sample(tar, "a0", "dog", encode(rng))  # the same key again, later in the tar
        sample(tar, "a3", "cat", b"these bytes are no image at all " * 8)
        sample(tar, "a4", "dog", encode(rng))
    with tarfile.open(folder / "00000.tar") as tar:
        again = [m.offset for m in tar.getmembers() if m.name == "a0.jpg"][1]
    cut = folder / "00001.tar"
    with tarfile.open(cut, "w", format=tarfile.GNU_FORMAT) as tar:
        sample(tar, "b0", "bird", encode(rng))
        sample(tar, "b1", "cat", encode(rng))
        tar_member(tar, "b2.jpg", encode(rng))
        sample(tar, "b2", "dog", None)
    with tarfile.open(cut) as tar:
        image = tar.getmember("b2.jpg")
        end = image.offset_data + image.size // 2
    cut.write_bytes(cut.read_bytes()[:end])
    return {"good": {"00000.tar#a0": "cat", "00000.tar#a2": "bird", "00000.tar#a4": "dog",
                     "00001.tar#b0": "bird", "00001.tar#b1": "cat"},
            # The duplicate's row is named apart from the first's: KEY@its header's byte.
            "bad": {"00000.tar#a1": "no image in sample",
                    f"00000.tar#a0@{again}": "duplicate key",
                    "00000.tar#a3": "not an image", "00001.tar#b2": "tar cut short"}}


def write_bad_table(path: Path, rng: np.random.Generator) -> dict:
    """A Hugging Face table of 6 rows: row 1 a null image, row 4 bytes that are no image."""
    import datasets

    images = [{"bytes": encode(rng), "path": f"r{i}.jpg"} for i in range(6)]
    images[1] = None
    images[4] = {"bytes": b"\x00\x01 not an image either " * 8, "path": "r4.jpg"}
    labels = [0, 1, 2, 0, 1, 2]
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=list(CLASSES))})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features
                               ).to_parquet(str(path), batch_size=2)
    return {"good": {f"#row={i}": CLASSES[labels[i]] for i in (0, 2, 3, 5)},
            "bad": {"#row=1": "null image", "#row=4": "not an image"}}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The 25 photos as loose files, 3 tars (with img2dataset's sidecars) and one table in
    row groups of 4; and the bad tars and bad table."""
    root = tmp_path_factory.mktemp("formats")
    photos = make_photos(25, PER_TAR, png_at=PNG_AT)
    assert classes(photos) == list(CLASSES)
    write_loose(photos, root / "loose")
    write_tars(photos, root / "tars", tars=3)
    write_hf_parquet(photos, root / "table.parquet", row_group_size=4)
    rng = np.random.default_rng(99)
    return {"root": root, "photos": photos, "loose": root / "loose", "tars": root / "tars",
            "table": root / "table.parquet",
            "bad_tars": root / "bad" / "tars", "bad_table": root / "bad" / "table.parquet",
            "bad_tar_rows": write_bad_tars(root / "bad" / "tars", rng),
            "bad_table_rows": write_bad_table(root / "bad" / "table.parquet", rng)}


@pytest.fixture(scope="module")
def parity(ray_cluster, inputs, tmp_path_factory) -> dict:
    """Each layout extracted once, to an OUTPUT of its own."""
    out = tmp_path_factory.mktemp("parity")
    runs = {"loose": extract(inputs["loose"], out / "loose"),
            "tars": extract(inputs["tars"], out / "tars", label_field="label"),
            "table": extract(inputs["table"], out / "table")}
    # Decode workers (explicit: auto leaves them off for these kinds), where one entry is a
    # whole tar, or a row group's rows: their batches must come back whole and in order.
    remote = {"tars": extract(inputs["tars"], out / "tars-dw", label_field="label",
                              decode_workers=1),
              "table": extract(inputs["table"], out / "table-dw", decode_workers=1)}
    for name, s in {**runs, **{f"{k} with decode workers": v for k, v in remote.items()}}.items():
        assert s.ok, (name, s.lines())
    return {"out": out, "summaries": runs, "decode_workers": remote}


# -- 1. parity ---------------------------------------------------------------------------

def test_every_layout_gives_the_same_features_labels_and_counts(inputs, parity):
    """The same bytes read from a folder, from tars and from a table must give the same
    feature row, the same label and a path naming where the row came from: a reader that
    mixed up rows, keys or labels (or read a tar's sidecar .parquet) would break it."""
    photos, out = inputs["photos"], parity["out"]
    by_key = {p.key: p for p in photos}
    order = [p.key for p in photos]
    loose = rows_by_key(pq.read_table(out / "loose"), lambda p: Path(p).stem)
    tars = rows_by_key(pq.read_table(out / "tars"), tar_key)
    table = rows_by_key(pq.read_table(out / "table"), lambda p: order[row_number(p)])
    for got in (loose, tars, table):
        assert sorted(got) == sorted(order)
    for key, p in by_key.items():
        i = order.index(key)
        assert loose[key][0] == str(inputs["loose"] / p.label / f"{key}.{p.ext}")
        assert tars[key][0] == f"{inputs['tars']}/{i // PER_TAR:05d}.tar#{key}"
        assert table[key][0] == f"{inputs['table']}#row={i}"
        assert loose[key][1] == tars[key][1] == table[key][1] == p.label
        assert np.abs(loose[key][2]).max() > 0
        assert np.array_equal(loose[key][2], tars[key][2]), key
        assert np.array_equal(loose[key][2], table[key][2]), key
    # Distinct photos give distinct rows: features matched to the wrong key would show.
    assert len({loose[k][2].tobytes() for k in order}) == len(order)

    counts = dict(Counter(p.label for p in photos))
    for name, fmt, options in (("loose", "folder", {}),
                               ("tars", "webdataset", {"label_field": "label"}),
                               ("table", "parquet", {"image_column": "image",
                                                     "label_column": "label"})):
        manifest = read_json(out / name / "_bottleneck.json")
        assert (manifest["input_format"], manifest["input_options"]) == (fmt, options), name
        success = read_json(out / name / "_SUCCESS.json")
        assert success["input_format"] == fmt
        assert success["labels"] == counts, name
        assert (success["rows"], success["errors"]) == (25, 0), name
    s = parity["summaries"]
    assert (s["tars"].images, s["tars"].shards, s["tars"].rows) == (3, 3, 25)  # 3 tars
    assert (s["table"].images, s["table"].shards, s["table"].rows) == (25, 5, 25)


def test_decode_workers_give_tars_and_tables_the_same_rows(parity):
    out = parity["out"]
    for name in ("tars", "table"):
        assert "decode worker" in parity["decode_workers"][name].layout, name
        local, remote = pq.read_table(out / name), pq.read_table(out / f"{name}-dw")
        assert remote.sort_by("path").equals(local.sort_by("path")), name


# -- 2. bad data -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_runs(ray_cluster, inputs, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bad")
    return {"tars": (out / "tars", extract(inputs["bad_tars"], out / "tars",
                                           label_field="label")),
            "table": (out / "table", extract(inputs["bad_table"], out / "table",
                                             shard_size=4))}


@pytest.mark.parametrize("kind", ["tars", "table"])
def test_bad_samples_cost_one_error_row_each_and_nothing_else(inputs, bad_runs, kind):
    """A sample with no image, a duplicate key, a blob, a tar cut short, a null cell, bytes
    that are no image: each must be exactly one error row with its reason, and every good
    sample exactly one feature row with its label, and the job must still succeed."""
    out, summary = bad_runs[kind]
    assert summary.ok, summary.lines()
    base = str(inputs["bad_tars"]) + "/" if kind == "tars" else str(inputs["bad_table"])
    expected = inputs["bad_tar_rows" if kind == "tars" else "bad_table_rows"]
    t = pq.read_table(out)
    got = dict(zip(t.column("path").to_pylist(), t.column("label").to_pylist()))
    assert len(got) == t.num_rows  # no path twice
    assert got == {base + k: v for k, v in expected["good"].items()}
    errors = read_errors(Storage(str(out)))
    assert sorted(p for p, _ in errors) == sorted(base + k for k in expected["bad"])
    reasons = dict(errors)
    for k, words in expected["bad"].items():
        assert words in reasons[base + k], (k, reasons[base + k])
    assert (summary.rows, summary.errors) == (len(expected["good"]), len(expected["bad"]))
    success = read_json(out / "_SUCCESS.json")
    assert (success["rows"], success["errors"]) == (summary.rows, summary.errors)


# -- 3. resume and overwrite -------------------------------------------------------------

def test_tar_rerun_resumes_and_other_label_field_is_refused_unless_overwrite(
        inputs, parity, tmp_path):
    """A finished tar extract rerun runs nothing and rewrites nothing; the same tars read
    with another label field would give other labels, so mixing them into OUTPUT must be
    refused, naming the INPUT options, and --overwrite must redo every shard."""
    out = tmp_path / "tars"
    shutil.copytree(parity["out"] / "tars", out)
    before = committed_parts(out)
    again = extract(inputs["tars"], out, label_field="label")
    assert again.ok and (again.shards_run, again.shards_skipped) == (0, 3)
    assert committed_parts(out) == before

    for other in (None, "caption"):
        with pytest.raises(bottleneck.UsageError, match="INPUT options") as refused:
            extract(inputs["tars"], out, label_field=other)
        assert "'label_field': 'label'" in str(refused.value)
    assert committed_parts(out) == before

    redone = extract(inputs["tars"], out, overwrite=True)  # labels: KEY.cls, the class index
    assert redone.ok and (redone.shards_run, redone.rows) == (3, 25)
    t = pq.read_table(out, columns=["path", "label"])
    want = {f"{p.key}": str(CLASSES.index(p.label)) for p in inputs["photos"]}
    assert dict(zip(map(tar_key, t.column("path").to_pylist()),
                    t.column("label").to_pylist())) == want
    assert read_json(out / "_bottleneck.json")["input_options"] == {}
    assert all(before[n][2] != v[2] for n, v in committed_parts(out).items())  # rewritten


# -- 4. a killed job resumes -------------------------------------------------------------

def wait_for(cond: Callable[[], bool], what: str, timeout: float = 240.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command and the Ray it started: the session it was started in."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    time.sleep(1)


def test_killed_tar_extract_resumes_without_rewriting_or_duplicating(tmp_path):
    """`bottleneck extract` of 12 tars is killed (the command and its Ray) once a part is
    committed: the rerun must redo only the missing tars, leave committed parts as they
    are, and give every sample exactly once, the bad one once in _errors/."""
    photos = make_photos(60, 5, seed=3)
    tars = tmp_path / "tars"
    write_tars(photos, tars, tars=12, sidecars=False)
    with tarfile.open(tars / "00011.tar", "a") as tar:
        sample(tar, "zz-blob", "cat", b"no image here " * 16)
    out = tmp_path / "out"
    cmd = bottleneck_command("extract", str(tars), str(out), "--address", "local",
                             "--no-progress", "--weights", WEIGHTS, "--image-size", str(SIZE),
                             "--batch-size", "2", "--label-field", "label")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: len(committed_parts(out)) >= 1, what="a committed tar")
    finally:
        kill_group(proc)
    before = committed_parts(out)
    assert 1 <= len(before) < 12, "the kill should land mid-job"
    assert not (out / "_SUCCESS.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    print(f"\n[killed tar extract] {len(before)} of 12 tars committed before the kill")
    after = committed_parts(out)
    assert {k: after[k] for k in before} == before  # not rewritten
    assert len(after) == 12
    t = pq.read_table(out, columns=["path", "label"])
    paths = t.column("path").to_pylist()
    assert sorted(paths) == sorted(f"{tars}/{int(p.key[:4]):05d}.tar#{p.key}" for p in photos)
    assert t.column("label").to_pylist() == [  # the photos' order is the tars' order
        p.label for p in sorted(photos, key=lambda p: p.key)]
    assert [p for p, _ in read_errors(Storage(str(out)))] == [f"{tars}/00011.tar#zz-blob"]
    assert f"{len(before)} shards already done" in r.stderr


# -- 5. on S3 ----------------------------------------------------------------------------

def test_tars_and_table_in_a_bucket_give_the_local_features_in_few_requests(
        inputs, parity, s3, ray_cluster, tmp_path):  # noqa: F811
    """Tars (by prefix and by brace pattern) and the table in a bucket must give the local
    rows, and be read in a few ranged reads, never one request per image: a reader that
    fetched member by member or row by row would cost a request per image on S3."""
    import s3fs

    for p in inputs["tars"].iterdir():
        s3.put(f"in/tars/{p.name}", p.read_bytes())
    # As `datasets` writes it by default: one row group here (up to 100 rows each).
    write_hf_parquet(inputs["photos"], tmp_path / "table.parquet")
    s3.put("in/table.parquet", (tmp_path / "table.parquet").read_bytes())
    fs = s3fs.S3FileSystem(endpoint_url=s3.server.moto_url, key=KEY_ID, secret=SECRET,
                           skip_instance_cache=True)
    local_tars = rows_by_key(pq.read_table(parity["out"] / "tars"), tar_key)
    order = [p.key for p in inputs["photos"]]

    def run(input: str, out: str, key_of: Callable[[str], str],
            path_of: Callable[[int, str], str], **kw) -> list:
        """Extract `input` to `out` in the bucket, check its rows against the local tars'
        and return the requests made to INPUT's keys."""
        s3.proxy.reset()
        s = extract(input, s3.url(out), **kw)
        assert s.ok, s.lines()
        got = rows_by_key(pq.read_table(f"{s3.name}/{out}", filesystem=fs), key_of)
        assert sorted(got) == sorted(order)
        for key, (path, label, f) in got.items():
            assert path == path_of(order.index(key), key)
            assert label == local_tars[key][1]
            assert np.array_equal(f, local_tars[key][2]), key
        return [r for r in s3.proxy.to(s3.name) if r.key.startswith("in/")]

    in_tar = f"s3://{s3.name}/in/tars/{{:05d}}.tar#{{}}"
    for input, out in ((s3.url("in/tars"), "out-prefix"),
                       (s3.url("in/tars/{00000..00002}.tar"), "out-brace")):
        reads = run(input, out, tar_key, lambda i, k: in_tar.format(i // PER_TAR, k),
                    label_field="label")
        per_tar = Counter(r.key for r in reads if r.method == "GET")
        print(f"\n[s3 tars] {input}: requests to INPUT keys {dict(Counter(r.key for r in reads))}")
        assert set(per_tar) == {f"in/tars/{n:05d}.tar" for n in range(3)}  # no sidecar read
        assert max(per_tar.values()) <= 3, per_tar

    reads = run(s3.url("in/table.parquet"), "out-table", lambda p: order[row_number(p)],
                lambda i, k: f"s3://{s3.name}/in/table.parquet#row={i}", shard_size=13)
    gets = [r for r in reads if r.method == "GET"]
    print(f"\n[s3 table] {len(gets)} GETs, {len(reads)} requests for 25 images, 2 shards")
    assert {r.key for r in reads} == {"in/table.parquet"}
    # Footers and column chunks: a few per open (planning twice, each shard once).
    assert len(gets) <= 10, [r.method for r in reads]


# -- 6. train and predict ----------------------------------------------------------------

def test_a_head_trained_on_tar_features_predicts_tables_and_tars(inputs, parity, tmp_path):
    """Predict reads the same INPUT kinds as extract: one prediction per readable image
    named `FILE#row=N` or `TAR#KEY`, and one error row per bad sample, nothing twice."""
    model = tmp_path / "model"
    bottleneck.train(str(parity["out"] / "tars"), str(model), epochs=2, batch_size=8,
                     verbose=0)
    for kind, source, rows in (("table", inputs["bad_table"], inputs["bad_table_rows"]),
                               ("tars", inputs["bad_tars"], inputs["bad_tar_rows"])):
        base = str(source) + ("/" if kind == "tars" else "")
        output = tmp_path / f"{kind}.parquet"
        s = bottleneck.predict(str(model), str(source), output=str(output), shard_size=4,
                               progress=False)
        assert s.ok and s.rows == len(rows["good"]), kind
        t = pq.read_table(output)
        paths = t.column("path").to_pylist()
        assert sorted(paths) == sorted(base + k for k in rows["good"]), kind
        assert set(t.column("prediction").to_pylist()) <= set(CLASSES)
        errors = pq.read_table(tmp_path / f"{kind}.errors.parquet").column("path").to_pylist()
        assert sorted(errors) == sorted(base + k for k in rows["bad"]), kind
        assert sorted(p for p, _ in s.errors) == sorted(errors)
    table = bottleneck.predict(str(model), str(inputs["table"]), progress=False)
    assert sorted(table.column("path").to_pylist(), key=row_number) == [
        f"{inputs['table']}#row={i}" for i in range(25)]
