"""The dense head, and the full classifier (preprocessing + conv base + head) built from it.

Every layer is a built-in Keras layer, so both models load in Keras' safe mode: loading
never runs arbitrary code (no Lambda layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UsageError
from ..images import VGG16_MEAN_BGR
from ..storage import Storage

OPTIMIZERS = ("rmsprop", "adam", "sgd")


@dataclass(frozen=True)
class HeadConfig:
    """The seed recipe by default: Flatten → Dense(256, relu) → Dropout(0.5) → softmax,
    RMSprop at Keras' default learning rate, 50 epochs of batch 16."""

    hidden: int = 256
    dropout: float = 0.5
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-3
    epochs: int = 50
    batch_size: int = 16
    seed: int = 0
    early_stopping: int | None = None  # patience in epochs, on val_loss
    normalize: bool = True


def build_head(feature_shape: tuple[int, ...], n_classes: int, cfg: HeadConfig,
               mean: np.ndarray | None = None, variance: np.ndarray | None = None) -> Any:
    """Input(feature shape) → Flatten → [Normalization] → Dense → Dropout → Dense(softmax).

    `mean`/`variance` (per flattened feature, from one streaming pass over the training
    rows) are stored in the Normalization layer, so the saved head standardizes by itself.
    """
    import keras

    keras.utils.set_random_seed(cfg.seed)
    inp = keras.Input(shape=feature_shape, name="features")
    x = keras.layers.Flatten(name="flatten")(inp)
    if cfg.normalize:
        assert mean is not None and variance is not None
        x = keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="standardize")(x)
    x = keras.layers.Dense(cfg.hidden, activation="relu", name="hidden")(x)
    x = keras.layers.Dropout(cfg.dropout, name="dropout")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inp, out, name="bottleneck_head")
    optimizer = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam,
                 "sgd": keras.optimizers.SGD}[cfg.optimizer](learning_rate=cfg.learning_rate)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def caffe_preprocessing_layer(image_size: int) -> Any:
    """vgg16.preprocess_input as a frozen 1×1 convolution: RGB → BGR and minus the mean.

    The kernel is a channel permutation (exact in float32), the bias the negated mean.
    """
    import keras

    layer = keras.layers.Conv2D(3, 1, name="vgg16_preprocess", trainable=False)
    layer.build((None, image_size, image_size, 3))
    kernel = np.zeros((1, 1, 3, 3), np.float32)
    for out_c, in_c in enumerate((2, 1, 0)):
        kernel[0, 0, in_c, out_c] = 1.0
    layer.set_weights([kernel, -VGG16_MEAN_BGR.astype(np.float32)])
    return layer


def build_classifier(conv_base: Any, head: Any, image_size: int, classes: list[str]) -> Any:
    """RGB images (S×S×3, values 0–255) → class probabilities, preprocessing inside."""
    import keras

    inp = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = caffe_preprocessing_layer(image_size)(inp)
    x = conv_base(x)
    out = head(x)
    return keras.Model(inp, out, name="bottleneck_classifier")


def load_model(path: str) -> Any:
    """Load a .keras model in safe mode (never runs code stored in the file)."""
    from ..tflog import quiet_tensorflow

    quiet_tensorflow()  # may be the first TensorFlow import of a user's process
    import keras

    return keras.models.load_model(path, safe_mode=True, compile=False)


def load_stored_model(model_dir: Storage, name: str) -> Any:
    """MODEL_DIR/<name> (a .keras file, local or in a bucket), loaded in safe mode."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            f.write(model_dir.read_bytes(model_dir.path(name)))
        return load_model(local)


def read_model_info(model_dir: Storage) -> tuple[list[str], dict[str, Any]]:
    """The classes and the feature settings of a trained MODEL_DIR (classes.json and
    features.json, as `train` writes them). Raises UsageError naming what is missing or
    malformed."""
    missing = [n for n in ("classes.json", "features.json") if not model_dir.exists(n)]
    if missing:
        raise UsageError(f"MODEL_DIR {model_dir.url} lacks {', '.join(missing)}: "
                         "train one with `bottleneck train`")
    try:
        classes = model_dir.read_json("classes.json")
        settings = model_dir.read_json("features.json")["settings"]
        if not (isinstance(classes, list) and isinstance(settings, dict)):
            raise TypeError("not the layout `bottleneck train` writes")
        for key in ("image_size", "interpolation"):  # what predict decodes images with
            if key not in settings:
                raise KeyError(key)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"MODEL_DIR {model_dir.url} has a malformed classes.json or "
                         f"features.json ({type(e).__name__}: {e})") from None
    return classes, settings
