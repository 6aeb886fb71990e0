"""The extraction job from a bucket to a bucket, on a real local Ray, against moto's S3
server over HTTP (through the counting, fault-injecting proxy of s3fixtures).

The Ray cluster (conftest's `ray_cluster`) starts before any AWS variable is set, so the
actors reach the bucket only through what the job hands them: the variables that
`bottleneck.runner.pool.worker_env` forwards, or --storage-options.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from s3fixtures import (  # noqa: F401 - fixtures
    KEY_ID,
    SECRET,
    Fault,
    S3Bucket,
    aws_environ,
    grep_tree,
    isolate_from_aws,
    new_bucket,
    s3,
    s3_server,
)

from bottleneck.extraction import ExtractOptions, ExtractSummary, run_extract
from bottleneck.schema import read_metadata

pytestmark = pytest.mark.ray

SEED = 7
LABELS = {"cat": 5, "dog": 4, None: 1}
BAD = {"in/cat/empty.jpg": b"", "in/dog/notes.jpg": b"not an image at all"}
SHARD = 4


def put_inputs(bucket: S3Bucket) -> list[str]:
    """10 real 32-px JPEGs, a truncated one and two that are not images: 13 files."""
    good = bucket.put_images("in", LABELS)
    truncated = bucket.get(good[0])[:200]
    bucket.put_many({**BAD, "in/dog/truncated.jpg": truncated})
    return sorted([*good, *BAD, "in/dog/truncated.jpg"])


def options(bucket: S3Bucket, out: str = "out", **kw) -> ExtractOptions:
    kw = {"weights": f"random:{SEED}", "input": bucket.url("in"), **kw}
    return ExtractOptions(output=bucket.url(out), image_size=32, batch_size=4,
                          shard_size=SHARD, progress=False, **kw)


def read_features(bucket: S3Bucket, prefix: str = "out"):
    """The dataset as pyarrow reads it from the bucket (part files only, by its own rules)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=bucket.server.moto_url, key=KEY_ID, secret=SECRET,
                           skip_instance_cache=True)
    return pq.read_table(f"{bucket.name}/{prefix}", filesystem=fs).sort_by("path")


def read_errors(bucket: S3Bucket, prefix: str = "out") -> list[tuple[str, str]]:
    rows = []
    for k in bucket.keys(f"{prefix}/_errors/"):
        t = pq.read_table(io.BytesIO(bucket.get(k)))
        rows += zip(t.column("path").to_pylist(), t.column("error").to_pylist())
    return sorted(rows)


def assert_committed_by_one_put(bucket: S3Bucket, requests, prefix: str = "out") -> None:
    """Each shard is committed by one PUT of its part file (a PUT is all-or-nothing on S3),
    plus one of its errors file when it has errors: no copy, no scratch object."""
    results = re.compile(rf"^{prefix}/(_errors/)?part-\d+\.parquet$")
    writes = [r for r in requests if r.writes_object and r.key.startswith(f"{prefix}/")]
    parts = [r.key for r in writes if results.match(r.key)]
    assert parts
    assert all(r.method == "PUT" and r.copy_source is None for r in writes), writes
    assert len(parts) == len(set(parts))  # once each
    assert not [r for r in requests if r.method in ("HEAD", "DELETE") and results.match(r.key)]
    assert not [r for r in writes if "/_tmp/" in r.key]
    assert not [k for k in bucket.keys(prefix + "/") if "/_tmp/" in k]


class Run:
    def __init__(self, bucket: S3Bucket, files: list[str], summary: ExtractSummary, requests):
        self.bucket, self.files, self.summary, self.requests = bucket, files, summary, requests


