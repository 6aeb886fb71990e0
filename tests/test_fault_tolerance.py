"""Killed workers, killed jobs, concurrent runs: nothing lost, nothing twice.

Every kill here is a real SIGKILL of a real process: an extractor actor's worker in a
local Ray cluster, or a whole `bottleneck` command with the Ray it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import bottleneck_command, committed_parts, write_images
from s3fixtures import s3_server  # noqa: F401 - fixture

from bottleneck.extraction import ExtractOptions, run_extract

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SIZE = 32


def all_paths(out: Path) -> list[str]:
    return pq.read_table(out, columns=["path"]).column("path").to_pylist()


def error_paths(out: Path) -> list[str]:
    if not (out / "_errors").exists():
        return []
    return pq.read_table(out / "_errors").column("path").to_pylist()


def wait_for(cond, timeout: float = 240.0, what: str = "condition") -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def actor_processes(name: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(name in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "in"
    write_images(root, {"a": 30, "b": 30}, size=(SIZE, SIZE))
    (root / "a" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


@pytest.mark.parametrize("decode_workers", [0, 1], ids=["no-decode-workers", "decode-workers"])
def test_killed_actor_mid_shard_is_replaced_and_its_shard_retried(images, tmp_path, ray_cluster,
                                                                  decode_workers):
    """With decode workers, the decode worker is killed together with the model actor."""
    out = tmp_path / "out"
    result = {}

    def run():
        result["summary"] = run_extract(ExtractOptions(
            str(images), str(out), weights="random", image_size=SIZE, shard_size=6,
            batch_size=2, decode_workers=decode_workers, progress=False))

    t = threading.Thread(target=run)
    t.start()
    # Kill an extractor while it works on a shard (after the first commit, before the last).
    wait_for(lambda: len(committed_parts(out)) >= 1 and actor_processes("ShardActor"),
             what="a committed shard")
    victims = actor_processes("ShardActor") + actor_processes("DecodeWorker")
    assert len(victims) == 1 + decode_workers
    for v in victims:
        v.send_signal(signal.SIGKILL)
    t.join(timeout=600)
    s = result["summary"]
    print(f"\n[killed actor] {len(victims)} worker(s) killed; " + "; ".join(s.lines()))
    assert s.ok, s.lines()
    assert s.retries >= 1
    paths = all_paths(out)
    assert len(paths) == len(set(paths)) == 60  # every image exactly once
    assert error_paths(out) == [str(images / "a" / "zz-broken.jpg")]


def test_shard_that_keeps_failing_is_named_and_a_rerun_finishes(images, tmp_path, ray_cluster,
                                                                 monkeypatch):
    from bottleneck.runner.pool import CRASH_SHARDS_ENV

    out = tmp_path / "out"
    # The one test hook: shard 3's worker process dies each time it starts it (a stand-in for
    # an image that crashes a native decoder, which cannot be made on purpose here).
    monkeypatch.setenv(CRASH_SHARDS_ENV, "3")
    s = run_extract(ExtractOptions(str(images), str(out), weights="random", image_size=SIZE,
                                   shard_size=8, batch_size=4, max_attempts=2, progress=False))
    monkeypatch.delenv(CRASH_SHARDS_ENV)
    assert not s.ok
    assert list(s.failed) == [3]
    assert "its worker process died each time (2 tries)" in s.failed[3]
    assert s.retries == 1  # tried twice in all
    assert "part-00003.parquet" in "\n".join(s.lines())
    assert not (out / "_SUCCESS.json").exists()
    before = committed_parts(out)
    assert "part-00003.parquet" not in before and len(before) == 7

    s = run_extract(ExtractOptions(str(images), str(out), weights="random", image_size=SIZE,
                                   shard_size=8, batch_size=4, max_attempts=2, progress=False))
    assert s.ok and s.shards_run == 1
    after = committed_parts(out)
    assert {k: after[k] for k in before} == before  # committed shards untouched
    paths = all_paths(out)
    assert len(paths) == len(set(paths)) == 60
    assert (out / "_SUCCESS.json").exists()


def cli(*args: str) -> list[str]:
    return bottleneck_command(*args, "--address", "local", "--no-progress")


def start(cmd: list[str]) -> subprocess.Popen:
    # Its own session: killing the group kills the command and the Ray it started.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def extract_command(images: Path, out: Path, *more: str) -> list[str]:
    """61 files in 11 shards of 6, at 2 images a batch: slow enough to kill mid-job."""
    return cli("extract", str(images), str(out), "--weights", "random", "--image-size",
               str(SIZE), "--shard-size", "6", "--batch-size", "2", *more)


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    # Ray's own daemons may have moved to sessions of their own: kill what names this run.
    time.sleep(1)


@pytest.mark.parametrize("more", [[], ["--decode-workers", "1"]],
                         ids=["no-decode-workers", "decode-workers"])
def test_killed_job_resumes_without_rewriting_or_duplicating(images, tmp_path, more):
    out = tmp_path / "out"
    cmd = extract_command(images, out, *more)
    proc = start(cmd)
    try:
        wait_for(lambda: len(committed_parts(out)) >= 2, what="two committed shards")
    finally:
        kill_group(proc)
    before = committed_parts(out)
    assert 2 <= len(before) < 11, "the kill should land mid-job"
    for name in before:  # nothing half-written is visible to readers
        pq.read_metadata(out / name)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    after = committed_parts(out)
    print(f"\n[killed job] {len(before)} of 11 shards committed before the kill; rerun: "
          + r.stdout.replace("\n", "; "))
    assert {k: after[k] for k in before} == before  # committed before the kill: not rewritten
    assert len(after) == 11
    paths = all_paths(out)
    assert len(paths) == len(set(paths)) == 60
    errors = error_paths(out)
    assert errors == [str(images / "a" / "zz-broken.jpg")]  # once, not twice
    assert f"{len(before)} shards already done" in r.stderr


def test_killed_predict_resumes(tmp_path, images):
    from bottleneck.tools.demo_data import write_digits
    from bottleneck.training import TrainOptions, train_head
    from bottleneck.training.head import HeadConfig

    digits = tmp_path / "digits"
    write_digits(digits, 12, SIZE)
    feats = tmp_path / "feats"
    r = subprocess.run(cli("extract", str(digits), str(feats), "--weights", "random",
                           "--image-size", str(SIZE)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    model = tmp_path / "model"
    train_head(TrainOptions(str(feats), str(model), head=HeadConfig(epochs=2), verbose=0))

    output = tmp_path / "pred.parquet"
    staging = tmp_path / "_pred.parquet.parts"
    cmd = cli("predict", str(model), str(images), "--output", str(output), "--shard-size", "6",
              "--batch-size", "2")
    proc = start(cmd)
    try:
        wait_for(lambda: len(list(staging.glob("part-*.parquet"))) >= 2, what="staged shards")
    finally:
        kill_group(proc)
    assert not output.exists()
    staged_before = committed_parts(staging)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    t = pq.read_table(output)
    print(f"\n[killed predict] {len(staged_before)} of 11 shards staged before the kill; "
          f"{t.num_rows} rows, {t.num_rows - len(set(t.column('path').to_pylist()))} duplicates")
    paths = t.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 60
    errs = pq.read_table(tmp_path / "pred.errors.parquet").column("path").to_pylist()
    assert errs == [str(images / "a" / "zz-broken.jpg")]
    assert not staging.exists() and staged_before


def test_second_run_on_same_output_is_refused_and_stale_lock_is_taken_over(images, tmp_path):
    out = tmp_path / "out"
    cmd = extract_command(images, out)
    first = start(cmd)
    try:
        wait_for(lambda: (out / "_lock.json").exists(), what="the first run's lock")
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert "another job is writing" in second.stderr
    finally:
        kill_group(first)
    # The killed run's lock names a dead process on this host: the next run takes it over.
    assert (out / "_lock.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    paths = all_paths(out)
    assert len(paths) == len(set(paths)) == 60
    assert not (out / "_lock.json").exists()


def test_job_killed_while_listing_resumes_the_listing(s3_server, tmp_path):  # noqa: F811
    """A bucket listed slowly (every LIST answered after 1 s, one request in flight, 30
    pages: each folder holds 1,000 hidden thumbnails beside its 4 images): the job is killed
    once shards are planned but the listing is not finished. The rerun lists only after the
    last planned key, and every image gives one row."""
    from s3fixtures import Fault, aws_environ, new_bucket

    bucket = new_bucket(s3_server)
    bucket.put_images("in", {f"c{i:02d}": 4 for i in range(30)})
    bucket.seed({f"in/c{i:02d}/.thumbs/{j:04d}.jpg": b"x" for i in range(30) for j in range(996)})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env.update(aws_environ(s3_server.proxy.url), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    out = bucket.url("out")
    cmd = cli("extract", bucket.url("in"), out, "--weights", "random", "--image-size",
              str(SIZE), "--shard-size", "4", "--batch-size", "4", "--list-requests", "1")
    slow_listing = Fault(method="GET", key=rf"^{bucket.name}/$", delay=1.0)
    s3_server.proxy.faults.append(slow_listing)
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        def planned() -> bool:
            assert proc.poll() is None, proc.communicate()[1][-3000:]  # it must not end first
            return len([k for k in bucket.keys("out/_plan/") if "chunk-" in k]) >= 3

        try:
            wait_for(planned, what="three plan chunks")
        finally:
            kill_group(proc)
    finally:
        s3_server.proxy.faults.remove(slow_listing)
    keys = bucket.keys("out/")
    assert "out/_plan/_listed.json" not in keys, "the kill should land mid-listing"
    before = bucket.etags("out/part-")
    s3_server.proxy.reset()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lists = [q.query for q in s3_server.proxy.to(bucket.name) if q.is_list
             and "prefix=in" in q.query and "delimiter" not in q.query]
    assert lists and all("start-after=in" in q for q in lists), lists  # after the plan's end
    paths = pq.read_table(f"{bucket.name}/out", filesystem=s3fs_of(bucket)).column(
        "path").to_pylist()
    assert len(paths) == len(set(paths)) == 120
    after = bucket.etags("out/part-")
    assert {k: after[k] for k in before} == before  # committed before the kill: not rewritten
    print(f"\n[killed while listing] {len(before)} shards committed before the kill; rerun: "
          + r.stdout.replace("\n", "; "))


def s3fs_of(bucket):
    import s3fs
    from s3fixtures import KEY_ID, SECRET

    return s3fs.S3FileSystem(endpoint_url=bucket.server.moto_url, key=KEY_ID, secret=SECRET,
                             skip_instance_cache=True)
