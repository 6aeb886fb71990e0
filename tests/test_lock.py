"""OUTPUT's lock: exclusive create on a local disk and on S3 (moto over HTTP), takeover of a
dead job's lock, and a job that loses its lock stopping before it commits anything more."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_images
from s3fixtures import Fault, s3, s3_server  # noqa: F401 - fixtures

from bottleneck.runner.lock import LOCK, LockLost, OutputLock
from bottleneck.runner.manifest import OutputConflict
from bottleneck.storage import Storage

PAIRS = 100


def race_pairs(root_url: str, rng: np.random.Generator) -> list[int]:
    """PAIRS pairs of jobs, each pair on its own OUTPUT, the second of a pair starting 0–500 ms
    after the first (all pairs at once); returns how many of each pair took the lock."""
    wins = [0] * PAIRS
    held: list[OutputLock] = []
    guard = threading.Lock()
    offsets = rng.uniform(0.0, 0.5, size=(PAIRS, 2))

    def start(pair: int, delay: float) -> None:
        time.sleep(delay)
        lock = OutputLock(Storage(f"{root_url}/out-{pair:03d}"))
        try:
            lock.acquire()
        except OutputConflict:
            return
        with guard:
            wins[pair] += 1
            held.append(lock)

    threads = [threading.Thread(target=start, args=(p, offsets[p, k]))
               for p in range(PAIRS) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lock in held:
        lock.release()
    return wins


def test_of_two_starts_exactly_one_wins_on_a_local_disk(tmp_path):
    wins = race_pairs(str(tmp_path), np.random.default_rng(1))
    assert wins == [1] * PAIRS
    assert not list(tmp_path.glob(f"*/{LOCK}"))  # released


def test_of_two_starts_exactly_one_wins_on_s3(s3):
    wins = race_pairs(s3.url("race"), np.random.default_rng(2))
    assert wins == [1] * PAIRS
    assert not [k for k in s3.keys("race/") if k.endswith(LOCK)]
    # The lock is taken by a conditional PUT, not by write-then-read-back.
    puts = [r for r in s3.proxy.to(s3.name) if r.method == "PUT" and r.key.endswith(LOCK)]
    assert len(puts) >= PAIRS


def test_a_second_job_is_refused_and_a_dead_jobs_lock_is_taken_over(tmp_path):
    out = Storage(str(tmp_path))
    with OutputLock(out):
        with pytest.raises(OutputConflict, match="another job is writing"):
            OutputLock(out).acquire()
    assert not (tmp_path / LOCK).exists()
    # A lock whose heartbeat is old (its job was killed on another host) is taken over, by
    # exactly one of two jobs that find it at once.
    out.write_json_atomic({"token": "dead", "heartbeat": 0, "pid": 1, "host": "elsewhere"}, LOCK)
    first, second = OutputLock(out), OutputLock(out)
    first.acquire()
    with pytest.raises(OutputConflict):
        second.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == first.token
    first.release()
    assert not (tmp_path / LOCK).exists()
    # A job that died between claiming a takeover and writing the lock does not block it.
    out.write_json_atomic({"token": "dead2", "heartbeat": 0, "pid": 1, "host": "elsewhere"}, LOCK)
    out.write_json_atomic({"token": "taker", "heartbeat": 0}, "_lock.takeover-dead2")
    with OutputLock(out) as third:
        assert json.loads((tmp_path / LOCK).read_text())["token"] == third.token
    assert not list(tmp_path.glob("_lock*"))


def test_a_lock_taken_over_is_lost_at_the_next_heartbeat(tmp_path):
    out = Storage(str(tmp_path))
    lock = OutputLock(out, heartbeat=0.1)
    lock.acquire()
    out.write_json_atomic({"token": "another", "heartbeat": time.time(), "host": "h"}, LOCK)
    deadline = time.monotonic() + 30
    while lock.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LockLost, match="another job took over"):
        lock.check()
    lock.release()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "another"  # not ours to drop


def test_missed_heartbeats_lose_the_lock_on_s3(s3):
    out = Storage(s3.url("beats"))
    lock = OutputLock(out, heartbeat=0.2, max_missed=3)
    lock.acquire()
    lock.check()
    s3.proxy.faults.append(Fault(key=f"beats/{LOCK}", status=503, code="SlowDown"))
    time.sleep(1.0)  # more than 3 beats
    with pytest.raises(LockLost, match="no heartbeat reached it for"):
        lock.check()
    s3.proxy.faults.clear()
    lock.release()


@pytest.mark.ray
def test_a_job_that_loses_its_lock_stops_with_nothing_half_committed(tmp_path):
    write_images(tmp_path / "in", {"a": 60, "b": 60}, size=(32, 32))  # 30 shards
    out = tmp_path / "out"
    env = dict(os.environ, BOTTLENECK_LOCK_HEARTBEAT_S="0.2", TF_CPP_MIN_LOG_LEVEL="2")
    job = subprocess.Popen(
        [sys.executable, "-m", "bottleneck", "extract", str(tmp_path / "in"), str(out),
         "--weights", "random", "--image-size", "32", "--shard-size", "4", "--batch-size", "4",
         "--address", "local", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(out.glob("part-*.parquet")), "no shard was committed"
    # Another job takes OUTPUT over (as one would after this job's heartbeat went stale).
    Storage(str(out)).write_json_atomic({"token": "intruder", "heartbeat": time.time(),
                                         "host": "elsewhere", "pid": 1}, LOCK)
    stdout, stderr = job.communicate(timeout=240)
    print(f"\n[lock lost] {len(list(out.glob('part-*.parquet')))} of 30 shards committed")
    assert job.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("bottleneck: error: ") and "took over the lock" in last
    assert "Traceback" not in stderr
    assert not (out / "_SUCCESS.json").exists()
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) < 30
    for p in parts:  # every committed part is whole
        assert pq.read_table(p).num_rows == 4
    assert json.loads((out / LOCK).read_text())["token"] == "intruder"


def test_a_store_without_exclusive_create_is_refused_clearly():
    from bottleneck.errors import UsageError

    with pytest.raises(UsageError, match="cannot create a file exclusively"):
        OutputLock(Storage("memory://bottleneck-lock-test/out")).acquire()
