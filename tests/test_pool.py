"""The actor pool on a real local Ray: actors that cannot start, and the give-up."""

from __future__ import annotations

from functools import partial

import pytest

from bottleneck.model import resolve_weights
from bottleneck.runner.planning import Entry, Shard
from bottleneck.runner.pool import Layout, ShardPool

pytestmark = pytest.mark.ray


def test_actors_that_cannot_start_fail_the_shards_with_the_reason_and_do_not_hang(ray_cluster):
    # A per-shard worker whose model cannot load: building it raises in every actor.
    broken = partial(resolve_weights, "random:not-a-seed")
    pool = ShardPool(broken, Layout(2, num_cpus=0, num_gpus=0, threads=1,
                                          decode_threads=1), max_attempts=3)
    shards = [Shard(i, (Entry(f"/x/{i}.png", f"/x/{i}.png", None),)) for i in range(5)]
    try:
        results = list(pool.run(shards))
    finally:
        pool.shutdown()
    assert results == []
    assert sorted(pool.outcome.failed) == [0, 1, 2, 3, 4]
    assert all("integer seed" in e for e in pool.outcome.failed.values()), pool.outcome.failed
