"""A job that owns its OUTPUT (predict's staging folder) resumes it only for the same plan."""

from bottleneck.inputs.listing import FolderSource
from bottleneck.runner.job import ShardedJob, resume_point
from bottleneck.storage import Storage


def job(tmp_path, **settings) -> ShardedJob:
    (tmp_path / "in").mkdir(exist_ok=True)
    return ShardedJob(name="predict", kind="predictions",
                      source=FolderSource(Storage(str(tmp_path / "in"))),
                      make_worker=lambda layout: list,
                      output=Storage(str(tmp_path / "_pred.parquet.parts")),
                      settings={"top_k": 1, **settings}, shard_size=6, replace_on_mismatch=True)


def test_staged_shards_are_kept_for_the_same_settings_and_dropped_for_others(tmp_path):
    staged = tmp_path / "_pred.parquet.parts"
    assert resume_point(job(tmp_path), overwrite=False) == set()
    (staged / "part-00000.parquet").write_bytes(b"staged")
    (staged / "_plan").mkdir()
    (staged / "_plan" / "chunk-000000.parquet").write_bytes(b"plan")
    assert resume_point(job(tmp_path), overwrite=False) == {0}  # same settings: resumed
    assert resume_point(job(tmp_path, top_k=3), overwrite=False) == set()
    assert not (staged / "part-00000.parquet").exists()  # other settings: started over,
    assert not (staged / "_plan").exists()  # with the plan made for them
    assert Storage(str(staged)).read_json("_bottleneck.json")["settings"]["top_k"] == 3
