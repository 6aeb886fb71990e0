"""A cluster of several nodes, simulated on this machine with ray.cluster_utils.Cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from conftest import REPO, write_images

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# In a process of its own: Cluster starts its head in the calling process's Ray context.
TWO_SMALL_NODES = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from bottleneck.extraction import ExtractOptions, run_extract

inp, out = sys.argv[1:3]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    s = run_extract(ExtractOptions(inp, out, weights="random", image_size=32, shard_size=4,
                                   batch_size=4, address=cluster.address, progress=False))
    print(json.dumps({"ok": s.ok, "rows": s.rows, "layout": s.layout,
                      "workers": len({r.worker for r in s.results})}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_actors_fit_the_nodes_of_a_cluster_of_small_nodes(tmp_path):
    """Two nodes of 1 CPU: actors of 1 CPU each, one a node. Sized from the cluster's total
    (2 CPUs), an actor would ask for 2 CPUs that no node has, and wait for ever."""
    write_images(tmp_path / "in", {"a": 8, "b": 8}, size=(32, 32))
    ray_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = ray_tmp  # Cluster records itself as the current cluster there
    try:
        proc = subprocess.run([sys.executable, "-c", TWO_SMALL_NODES, str(tmp_path / "in"),
                               str(tmp_path / "out")], capture_output=True, text=True,
                              timeout=300, cwd=REPO, env=env)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n[two 1-CPU nodes] {result}")
    assert result["ok"] and result["rows"] == 16
    assert result["layout"].startswith("2 actor(s)") and "(1 CPU reserved)" in result["layout"]
    assert result["workers"] == 2
