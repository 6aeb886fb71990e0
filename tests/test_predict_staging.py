"""predict --output resumes staged shards only when they come from the same plan."""

from bottleneck.predict import _prepare_staging
from bottleneck.storage import Storage


def test_staged_shards_are_kept_for_the_same_plan_and_dropped_for_another(tmp_path):
    staged = Storage(str(tmp_path / "_pred.parquet.parts"))
    plan = {"input": "/in", "listing_sha256": "abc", "shard_size": 6, "top_k": 1,
            "model_dir": "/m"}
    _prepare_staging(staged, plan)
    (tmp_path / "_pred.parquet.parts" / "part-00000.parquet").write_bytes(b"staged")
    _prepare_staging(staged, dict(plan))
    assert "part-00000.parquet" in staged.ls_names()  # same plan: resumed
    _prepare_staging(staged, {**plan, "top_k": 3})
    # Another plan: started over (_tmp is the commits' scratch folder).
    assert [n for n in staged.ls_names() if n != "_tmp"] == ["_plan.json"]
    _prepare_staging(staged, {**plan, "listing_sha256": "changed"})
    assert staged.read_json("_plan.json")["listing_sha256"] == "changed"
