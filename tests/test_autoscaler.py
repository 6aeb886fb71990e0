"""Scaling from zero as cluster.yaml runs it: Ray's autoscaler with its fake multi-node
provider (nodes launched as local processes) and cluster.yaml's node types, a CPU head and
GPU workers from min_workers: 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, committed_parts, write_images

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Short enough for a test: cluster.yaml's 10 minutes would hold the GPU node past any bound.
IDLE_TIMEOUT_MINUTES = 0.1
# One more GPU node than the one-actor job needs: a job asking for more than its actors shows.
MAX_GPU_NODES = 2

# In a process of its own, as TWO_SMALL_NODES in test_multinode.py: the head starts in the
# calling process's Ray context.
#
# Not ray.cluster_utils.AutoscalingCluster: its start() and shutdown() run the
# `stop --force` command of Ray's CLI, which kills every Ray process of this user on the
# machine (other tests' clusters too), and it builds its config on
# fake_multi_node/example.yaml, which the Ray wheel does not ship (nor does the monitor
# find it for provider type "fake_multinode"). So the same head as
# AutoscalingCluster.start(), started with ray.cluster_utils.Cluster, and the same provider
# class named as an "external" provider, whose defaults are built into Ray.
SCALE_FROM_ZERO = """
import json, os, re, socket, sys, threading, time
import ray
from ray._private.services import get_node_ip_address
from ray.autoscaler._private.fake_multi_node.node_provider import (
    FAKE_HEAD_NODE_ID, FAKE_HEAD_NODE_TYPE)
from ray.cluster_utils import Cluster
from bottleneck.extraction import ExtractOptions, run_extract

inp, out, cfg_path = sys.argv[1:4]
spec = json.loads(sys.argv[4])
with socket.socket() as s:
    s.bind(("", 0))
    port = s.getsockname()[1]
