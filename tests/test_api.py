"""The Python API, as a notebook uses it: `ray.init()` first, then `bottleneck.extract`,
`train`, `predict`, `read_features` and `load_classifier` on real digit images."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

import bottleneck
from bottleneck.tools.demo_data import write_digit_split

pytestmark = pytest.mark.ray

SIZE = 32


@pytest.fixture(scope="module")
def made(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("api")
    write_digit_split(root, 12, 3, SIZE)
    s = bottleneck.extract(str(root / "train"), str(root / "features"), weights="random",
                           image_size=SIZE, shard_size=64, progress=False)
    assert s.ok and s.rows == 120
    result = bottleneck.train(str(root / "features"), str(root / "model"), epochs=5,
                              batch_size=16, verbose=0)
    return root, result


def test_the_api_is_at_the_top_level_and_cheap_to_import():
    import subprocess
    import sys

    code = ("import sys, bottleneck\n"
            "print(sorted(bottleneck.__all__), 'ray' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60).stdout
    assert out.strip() == ("['TrainResult', 'UsageError', 'evaluate', 'extract', "
                           "'load_classifier', 'predict', 'read_features', 'train'] False False")


def test_unknown_options_and_bad_arguments_are_usage_errors(tmp_path):
    with pytest.raises(bottleneck.UsageError, match="unknown option.*image_sise"):
        bottleneck.extract(str(tmp_path), str(tmp_path / "out"), image_sise=32)
    with pytest.raises(bottleneck.UsageError, match="--batch-size must be positive"):
        bottleneck.extract(str(tmp_path), str(tmp_path / "out"), batch_size=0)
    with pytest.raises(bottleneck.UsageError, match="unknown option.*hiden"):
        bottleneck.train(str(tmp_path), str(tmp_path / "m"), hiden=3)


def test_train_joins_the_callers_ray_and_learns(made):
    root, result = made
    assert result.model_dir == str(root / "model")
    assert result.val_accuracy is not None and result.val_accuracy > 0.5  # chance is 0.1
    assert bottleneck.evaluate(str(root / "model"), str(root / "features"))["rows"] == 120


def test_predict_returns_a_table_equal_to_the_written_file(made, tmp_path):
    root, _ = made
    table = bottleneck.predict(str(root / "model"), str(root / "new"), top_k=2, progress=False)
    assert table.num_rows == 30
    assert table.column_names == ["path", "prediction", "probability", "top_k_labels",
                                  "top_k_probabilities"]
    out = tmp_path / "p.parquet"
    s = bottleneck.predict(str(root / "model"), str(root / "new"), output=str(out), top_k=2,
                           progress=False)
    assert s.ok and s.rows == 30
    assert pq.read_table(out).sort_by("path").equals(table.sort_by("path"))


def test_read_features_as_numpy_arrow_and_tf(made):
    root, _ = made
    feats = str(root / "features")
    arrays = bottleneck.read_features(feats)
    assert arrays["features"].shape == (120, 1, 1, 512)
    assert sorted(set(arrays["label"])) == [str(d) for d in range(10)]
    table = bottleneck.read_features(feats, columns=["path", "features"], as_="arrow")
    assert table.column_names == ["path", "features"] and table.num_rows == 120
    assert list(arrays["path"]) == table.column("path").to_pylist()
    rows = list(bottleneck.read_features(feats, as_="tf").take(3).as_numpy_iterator())
    assert len(rows) == 3 and rows[0]["features"].shape == (1, 1, 512)
    np.testing.assert_array_equal(rows[0]["features"], arrays["features"][0])
    with pytest.raises(bottleneck.UsageError, match="as_ must be one of"):
        bottleneck.read_features(feats, as_="pandas")


def test_load_classifier_agrees_with_predict(made):
    from bottleneck.images import DecodeOptions, decode_image

    root, _ = made
    model = bottleneck.load_classifier(str(root / "model"))
    table = bottleneck.predict(str(root / "model"), str(root / "new"), progress=False)
    paths = table.column("path").to_pylist()
    images = np.stack([decode_image(open(p, "rb").read(), DecodeOptions(SIZE)) for p in paths])
    probs = np.asarray(model(images, training=False))
    np.testing.assert_allclose(probs.max(axis=1), table.column("probability").to_numpy(),
                               atol=1e-5)
    with pytest.raises(bottleneck.UsageError, match="lacks classes.json"):
        bottleneck.load_classifier(str(root))
