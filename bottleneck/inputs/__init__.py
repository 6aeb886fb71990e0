"""Where images come from: INPUT listed into labelled entries for the runner to shard."""