gcs = f"{get_node_ip_address()}:{port}"
head = dict(spec["head_resources"])
config = {
    "cluster_name": "bottleneck-test",
    "max_workers": spec["max_workers"],
    "upscaling_speed": spec["upscaling_speed"],
    "idle_timeout_minutes": spec["idle_timeout_minutes"],
    "provider": {
        "type": "external",
        "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        "gcs_address": gcs,  # else the provider's nodes join port 6379
        "use_node_id_as_ip": True, "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    # The fake provider tags its head with its own type name.
    "available_node_types": {**spec["worker_node_types"], FAKE_HEAD_NODE_TYPE: {
        "resources": head, "node_config": {}, "max_workers": 0}},
    "head_node_type": FAKE_HEAD_NODE_TYPE,
    # The rest of fake_multi_node/example.yaml: nothing to install, sync or run on a node.
    "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}
with open(cfg_path, "w") as f:
    json.dump(config, f)

t_start = time.monotonic()
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": head.pop("CPU", 0), "num_gpus": head.pop("GPU", 0), "resources": head,
    "gcs_server_port": port, "autoscaling_config": cfg_path, "include_dashboard": False,
    "dashboard_agent_listen_port": 0,  # any free port: another Ray here may hold 52365
    "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}})
state = cluster.global_state


def gpu_nodes():
    return {n["NodeID"] for n in state.node_table()
            if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


seen, stop = set(), threading.Event()


def watch():
    while not stop.wait(0.2):
        seen.update(gpu_nodes())


report = {"gpus_before": state.cluster_resources().get("GPU", 0),
          "head_s": round(time.monotonic() - t_start, 1)}
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
try:
    t_job = time.monotonic()
    s = run_extract(ExtractOptions(inp, out, weights="random", image_size=32, shard_size=4,
                                   batch_size=4, address=cluster.address, gpus_per_actor=1,
                                   actors=1, progress=False))
    stop.set()
    watcher.join()
    report.update(ok=s.ok, rows=s.rows, failed={str(k): v for k, v in s.failed.items()},
                  layout=s.layout, shards_run=s.shards_run, retries=s.retries,
                  shards=sorted(r.index for r in s.results),
                  workers=sorted({r.worker for r in s.results}),
                  gpu_ids=[list(r.gpu_ids) for r in s.results],
                  worker_nodes=sorted({state.actor_table(w)["Address"]["NodeID"]
                                       for w in {r.worker for r in s.results}}),
                  gpu_nodes_seen=sorted(seen), job_s=round(time.monotonic() - t_job, 1))
    t0 = time.monotonic()
    while gpu_nodes() and time.monotonic() - t0 < spec["scale_down_wait_s"]:
        time.sleep(0.5)
    # What the autoscaler says it did (its events on stdout may come after this report).
    with open(os.path.join(cluster.head_node.get_logs_dir_path(), "monitor.log")) as f:
        idle = re.findall(r"Terminating the node with id (\\w+) .*\\(idle\\)", f.read())
    report.update(gpu_nodes_after=sorted(gpu_nodes()), terminated_idle=sorted(set(idle)),
                  scale_down_s=round(time.monotonic() - t0, 1))
    print("REPORT " + json.dumps(report), flush=True)
finally:
    stop.set()
    ray.shutdown()
    cluster.shutdown()
"""


def cluster_yaml_node_types() -> dict:
    """cluster.yaml's head resources and worker node types, for the fake provider: the same
    names, resources and min_workers, at most MAX_GPU_NODES nodes and no cloud node_config."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = config["available_node_types"]
    head = config["head_node_type"]
    workers = {name: {"resources": dict(t["resources"]), "node_config": {},
                      "min_workers": t.get("min_workers", 0),
                      "max_workers": min(t.get("max_workers", config["max_workers"]),
                                         MAX_GPU_NODES)}
               for name, t in types.items() if name != head}
    return {"head_resources": dict(types[head]["resources"]), "worker_node_types": workers,
            "max_workers": min(config["max_workers"], MAX_GPU_NODES),
            "upscaling_speed": config.get("upscaling_speed", 1.0),
            "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES}


def processes_with_env(name: str, value: str) -> list[int]:
    """Our own processes whose environment has NAME=VALUE."""
    want, pids = f"{name}={value}".encode(), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if want in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:  # gone, or not ours
                pass
    return pids


def test_gpu_workers_scale_from_zero_run_the_job_once_and_scale_down(tmp_path):
    """A job with --gpus-per-actor 1 on a cluster with no GPU node: its actor's GPU request
    brings a GPU worker up, every shard is committed once, on that node, and the autoscaler
    terminates the node once the job is done."""
    spec = cluster_yaml_node_types()
    gpu_types = [n for n, t in spec["worker_node_types"].items()
                 if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "cluster.yaml has no GPU worker type"
    assert all(spec["worker_node_types"][n]["min_workers"] == 0 for n in gpu_types)
    assert not spec["head_resources"].get("GPU")
    spec["scale_down_wait_s"] = 60 * IDLE_TIMEOUT_MINUTES + 30

    images = write_images(tmp_path / "in", {"a": 8, "b": 8}, size=(32, 32))
    ray_tmp = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp
    env["RAY_FAKE_CLUSTER"] = "1"  # the fake provider refuses to start without it
    env["AUTOSCALER_UPDATE_INTERVAL_S"] = "1"  # as AutoscalingCluster.start() sets it
    out = tmp_path / "out"
    try:
        # A job whose GPU request no node answers waits for ever: bounded here.
        proc = subprocess.run([sys.executable, "-c", SCALE_FROM_ZERO, str(tmp_path / "in"),
                               str(out), str(tmp_path / "autoscaler.json"), json.dumps(spec)],
                              capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"no result in {e.timeout}s; stderr:\n{(stderr or '')[-3000:]}")
    finally:
        # The provider starts its nodes with no reaper: a node the autoscaler did not get to
        # terminate outlives the head. Every process of this cluster has our RAY_TMPDIR.
        for pid in processes_with_env("RAY_TMPDIR", ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Marked: the driver prints the autoscaler's events to stdout too, before and after it.
    reports = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert len(reports) == 1, proc.stdout[-3000:]
    r = json.loads(reports[0].removeprefix("REPORT "))
    print(f"\n[scale from zero] {r}")

    # Up from zero: no GPU before the job, a GPU worker node while it ran, the shards on it.
    assert r["gpus_before"] == 0
    assert len(r["gpu_nodes_seen"]) == 1, r["gpu_nodes_seen"]  # one actor, one GPU node
    assert r["worker_nodes"] == r["gpu_nodes_seen"]
    assert r["layout"].startswith("1 actor(s), each 1 GPU")
    assert len(r["workers"]) == 1
    assert r["gpu_ids"] and all(r["gpu_ids"])
    # Exactly once: 16 rows in 4 shards, each shard run and committed once, each image once.
    assert r["ok"] and not r["failed"], r["failed"]
    assert r["rows"] == 16
    assert r["shards"] == [0, 1, 2, 3] and r["shards_run"] == 4 and r["retries"] == 0
    assert sorted(committed_parts(out)) == [f"part-{i:05d}.parquet" for i in range(4)]
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in images)
    assert (out / "_SUCCESS.json").exists()
    # Down again: the idle GPU node is terminated by the autoscaler, not lost some other way.
    assert not r["gpu_nodes_after"], (
        f"GPU node(s) still up {r['scale_down_s']}s after the job: {r['gpu_nodes_after']}")
    assert r["terminated_idle"] == r["gpu_nodes_seen"]