@pytest.fixture(scope="module")
def extracted(ray_cluster, s3_server, tmp_path_factory):
    """s3://B/in → s3://B/out, configured the standard way: AWS variables only, set after
    Ray started (so only worker_env brings them to the actors)."""
    with pytest.MonkeyPatch.context() as mp:
        isolate_from_aws(mp, tmp_path_factory.mktemp("aws"))
        for k, v in aws_environ(s3_server.proxy.url).items():
            mp.setenv(k, v)
        bucket = new_bucket(s3_server)
        files = put_inputs(bucket)
        s3_server.proxy.reset()
        summary = run_extract(options(bucket))
        yield Run(bucket, files, summary, s3_server.proxy.to(bucket.name))


def test_extract_bucket_to_bucket(extracted):
    b, s = extracted.bucket, extracted.summary
    assert s.ok, s.failed
    assert (s.images, s.rows, s.errors, s.shards, s.shards_run) == (13, 10, 3, 4, 4)
    keys = b.keys("out/")
    assert [k for k in keys if re.match(r"out/part-", k)] == [
        f"out/part-{i:05d}.parquet" for i in range(4)]
    assert {"out/_SUCCESS.json", "out/_bottleneck.json"} <= set(keys)
    assert "out/_lock.json" not in keys
    table = read_features(b)
    good = [f for f in extracted.files if f not in BAD and not f.endswith("truncated.jpg")]
    assert table.column("path").to_pylist() == [f"s3://{b.name}/{k}" for k in good]
    assert table.column("label").to_pylist() == [
        k.split("/")[1] if k.count("/") == 2 else None for k in good]
    assert table.schema.field("features").type.list_size == 512  # 1×1×512 at 32 px
    meta = read_metadata(table.schema)
    assert meta.labels == ["cat"] and meta.settings.weights == f"random:{SEED}"  # part 0's
    errors = read_errors(b)
    assert [p for p, _ in errors] == [f"s3://{b.name}/{k}" for k in
                                      ["in/cat/empty.jpg", "in/dog/notes.jpg", "in/dog/truncated.jpg"]]
    assert all(reason for _, reason in errors)
    success = json.loads(b.get("out/_SUCCESS.json"))
    assert (success["rows"], success["errors"]) == (10, 3)


def test_each_image_is_read_with_one_request_and_shards_commit_atomically(extracted):
    reads = [r for r in extracted.requests if r.key.startswith("in/") and r.method in ("GET", "HEAD")]
    assert sorted(r.key for r in reads) == extracted.files
    assert all(r.method == "GET" for r in reads)
    assert_committed_by_one_put(extracted.bucket, extracted.requests)
    shard_puts = {i: [r.key for r in extracted.requests if r.method == "PUT"
                      and re.fullmatch(rf"out/(_errors/)?part-{i:05d}\.parquet", r.key)]
                  for i in range(4)}
    print(f"\n[commit] requests per shard commit: { {i: len(k) for i, k in shard_puts.items()} }")
    # 1 PUT per shard, plus 1 for its errors file where the shard has unreadable images.
    bad = set(BAD) | {"in/dog/truncated.jpg"}
    files = extracted.files
    assert {i: len(k) for i, k in shard_puts.items()} == {
        i: 1 + bool(bad & set(files[i * SHARD:(i + 1) * SHARD])) for i in range(4)}


