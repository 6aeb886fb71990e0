"""The one runner of every sharded job: plan, lock, manifest, pool (the only Ray import),
progress and outcome. A job gives its per-shard worker and its output (`job.ShardedJob`)."""
