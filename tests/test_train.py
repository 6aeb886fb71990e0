"""Training the head on real digit images (they ship in scikit-learn), evaluation, export,
prediction, and the error paths. A real local Ray cluster; seeded random VGG16 weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from bottleneck.extraction import ExtractOptions, run_extract
from bottleneck.tools.demo_data import write_digit_split
from bottleneck.training import TrainOptions, evaluate, train_head
from bottleneck.training.features import FeatureDataError, FeatureDataset, in_validation
from bottleneck.training.head import HeadConfig, load_model

pytestmark = pytest.mark.ray

SIZE = 32
PER_CLASS = 40
HELD_OUT = 8
# The floors sit far above chance (0.10) and below what these settings reach (the tests
# print what they reach), leaving room for thread-order noise.
VAL_ACCURACY_FLOOR = 0.85
PREDICT_ACCURACY_FLOOR = 0.85


def extract(src: Path, dst: Path, **kw) -> None:
    s = run_extract(ExtractOptions(str(src), str(dst), weights="random", image_size=SIZE,
                                   shard_size=128, batch_size=32, progress=False, **kw))
    assert s.ok, s.lines()


@pytest.fixture(scope="module")
def digits(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("digits")
    write_digit_split(root, PER_CLASS, HELD_OUT, SIZE)
    extract(root / "train", root / "features")
    extract(root / "new", root / "new-features")
    return root


@pytest.fixture(scope="module")
def trained(digits):
    model_dir = digits / "model"
    metrics = train_head(TrainOptions(str(digits / "features"), str(model_dir),
                                      head=HeadConfig(epochs=15), verbose=0))
    return model_dir, metrics


def test_head_learns_real_digits(trained):
    model_dir, metrics = trained
    print(f"\n[train] val_accuracy {metrics['val_accuracy']:.3f} on {metrics['validation_rows']} "
          f"held-out rows; {metrics['train_rows_per_second']} rows/s")
    assert metrics["val_accuracy"] >= VAL_ACCURACY_FLOOR, metrics["val_accuracy"]
    saved = json.loads((model_dir / "metrics.json").read_text())
    assert saved["val_accuracy"] == metrics["val_accuracy"]
    assert np.isfinite(saved["val_loss"]) and saved["val_loss"] < 1.0
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == saved["rows"] == saved["validation_rows"]
    assert np.trace(cm) / cm.sum() == pytest.approx(saved["val_accuracy"])
    assert set(saved["per_class"]) == {str(d) for d in range(10)}
    for r in saved["per_class"].values():
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and 0 <= r["f1"] <= 1


def test_model_dir_contents(trained):
    model_dir, _ = trained
    for name in ("head.keras", "classifier.keras", "classes.json", "history.json",
                 "metrics.json", "training.png", "confusion.png", "features.json"):
        assert (model_dir / name).is_file(), name
    assert json.loads((model_dir / "classes.json").read_text()) == [str(d) for d in range(10)]
    history = json.loads((model_dir / "history.json").read_text())
    assert len(history["loss"]) == 15 and len(history["val_accuracy"]) == 15
    assert history["loss"][-1] < history["loss"][0]
    for png in ("training.png", "confusion.png"):
        assert (model_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads((model_dir / "features.json").read_text())["settings"]
    assert settings["image_size"] == SIZE and settings["weights"] == "random:0"
    assert not any(p.name.startswith(".") or p.suffix == ".tmp" for p in model_dir.iterdir())


def test_split_is_deterministic_by_path(digits, trained):
    ds = FeatureDataset(str(digits / "features"))
    paths = [p for p, _ in ds.iter_labels(0.2, want_validation=True)]
    assert paths == [p for p, _ in ds.iter_labels(0.2, want_validation=True)]
    assert all(in_validation(ds.split_key(p), 0.2) for p in paths)
    assert all(not ds.split_key(p).startswith("/") for p in paths)  # relative to INPUT
    assert 0.1 < len(paths) / ds.rows < 0.3
    assert trained[1]["validation_rows"] == len(paths)


def test_split_is_the_same_wherever_the_images_were(tmp_path):
    """The same images on a disk and copied to a bucket: the same rows are held out."""
    from bottleneck.extraction.writer import ShardWriter
    from bottleneck.runner.manifest import Manifest, prepare_output
    from bottleneck.schema import DatasetMetadata, FeatureSettings, feature_schema
    from bottleneck.storage import Storage

    names = [f"{c}/img-{i:03d}.png" for c in "ab" for i in range(50)]
    settings = FeatureSettings(weights="random:0", image_size=32, pooling="avg")
    held = []
    for k, root in enumerate(["/data/images", "s3://bucket/copy/images"]):
        out = Storage(str(tmp_path / f"features-{k}"))
        prepare_output(out, Manifest("features", settings.to_dict(), root, 100),
                       overwrite=False)
        with ShardWriter(out, feature_schema(DatasetMetadata(settings, ["a", "b"])), 0) as w:
            w.write_batch([f"{root}/{n}" for n in names], [n[0] for n in names],
                          np.zeros((100, 512), np.float32))
        ds = FeatureDataset(out.url)
        held.append([ds.split_key(p) for p, _ in ds.iter_labels(0.2, want_validation=True)])
    assert held[0] == held[1]
    assert 5 < len(held[0]) < 40 and held[0][0] in names


def test_classifier_agrees_with_head_on_features(digits, trained):
    """Raw images through classifier.keras == extracted features through head.keras."""
    from bottleneck.images import DecodeOptions, decode_image

    model_dir, _ = trained
    head = load_model(str(model_dir / "head.keras"))
    classifier = load_model(str(model_dir / "classifier.keras"))
    table = pq.read_table(digits / "new-features")
    shape = FeatureDataset(str(digits / "new-features")).settings.shape
    feats = np.stack(table.column("features").to_numpy(zero_copy_only=False)).reshape(-1, *shape)
    images = np.stack([decode_image(Path(p).read_bytes(), DecodeOptions(SIZE))
                       for p in table.column("path").to_pylist()])
    p_head = np.asarray(head(feats, training=False))
    p_clf = np.asarray(classifier(images, training=False))
    assert (p_head.argmax(1) == p_clf.argmax(1)).all()
    np.testing.assert_allclose(p_clf, p_head, atol=1e-4)


def test_predict_end_to_end(digits, trained, ray_cluster):
    from bottleneck.prediction import PredictOptions, run_predict

    model_dir, _ = trained
    out = digits / "predictions.parquet"
    (digits / "new" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # header only
    try:
        s = run_predict(PredictOptions(str(model_dir), str(digits / "new"), output=str(out),
                                       top_k=3, shard_size=32, progress=False))
    finally:
        (digits / "new" / "3" / "broken.png").unlink()
    assert s.ok and s.rows == 10 * HELD_OUT
    assert [Path(p).name for p, _ in s.errors] == ["broken.png"]
    t = pq.read_table(out)
    assert t.column_names == ["path", "prediction", "probability", "top_k_labels",
                              "top_k_probabilities"]
    assert t.num_rows == 10 * HELD_OUT and len(set(t.column("path").to_pylist())) == t.num_rows
    truth = [Path(p).parent.name for p in t.column("path").to_pylist()]
    acc = np.mean([a == b for a, b in zip(truth, t.column("prediction").to_pylist())])
    print(f"\n[predict] accuracy {acc:.3f} on {t.num_rows} unseen images")
    assert acc >= PREDICT_ACCURACY_FLOOR, acc
    assert (out.parent / "predictions.errors.parquet").exists()
    assert not list(out.parent.glob("_predictions.parquet.parts"))
    # The same images through the head, on their extracted features, agree.
    ev = evaluate(str(model_dir), str(digits / "new-features"))
    assert ev["val_accuracy"] == pytest.approx(acc)


def test_info_on_a_model_dir_and_a_predictions_file(digits, trained, tmp_path):
    from bottleneck.prediction import PredictOptions, run_predict

    model_dir, metrics = trained
    info = json.loads(run_cli("info", str(model_dir), "--json").stdout)
    assert info["kind"] == "model" and info["classes"] == [str(d) for d in range(10)]
    assert info["metrics"]["val_accuracy"] == metrics["val_accuracy"]
    assert info["missing_files"] == [] and info["files"]["classifier.keras"] > 0
    out = tmp_path / "p.parquet"
    assert run_predict(PredictOptions(str(model_dir), str(digits / "new"), output=str(out),
                                      progress=False)).ok
    proc = run_cli("info", str(out))
    assert proc.returncode == 0 and f"rows:     {10 * HELD_OUT}, 0 unreadable" in proc.stdout
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert sum(info["predictions"].values()) == 10 * HELD_OUT


def test_tensorboard_logs_and_a_saved_model_that_agrees_with_the_keras_file(digits, tmp_path):
    import tensorflow as tf

    from bottleneck.images import DecodeOptions, decode_image

    model_dir, logs = tmp_path / "model", tmp_path / "tb"
    train_head(TrainOptions(str(digits / "features"), str(model_dir), tensorboard=str(logs),
                            export=("saved_model",), head=HeadConfig(epochs=2), verbose=0))
    events = sorted(logs.rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"train", "validation"}
    losses = [v.simple_value if v.HasField("simple_value") else
              float(tf.make_ndarray(v.tensor))
              for p in events if p.parent.name == "train"
              for e in tf.compat.v1.train.summary_iterator(str(p))
              for v in e.summary.value if v.tag == "epoch_loss"]
    assert len(losses) == 2  # one a epoch
    paths = sorted((digits / "new").rglob("*.png"))[:16]
    images = np.stack([decode_image(p.read_bytes(), DecodeOptions(SIZE)) for p in paths])
    keras_probs = np.asarray(load_model(str(model_dir / "classifier.keras"))(images))
    saved = tf.saved_model.load(str(model_dir / "saved_model"))  # held: serve() needs it
    served = saved.serve(tf.constant(images))
    np.testing.assert_allclose(np.asarray(served), keras_probs, atol=1e-5)
    print(f"\n[export] saved_model vs classifier.keras: max |diff| "
          f"{np.abs(np.asarray(served) - keras_probs).max():.2e}")


def test_cli_evaluate_and_predict_table(digits, trained):
    model_dir, _ = trained
    one = next((digits / "new" / "7").iterdir())
    r = run_cli("predict", str(model_dir), str(one), "--address", "local", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert str(one) in r.stdout and "probability" in r.stdout
    r = run_cli("evaluate", str(model_dir), str(digits / "new-features"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 10 * HELD_OUT


def test_null_labels_refused(tmp_path, digits, ray_cluster):
    src = tmp_path / "in"
    shutil.copytree(digits / "new", src)
    shutil.copy(next((src / "1").iterdir()), src / "loose.png")
    extract(src, tmp_path / "f")
    with pytest.raises(FeatureDataError, match="no label"):
        train_head(TrainOptions(str(tmp_path / "f"), str(tmp_path / "m"),
                                head=HeadConfig(epochs=1), verbose=0))


def test_unknown_validation_label_refused(tmp_path, digits, ray_cluster):
    src = tmp_path / "in"
    shutil.copytree(digits / "new" / "1", src / "1")
    shutil.copytree(digits / "new" / "2", src / "zebra")
    extract(src, tmp_path / "val")
    with pytest.raises(FeatureDataError, match="zebra"):
        train_head(TrainOptions(str(digits / "features"), str(tmp_path / "m"),
                                validation=str(tmp_path / "val"),
                                head=HeadConfig(epochs=1), verbose=0))


def test_mixed_settings_refused(tmp_path, digits, ray_cluster):
    s = run_extract(ExtractOptions(str(digits / "new"), str(tmp_path / "f48"), weights="random",
                                   image_size=48, pooling="avg", shard_size=128, progress=False))
    assert s.ok
    with pytest.raises(FeatureDataError, match="image_size"):
        train_head(TrainOptions(str(digits / "features"), str(tmp_path / "m"),
                                validation=str(tmp_path / "f48"), head=HeadConfig(epochs=1),
                                verbose=0))
    mixed = tmp_path / "mixed"
    shutil.copytree(digits / "features", mixed)
    shutil.copy(tmp_path / "f48" / "part-00000.parquet", mixed / "part-00099.parquet")
    with pytest.raises(FeatureDataError, match="pooling"):
        FeatureDataset(str(mixed))


def test_cli_train_error_paths(tmp_path, digits):
    def run(*args):
        return run_cli("train", *args, "--address", "local", timeout=120)

    r = run(str(tmp_path / "nothing"), str(tmp_path / "m"))
    assert r.returncode == 2 and "no bottleneck features" in r.stderr
    r = run(str(digits / "features"), str(tmp_path / "m"), "--validation-split", "1.5")
    assert r.returncode == 2 and "validation-split" in r.stderr
    r = run(str(digits / "features"), str(tmp_path / "m"), "--validation", "x",
            "--validation-split", "0.1")
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_predict_output_inside_input_is_refused(digits, trained):
    from bottleneck.errors import UsageError
    from bottleneck.prediction import PredictOptions, check_predict

    model_dir, _ = trained
    with pytest.raises(UsageError, match="must not be inside INPUT"):
        check_predict(PredictOptions(str(model_dir), str(digits / "new"),
                                     output=str(digits / "new" / "3" / "p.parquet")))