def test_rerun_does_nothing_then_resume_redoes_only_a_deleted_part(extracted):
    b = extracted.bucket
    before = b.etags("out/part-")
    b.proxy.reset()
    again = run_extract(options(b))
    assert (again.shards_run, again.shards_skipped, again.rows, again.errors) == (0, 4, 10, 3)
    # The plan in OUTPUT says what INPUT holds: INPUT is not listed again.
    assert not [r for r in b.proxy.to(b.name) if r.is_list and "prefix=in" in r.query]
    assert not [r for r in b.proxy.to(b.name) if r.writes_object and "part-" in r.key]
    assert not [r for r in b.proxy.to(b.name) if r.key.startswith("in/") and r.method == "GET"]
    assert b.etags("out/part-") == before

    b.delete("out/part-00001.parquet")
    b.proxy.reset()
    resumed = run_extract(options(b))
    assert resumed.ok
    assert (resumed.shards_run, resumed.shards_skipped, resumed.rows, resumed.errors) == (1, 3, 10, 3)
    after = b.etags("out/part-")
    assert {k: after[k] for k in before if k != "out/part-00001.parquet"} == {
        k: v for k, v in before.items() if k != "out/part-00001.parquet"}
    assert after["out/part-00001.parquet"][0] == before["out/part-00001.parquet"][0]  # same bytes
    reads = sorted(r.key for r in b.proxy.to(b.name) if r.key.startswith("in/") and r.method == "GET")
    assert reads == extracted.files[SHARD:2 * SHARD]
    assert not [r for r in b.proxy.to(b.name) if r.is_list and "prefix=in" in r.query]
    assert_committed_by_one_put(b, b.proxy.to(b.name))
    assert read_features(b).num_rows == 10


def same_rows(bucket: S3Bucket, prefix: str, labels: bool = True) -> None:
    """The dataset at `prefix` holds exactly the folder run's rows: paths, labels, features."""
    got, want = read_features(bucket, prefix), read_features(bucket, "out")
    assert got.column("path").to_pylist() == want.column("path").to_pylist()
    if labels:
        assert got.column("label").to_pylist() == want.column("label").to_pylist()
    assert got.column("features").to_pylist() == want.column("features").to_pylist()
    assert read_errors(bucket, prefix) == read_errors(bucket, "out")


def test_a_list_file_in_the_bucket_is_an_input(extracted):
    """A CSV of relative paths and labels, as img2dataset users keep: the same rows as the
    listed folder, read in no listing at all."""
    b = extracted.bucket
    rows = ["path,label"] + [f"{k.removeprefix('in/')},{k.split('/')[1] if k.count('/') == 2 else ''}"
                             for k in extracted.files]
    b.put("in/list.csv", "\n".join(rows).encode())
    try:
        b.proxy.reset()
        s = run_extract(options(b, out="out-list", input=b.url("in/list.csv")))
        assert s.ok and (s.images, s.rows, s.errors) == (13, 10, 3)
        # The list file is checked with a HEAD and read; nothing under in/ is listed.
        assert not [r for r in b.proxy.to(b.name) if r.is_list and "prefix=in" in r.query]
        same_rows(b, "out-list")
    finally:
        b.delete("in/list.csv")


def test_an_s3_inventory_report_is_an_input(extracted):
    """An inventory report (manifest.json + gzipped CSV, keys URL-encoded) of the bucket,
    with --prefix in: the same rows as listing in/."""
    import csv
    import gzip
    from urllib.parse import quote_plus

    b = extracted.bucket
    text = io.StringIO()
    writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for k in ["other/x.jpg", *extracted.files]:
        writer.writerow([b.name, quote_plus(k), "true", "false", "1"])
    data_key = "inventory/data/0001.csv.gz"
    b.put(data_key, gzip.compress(text.getvalue().encode()))
    manifest = {"sourceBucket": b.name, "destinationBucket": f"arn:aws:s3:::{b.name}",
                "version": "2016-11-30", "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, IsLatest, IsDeleteMarker, Size",
                "files": [{"key": data_key, "size": 1, "MD5checksum": "x"}]}
    b.put("inventory/2026-11-29T01-00Z/manifest.json", json.dumps(manifest).encode())
    s = run_extract(options(b, out="out-inv", prefix="in",
                            input=b.url("inventory/2026-11-29T01-00Z/manifest.json")))
    assert s.ok and (s.images, s.rows, s.errors) == (13, 10, 3)
    same_rows(b, "out-inv")


