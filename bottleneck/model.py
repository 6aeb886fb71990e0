"""The VGG16 conv base, whatever its weights: ImageNet, seeded random, or a weights file.

`--weights` takes:
- ``imagenet``: Keras downloads and caches the notop file (needs internet on the workers);
- ``random`` or ``random:SEED``: He-uniform weights from NumPy's seeded generator, the same
  on every machine (for tests and demos);
- a path or fsspec URL of a weights file: the legacy keras-applications
  ``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`` or a Keras ``.weights.h5``. A
  cluster with no internet loads it from its own bucket. Its identity is its sha256.

TensorFlow is imported inside the functions, so that importing this module is cheap.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .storage import Storage, with_retries

DEFAULT_SEED = 0


# VGG16's 13 conv kernels, in order; a weights file must hold exactly these.
VGG16_CONV_KERNELS: tuple[tuple[int, int, int, int], ...] = tuple(
    (3, 3, cin, cout) for cin, cout in [
        (3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
        (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)])
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class WeightsSpec:
    """What --weights asked for, resolved: `identity` is what the metadata records."""

    kind: str  # "imagenet" | "random" | "file"
    identity: str
    seed: int = DEFAULT_SEED
    url: str | None = None
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    file_format: str = ""  # for files: "legacy" (keras-applications .h5) or "keras" (.weights.h5)


def weights_file_format(data: bytes) -> str:
    """'legacy' for a keras-applications h5 file, 'keras' for a Keras 3 `.weights.h5`.

    Checks that the file holds VGG16's 13 conv kernels and nothing else, so that a wrong
    file is refused before any actor starts, not by every actor in turn.
    Raises ValueError saying what is wrong.
    """
    if not data.startswith(HDF5_MAGIC):
        raise ValueError("not an HDF5 weights file (.h5 or .weights.h5)")
    try:
        import h5py
    except ImportError:  # no TensorFlow stack on this machine: the actors will check
        return "legacy" if b"layer_names" in data[:1 << 20] else "keras"
    import io

    with h5py.File(io.BytesIO(data), "r") as f:
        if "layer_names" in f.attrs:
            fmt, kernels = "legacy", []
            for name in f.attrs["layer_names"]:
                g = f[name.decode() if isinstance(name, bytes) else name]
                wnames = list(g.attrs.get("weight_names", []))
                if wnames:
                    wn = wnames[0]
                    kernels.append(tuple(g[wn.decode() if isinstance(wn, bytes) else wn].shape))
        elif "layers" in f:
            fmt, kernels = "keras", []
            for g in f["layers"].values():
                if "vars" in g and "0" in g["vars"]:
                    kernels.append(tuple(g["vars"]["0"].shape))
        else:
            raise ValueError("an HDF5 file, but not Keras weights (no layer_names, no layers)")
    if sorted(kernels) != sorted(VGG16_CONV_KERNELS):
        extra = [k for k in kernels if len(k) != 4]
        hint = (f" ({len(extra)} non-conv layers: a full model with its top? VGG16 needs the "
                "notop weights)" if extra else "")
        raise ValueError(f"not VGG16 conv-base weights: {len(kernels)} layers with weights "
                         f"where VGG16 without its top has 13{hint}")
    return fmt


def resolve_weights(text: str, storage_options: dict[str, Any] | None = None) -> WeightsSpec:
    """Parse --weights; for a file, read it once to hash it. Raises ValueError/FileNotFoundError."""
    if text == "imagenet":
        return WeightsSpec(kind="imagenet", identity="imagenet")
    if text == "random" or text.startswith("random:"):
        seed_text = text.partition(":")[2] or str(DEFAULT_SEED)
        try:
            seed = int(seed_text)
        except ValueError:
            raise ValueError(
                f"--weights random:SEED needs an integer seed, not {seed_text!r}") from None
        return WeightsSpec(kind="random", identity=f"random:{seed}", seed=seed)
    store = Storage(text, storage_options)
    if not store.fs.exists(store.root) or store.fs.isdir(store.root):
        raise FileNotFoundError(f"weights file not found: {text}")
    data = store.read_bytes(store.root)
    try:
        fmt = weights_file_format(data)
    except ValueError as e:
        raise ValueError(f"{text}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    # store.url: an absolute path for local files, since actors have another working dir.
    return WeightsSpec(kind="file", identity=f"sha256:{digest}", url=store.url,
                       storage_options=tuple(sorted((storage_options or {}).items())),
                       file_format=fmt)


def _suffix(file_format: str) -> str:
    """The name ending that tells Keras' load_weights the format."""
    return ".weights.h5" if file_format == "keras" else ".h5"


