"""A job that owns its OUTPUT (predict's staging folder) resumes it only for the same plan."""

from bottleneck.runner.job import ShardedJob, resume_point
from bottleneck.runner.planning import Entry
from bottleneck.storage import Storage


def job(tmp_path, **settings) -> ShardedJob:
    return ShardedJob(name="predict", kind="predictions", source=Storage(str(tmp_path / "in")),
                      list_inputs=list, make_worker=lambda layout: list,
                      output=Storage(str(tmp_path / "_pred.parquet.parts")),
                      settings={"top_k": 1, **settings}, shard_size=6, replace_on_mismatch=True)


def test_staged_shards_are_kept_for_the_same_plan_and_dropped_for_another(tmp_path):
    entries = [Entry(f"/in/{i}.png", f"/in/{i}.png", None) for i in range(10)]
    staged = tmp_path / "_pred.parquet.parts"
    assert resume_point(job(tmp_path), entries, 2, overwrite=False) == set()
    (staged / "part-00000.parquet").write_bytes(b"staged")
    assert resume_point(job(tmp_path), entries, 2, overwrite=False) == {0}  # same plan: resumed
    assert resume_point(job(tmp_path, top_k=3), entries, 2, overwrite=False) == set()
    assert not (staged / "part-00000.parquet").exists()  # another plan: started over
    (staged / "part-00001.parquet").write_bytes(b"staged")
    assert resume_point(job(tmp_path, top_k=3), entries[:9], 2, overwrite=False) == set()
    assert Storage(str(staged)).read_json("_bottleneck.json")["images"] == 9
