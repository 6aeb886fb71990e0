"""Decode workers: when they start, and, on a two-node cluster simulated with
ray.cluster_utils.Cluster (a "GPU" node of 1 CPU and a CPU-only node), that decoding runs on
the CPU node, gives the same features, and survives a decode worker's death exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import REPO, write_images

from bottleneck.runner.decoding import CORES_PER_GPU, decode_workers_for
from bottleneck.runner.pool import choose_layout


def test_auto_turns_on_for_gpu_nodes_short_of_cores_with_more_cores_elsewhere():
    # A g5.xlarge (4 cores, 1 GPU) beside the cluster.yaml head's 8 CPU-only cores.
    assert decode_workers_for(None, gpu_actors=1, gpu_node_cpus=4, cpu_node_cpus=8) == 8
    # Four such GPU nodes decode on 12 spare cores of their own: the head's 8 add nothing.
    assert decode_workers_for(None, gpu_actors=4, gpu_node_cpus=16, cpu_node_cpus=8) == 0
    # Enough cores beside each GPU: none.
    assert decode_workers_for(None, 1, CORES_PER_GPU, 64) == 0
    # Never more than a GPU needs.
    assert decode_workers_for(None, 1, 1, 64) == CORES_PER_GPU
    # CPUs only, or no GPU node up yet (scaling from zero): unknown, so none.
    assert decode_workers_for(None, 0, 0, 64) == 0
    assert decode_workers_for(None, 2, 0, 8) == 0
    # The flag wins.
    assert decode_workers_for(3, 0, 0, 0) == 3
    assert decode_workers_for(0, 1, 1, 64) == 0


def test_layout_with_decode_workers():
    gpu = choose_layout(9, 1, cpu_node_cpus=8)  # 1 GPU node of 1 CPU, 8 CPU-only cores
    assert (gpu.actors, gpu.num_gpus, gpu.decode_workers) == (1, 1.0, 8)
    assert "fed by 8 decode worker(s)" in gpu.describe()
    assert choose_layout(9, 1, cpu_node_cpus=8, decode_workers=0).decode_workers == 0
    # Never more than the CPUs free beside the GPU actors: one more could not restart.
    assert choose_layout(3, 1, cpu_node_cpus=2, decode_workers=3).decode_workers == 2
    # No GPU node up yet: the actors' CPUs will come with their nodes.
    assert choose_layout(8, 0, gpus_per_actor=1, actors=2, decode_workers=8,
                         cpu_node_cpus=8).decode_workers == 8
    # On CPUs, decode workers take their cores from the model actors, leaving them one.
    cpu = choose_layout(8, 0, decode_workers=3)
    assert (cpu.actors, cpu.num_cpus, cpu.decode_workers) == (1, 5, 3)
    assert choose_layout(2, 0, decode_workers=5).decode_workers == 1
    assert choose_layout(2, 0).decode_workers == 0  # auto: never on CPUs


# In a process of its own: Cluster starts its head in the calling process's Ray context.
TWO_NODES = """
import json, os, sys
import numpy as np
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster
from bottleneck.extraction import ExtractOptions, run_extract
from bottleneck.runner.decoding import KILL_ONCE_ENV

inp, out, marker = sys.argv[1:4]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
cluster.add_node(num_cpus=2)
cluster.wait_for_nodes()
ray.init(address=cluster.address)
nodes = {("gpu" if n["Resources"].get("GPU") else "cpu"): n["NodeID"] for n in ray.nodes()}


def extract(name, **kw):
    s = run_extract(ExtractOptions(inp, f"{out}/{name}", weights="random", image_size=32,
                                   shard_size=12, batch_size=4, progress=False, **kw))
    t = pq.read_table(f"{out}/{name}").sort_by("path")
    return {"ok": s.ok, "rows": s.rows, "errors": s.errors, "retries": s.retries,
            "layout": s.layout, "paths": t.column("path").to_pylist(),
            "features": np.stack(t.column("features").to_numpy(zero_copy_only=False)).tolist(),
            "model_nodes": sorted({r.node for r in s.results}),
            "decode_nodes": sorted({n for r in s.results for n in r.decode_nodes})}


try:
    runs = {"local": extract("local", decode_workers=0), "auto": extract("auto")}
    os.environ[KILL_ONCE_ENV] = marker  # the first decode worker to deliver a batch dies
    runs["killed"] = extract("killed", decode_workers=1)
    print("RESULT " + json.dumps({"nodes": nodes, "runs": runs}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_decoding_runs_on_the_cpu_node_and_survives_a_dead_decode_worker(tmp_path):
    write_images(tmp_path / "in", {"a": 20, "b": 20}, size=(32, 32))
    (tmp_path / "in" / "a" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    marker = tmp_path / "killed-once"
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(tmp_path / "in"),
                               str(tmp_path / "out"), str(marker)], capture_output=True,
                              text=True, timeout=400, cwd=REPO, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    nodes, runs = got["nodes"], got["runs"]
    for name, r in runs.items():
        print(f"\n[{name}] {r['layout']}; rows {r['rows']}, errors {r['errors']}, "
              f"retries {r['retries']}, model on {r['model_nodes']}, decoded on "
              f"{r['decode_nodes']}")
    local, auto, killed = runs["local"], runs["auto"], runs["killed"]
    # Without decode workers the model actor decodes on its own node.
    assert local["decode_nodes"] == [] and local["model_nodes"] == [nodes["gpu"]]
    # Auto: the GPU node has 1 core, the CPU node 2, so 2 decode workers, there.
    assert "fed by 2 decode worker(s)" in auto["layout"]
    assert auto["model_nodes"] == [nodes["gpu"]] and auto["decode_nodes"] == [nodes["cpu"]]
    # A decode worker killed mid-shard: replayed by Ray, every row exactly once.
    assert marker.exists(), "no decode worker was killed"
    assert killed["decode_nodes"] == [nodes["cpu"]]
    for r in runs.values():
        assert r["ok"] and r["rows"] == 40 and r["errors"] == 1
        assert len(r["paths"]) == len(set(r["paths"])) == 40
        # The same features, bit for bit, wherever the images were decoded.
        assert r["paths"] == local["paths"] and r["features"] == local["features"]