def _local_weights_file(spec: WeightsSpec) -> str:
    """A local copy of a weights file, cached by content hash, whose name ends as Keras
    wants for its format (`.weights.h5` for Keras 3, any other `.h5` for legacy files)."""
    assert spec.url is not None
    suffix = _suffix(spec.file_format or ("keras" if spec.url.endswith(".weights.h5")
                                          else "legacy"))
    if "://" not in spec.url or spec.url.startswith("file://"):
        local_path = spec.url.removeprefix("file://")
        named_right = local_path.endswith(suffix) and (
            suffix == ".weights.h5" or not local_path.endswith(".weights.h5"))
        if named_right:
            return local_path
    cache = os.path.join(os.path.expanduser("~/.cache/bottleneck/weights"))
    os.makedirs(cache, exist_ok=True)
    digest = spec.identity.removeprefix("sha256:")
    local = os.path.join(cache, digest + suffix)
    if not os.path.exists(local):
        store = Storage(spec.url, dict(spec.storage_options))
        data = with_retries(lambda: store.fs.cat_file(store.root))
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"weights file {spec.url} changed while the job ran")
        tmp = f"{local}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, local)
    return local


def random_conv_weights(model: Any, seed: int) -> None:
    """Seeded He-uniform kernels and zero biases, identical on every machine and version."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if not ws:
            continue
        kernel, bias = ws
        fan_in = int(np.prod(kernel.shape[:-1]))
        limit = np.sqrt(6.0 / fan_in)
        layer.set_weights([
            rng.uniform(-limit, limit, size=kernel.shape).astype(np.float32),
            np.zeros_like(bias),
        ])


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


def build_conv_base(spec: WeightsSpec, image_size: int, pooling: str = "none",
                    precision: str = "float32") -> Any:
    """keras.applications.VGG16(include_top=False) with the weights `spec` names.

    `precision` is a Keras dtype policy: "float32", or a mixed policy that keeps float32
    weights and computes in bfloat16/float16 (faster on GPUs, and on CPUs with AMX; the
    features then differ from float32 ones — see the README for how much).
    """
    import keras

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    pool = None if pooling == "none" else pooling
    shape = (image_size, image_size, 3)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        if spec.kind == "imagenet":
            return keras.applications.VGG16(include_top=False, weights="imagenet",
                                            input_shape=shape, pooling=pool)
        model = keras.applications.VGG16(include_top=False, weights=None, input_shape=shape,
                                         pooling=pool)
    finally:
        keras.config.set_dtype_policy(previous)
    if spec.kind == "random":
        random_conv_weights(model, spec.seed)
    else:
        model.load_weights(_local_weights_file(spec))
    return model


def configure_threads(threads: int | None) -> None:
    """Pin TensorFlow's thread pools; must run before TensorFlow executes anything."""
    if not threads:
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        pass  # already initialised in this process: keep what it has


class BatchRunner:
    """Runs a Keras model on fixed-size batches, so the graph is traced once.

    A short last batch is padded with zeros and the padding dropped from the result.
    """

    def __init__(self, model: Any, batch_size: int):
        import tensorflow as tf

        self.model = model
        self.batch_size = batch_size
        in_shape = tuple(model.inputs[0].shape[1:])
        self._fn = tf.function(
            # float32 out, whatever the compute precision inside.
            lambda x: tf.cast(model(x, training=False), tf.float32),
            input_signature=[tf.TensorSpec((batch_size, *in_shape), tf.float32)],
        )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)  # uint8 pixels (predict) included
        n = len(batch)
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *batch.shape[1:]), dtype=np.float32)
            batch = np.concatenate([batch, pad])
        out = self._fn(batch)
        return np.asarray(out)[:n]