def test_weights_from_a_bucket_with_storage_options_only(extracted, monkeypatch, tmp_path):
    """--weights s3://…/vgg16.weights.h5, and no AWS variable anywhere: the driver and the
    actors reach the bucket through --storage-options alone."""
    import keras

    from bottleneck.model import build_conv_base, random_conv_weights, resolve_weights

    b = extracted.bucket
    model = build_conv_base(resolve_weights("random"), 32)
    random_conv_weights(model, SEED)  # the weights of the `extracted` run
    local = tmp_path / "vgg16.weights.h5"
    model.save_weights(local)
    del model
    keras.backend.clear_session()
    data = local.read_bytes()
    b.put("weights/vgg16.weights.h5", data)

    isolate_from_aws(monkeypatch, tmp_path)
    from bottleneck.runner.pool import worker_env

    assert not {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(worker_env())
    digest = hashlib.sha256(data).hexdigest()

    def drop_cached_copy() -> None:  # the actors' copy (58 MB): they must fetch the file
        for cached in Path("~/.cache/bottleneck/weights").expanduser().glob(digest + "*"):
            cached.unlink(missing_ok=True)

    drop_cached_copy()
    try:
        s = run_extract(options(b, out="out-w", weights=b.url("weights/vgg16.weights.h5"),
                                storage_options=b.options()))
    finally:
        drop_cached_copy()
    assert s.ok and (s.rows, s.errors) == (10, 3), s.failed
    got, want = read_features(b, "out-w"), read_features(b, "out")
    assert read_metadata(got.schema).settings.weights == "sha256:" + digest
    assert got.column("path").to_pylist() == want.column("path").to_pylist()
    np.testing.assert_allclose(np.stack(got.column("features").to_numpy(zero_copy_only=False)),
                               np.stack(want.column("features").to_numpy(zero_copy_only=False)),
                               rtol=1e-5, atol=1e-5)
    weight_reads = [r for r in b.proxy.to(b.name) if r.key == "weights/vgg16.weights.h5"
                    and r.method == "GET"]
    assert weight_reads  # fetched over HTTP, by the driver (hash) and an actor (load)


def test_storage_errors_are_retried_and_a_shard_that_cannot_be_written_is_reported(
        ray_cluster, s3, monkeypatch, capsys):
    from bottleneck.cli import main

    files = put_inputs(s3)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore gives up at once: bottleneck retries
    s3.proxy.faults += [
        # Shard 0: its upload fails twice, one image read fails twice: both are retried.
        Fault(method="PUT", key=r"/out/part-00000\.parquet$", status=503, times=2),
        Fault(method="GET", key=re.escape(files[1]) + "$", status=500, code="InternalError",
              times=2),
        # Shard 2: its commit never works.
        Fault(method="PUT", key=r"/out/part-00002\.parquet$", status=503),
    ]
    args = ["extract", s3.url("in"), s3.url("out"), "--weights", f"random:{SEED}",
            "--image-size", "32", "--shard-size", str(SHARD), "--batch-size", "4",
            "--max-attempts", "2", "--address", "local", "--no-progress"]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 1, out + err
    assert "FAILED:  1 shard(s)" in out and "part-00002.parquet" in out, out
    assert "rerun the same command" in out
    keys = s3.keys("out/")
    assert "out/part-00002.parquet" not in keys and "out/_SUCCESS.json" not in keys
    assert {"out/part-00000.parquet", "out/part-00001.parquet", "out/part-00003.parquet"} <= set(keys)
    reqs = s3.proxy.to(s3.name)
    uploads0 = [r.key for r in reqs if r.method == "PUT" and r.key == "out/part-00000.parquet"]
    assert len(uploads0) == 3  # the same upload, retried in place
    assert len([r for r in reqs if r.key == files[1] and r.method == "GET"]) == 3
    commits2 = [r for r in reqs if r.key == "out/part-00002.parquet"]
    assert len(commits2) == 2 * 5  # 2 shard attempts × 5 tries each
    assert SECRET not in out + err

    s3.proxy.faults.clear()
    s3.proxy.reset()
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "1 run now, 3 already done" in out
    assert "out/_SUCCESS.json" in s3.keys("out/")
    assert read_features(s3).num_rows == 10


def _texts_of_object(key: str, data: bytes) -> bytes:
    """An object's bytes, plus for Parquet its metadata and values decoded (zstd hides them)."""
    if not key.endswith(".parquet"):
        return data
    t = pq.read_table(io.BytesIO(data))
    meta = b"".join(k + v for k, v in (t.schema.metadata or {}).items())
    text = "".join(str(v) for c in t.column_names if c != "features" for v in t.column(c).to_pylist())
    return data + meta + text.encode()


class CliRun:
    def __init__(self, bucket, proc, ray_tmp: Path, needles: list[bytes], sent):
        self.bucket, self.proc, self.ray_tmp, self.needles, self.sent = (
            bucket, proc, ray_tmp, needles, sent)


@pytest.fixture(scope="module")
def cli_run(s3_server, tmp_path_factory):
    """A real `bottleneck extract` process, with one secret in AWS_SECRET_ACCESS_KEY and
    another in --storage-options, the progress bar on, and a storage fault on the way so
    that retries are logged."""
    tmp = tmp_path_factory.mktemp("cli")
    bucket = new_bucket(s3_server)
    put_inputs(bucket)
    env_secret = f"envsecret{uuid.uuid4().hex}"
    opt_secret = f"optsecret{uuid.uuid4().hex}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(aws_environ(s3_server.proxy.url, secret=env_secret), RAY_TMPDIR=str(ray_tmp),
               AWS_MAX_ATTEMPTS="1", AWS_CONFIG_FILE=str(tmp / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp / "none"))
    s3_server.proxy.reset()
    s3_server.proxy.faults.append(Fault(method="GET", key=rf"^{bucket.name}/in/cat/img-001\.jpg$",
                                        status=503, times=2))
    storage_options = {**bucket.options(opt_secret), "client_kwargs": {"region_name": "us-east-1"}}
    cmd = [str(Path(sys.executable).parent / "bottleneck"), "extract", bucket.url("in"),
           bucket.url("out"), "--weights", f"random:{SEED}", "--image-size", "32",
           "--shard-size", str(SHARD), "--batch-size", "4", "--address", "local",
           "--storage-options", json.dumps(storage_options)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        sent = [r for r in s3_server.proxy.to(bucket.name) if r.writes_object]
        yield CliRun(bucket, proc, ray_tmp, [env_secret.encode(), opt_secret.encode()], sent)
    finally:
        s3_server.proxy.reset()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_cli_keeps_secrets_out_of_logs_progress_metadata_and_markers(cli_run):
    proc, needles = cli_run.proc, cli_run.needles
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "retry" in proc.stderr  # the fault was met, retried, and logged
    assert "extract:" in proc.stderr  # the progress bar
    logs = (proc.stdout + proc.stderr).encode()
    assert not [n for n in needles if n in logs], logs
    objects = {k: cli_run.bucket.get(k) for k in cli_run.bucket.keys("out/")}
    assert {"out/_SUCCESS.json", "out/_bottleneck.json", "out/part-00000.parquet"} <= set(objects)
    assert not [k for k, data in objects.items() for n in needles if n in _texts_of_object(k, data)]
    # Everything the job sent to storage, _lock.json (gone once the job ends) included.
    assert [r for r in cli_run.sent if r.key == "out/_lock.json" and b"heartbeat" in r.body]
    assert not [r.key for r in cli_run.sent for n in needles if n in r.body]
    # --storage-options travel as actor arguments, which Ray does not log.
    assert not grep_tree(cli_run.ray_tmp, needles[1:])


def test_env_credentials_stay_out_of_ray_session_logs(cli_run):
    assert cli_run.proc.returncode == 0
    assert not grep_tree(cli_run.ray_tmp, cli_run.needles[:1])
