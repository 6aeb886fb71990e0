"""The conv base and its weights: seeded random, Keras .weights.h5, legacy keras-applications h5."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from bottleneck.model import BatchRunner, WeightsSpec, build_conv_base, resolve_weights

SIZE = 32
LEGACY_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-120, 140, (3, SIZE, SIZE, 3)).astype(np.float32)


def features(model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model(batch, training=False))


@pytest.fixture(scope="module")
def random_model():
    return build_conv_base(resolve_weights("random"), SIZE)


def write_legacy_notop_h5(model, path: Path) -> None:
    """The layout keras-applications' notop file has: root attrs layer_names, backend and
    keras_version; one group per layer (pooling and input layers too) whose attr
    weight_names names its datasets, kernel then bias."""
    import h5py

    names = [layer.name for layer in model.layers]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.1.4"
        for layer in model.layers:
            g = f.create_group(layer.name)
            ws = layer.get_weights()
            wnames = [f"{layer.name}_W_1:0", f"{layer.name}_b_1:0"] if ws else []
            g.attrs["weight_names"] = np.array([n.encode() for n in wnames], dtype="S")
            for n, w in zip(wnames, ws):
                g.create_dataset(n, data=w)


def test_resolve_weights_names():
    assert resolve_weights("imagenet") == WeightsSpec(kind="imagenet", identity="imagenet")
    assert resolve_weights("random").identity == "random:0"
    assert resolve_weights("random:7") == WeightsSpec(kind="random", identity="random:7", seed=7)
    with pytest.raises(ValueError, match="integer seed"):
        resolve_weights("random:x")
    with pytest.raises(FileNotFoundError):
        resolve_weights("/no/such/weights.h5")


def test_random_weights_are_deterministic_across_builds(random_model, batch):
    again = build_conv_base(resolve_weights("random"), SIZE)
    f1, f2 = features(random_model, batch), features(again, batch)
    assert f1.shape == (3, 1, 1, 512)
    assert np.abs(f1).max() > 0 and (f1 > 0).mean() > 0.05  # not all zeros after ReLU
    np.testing.assert_array_equal(f1, f2)
    for a, b in zip(random_model.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    other_seed = build_conv_base(resolve_weights("random:1"), SIZE)
    assert not np.array_equal(features(other_seed, batch), f1)


def test_keras_weights_h5_file_loads(random_model, batch, tmp_path):
    path = tmp_path / "mine.weights.h5"
    random_model.save_weights(path)
    spec = resolve_weights(str(path))
    assert spec.kind == "file"
    assert spec.identity == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = build_conv_base(spec, SIZE)
    np.testing.assert_array_equal(features(loaded, batch), features(random_model, batch))


def test_legacy_keras_applications_h5_file_loads(random_model, batch, tmp_path):
    path = tmp_path / LEGACY_NAME
    write_legacy_notop_h5(random_model, path)
    spec = resolve_weights(str(path))
    assert spec.identity == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = build_conv_base(spec, SIZE)
    np.testing.assert_array_equal(features(loaded, batch), features(random_model, batch))
    # The file really carries other weights than the ones a fresh build starts with.
    assert not np.array_equal(features(loaded, batch),
                              features(build_conv_base(resolve_weights("random:3"), SIZE), batch))


def test_a_weights_file_is_read_through_fsspec(random_model, batch, tmp_path, monkeypatch):
    """A URL (here fsspec's in-memory store) is fetched once into a cache named by its hash."""
    import fsspec

    src = tmp_path / LEGACY_NAME
    write_legacy_notop_h5(random_model, src)
    url = f"memory://bucket/models/{LEGACY_NAME}"
    with fsspec.open(url, "wb") as f:
        f.write(src.read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    try:
        spec = resolve_weights(url)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert spec.identity == f"sha256:{digest}"
        loaded = build_conv_base(spec, SIZE)
        np.testing.assert_array_equal(features(loaded, batch), features(random_model, batch))
        cached = list((tmp_path / "home/.cache/bottleneck/weights").iterdir())
        assert [p.name for p in cached] == [f"{digest}.h5"]
    finally:
        fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_weights_identity_is_the_content_hash_not_the_name(random_model, tmp_path):
    a, b = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    random_model.save_weights(a)
    b.write_bytes(a.read_bytes())
    assert resolve_weights(str(a)).identity == resolve_weights(str(b)).identity
    build_conv_base(resolve_weights("random:5"), SIZE).save_weights(b)
    assert resolve_weights(str(a)).identity != resolve_weights(str(b)).identity


def test_a_weights_file_named_without_its_suffix_still_loads(random_model, batch, tmp_path,
                                                             monkeypatch):
    """Keras picks the format by the name's ending; we pick it by the content."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    legacy, keras3 = tmp_path / "vgg16-notop.bin", tmp_path / "conv-base.h5"
    write_legacy_notop_h5(random_model, legacy)
    random_model.save_weights(tmp_path / "x.weights.h5")
    (tmp_path / "x.weights.h5").rename(keras3)  # Keras 3 content, legacy-looking name
    for path, fmt in [(legacy, "legacy"), (keras3, "keras")]:
        spec = resolve_weights(str(path))
        assert spec.file_format == fmt
        loaded = build_conv_base(spec, SIZE)
        np.testing.assert_array_equal(features(loaded, batch), features(random_model, batch))


def test_wrong_weights_files_are_refused_before_any_model_is_built(random_model, tmp_path):
    import h5py

    text = tmp_path / "notes.h5"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="not an HDF5 weights file"):
        resolve_weights(str(text))

    empty_h5 = tmp_path / "empty.h5"
    h5py.File(empty_h5, "w").close()
    with pytest.raises(ValueError, match="not Keras weights"):
        resolve_weights(str(empty_h5))

    # A full VGG16 (with its dense top) in the legacy layout: one layer too many.
    with_top = tmp_path / "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
    write_legacy_notop_h5(random_model, with_top)
    with h5py.File(with_top, "a") as f:
        f.attrs["layer_names"] = np.append(f.attrs["layer_names"], b"fc1")
        g = f.create_group("fc1")
        g.attrs["weight_names"] = np.array([b"fc1_W_1:0", b"fc1_b_1:0"])
        g.create_dataset("fc1_W_1:0", data=np.zeros((512, 8), np.float32))
        g.create_dataset("fc1_b_1:0", data=np.zeros((8,), np.float32))
    with pytest.raises(ValueError, match="14 layers with weights .*non-conv"):
        resolve_weights(str(with_top))

    # Another network's conv weights (ResNet-ish shapes) are refused too.
    other = tmp_path / "other.weights.h5"
    import keras

    tiny = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    tiny.save_weights(other)
    with pytest.raises(ValueError, match="not VGG16 conv-base weights: 1 layers"):
        resolve_weights(str(other))


def test_a_relative_weights_path_is_made_absolute(random_model, tmp_path, monkeypatch):
    """Actors do not share the driver's working directory: the spec must not depend on it."""
    path = tmp_path / "rel.weights.h5"
    random_model.save_weights(path)
    monkeypatch.chdir(tmp_path)
    spec = resolve_weights("rel.weights.h5")
    assert spec.url == str(path)


@pytest.mark.parametrize("pooling, shape", [("none", (1, 1, 512)), ("avg", (512,)),
                                            ("max", (512,))])
def test_pooling_shapes(pooling, shape, batch):
    model = build_conv_base(resolve_weights("random"), SIZE, pooling)
    assert features(model, batch).shape == (3, *shape)


def test_feature_shape_matches_the_model():
    from bottleneck.schema import feature_shape

    for size in (32, 48, 50, 64):
        model = build_conv_base(resolve_weights("random"), size)
        assert tuple(model.outputs[0].shape[1:]) == feature_shape(size, "none")
    assert feature_shape(224, "none") == (7, 7, 512)


def test_batch_runner_pads_the_last_batch_and_drops_the_padding(random_model, batch):
    run = BatchRunner(random_model, batch_size=2)
    whole = features(random_model, batch)
    got = np.concatenate([run(batch[:2]), run(batch[2:])])
    assert got.shape == whole.shape
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())


def test_mixed_precision_conv_base_is_close_to_float32_and_returns_float32():
    import numpy as np

    from bottleneck.model import BatchRunner, build_conv_base, resolve_weights

    spec = resolve_weights("random:3")
    x = np.random.default_rng(1).uniform(-120, 130, (4, 32, 32, 3)).astype(np.float32)
    ref = BatchRunner(build_conv_base(spec, 32), 4)(x)
    for policy, bound in (("mixed_bfloat16", 0.05), ("mixed_float16", 0.01)):
        out = BatchRunner(build_conv_base(spec, 32, precision=policy), 4)(x)
        assert out.dtype == np.float32
        rel = np.abs(out - ref).max() / np.abs(ref).max()
        assert 0 < rel < bound, (policy, rel)  # close, and really computed another way
    import keras

    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
