"""Train the dense head over streamed features, evaluate it, export the classifier.

`check_train` validates arguments and the feature datasets without Ray or TensorFlow;
`train_head` is the work itself (one process; `run_train` runs it as one Ray task, on a
GPU when the cluster has one); `evaluate` scores a saved head on a feature dataset.

MODEL_DIR receives: head.keras, classifier.keras, classes.json, history.json,
metrics.json, training.png, confusion.png, features.json (the feature settings).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError, require_positive
from ..storage import Storage
from .features import FeatureDataError, FeatureDataset
from .head import OPTIMIZERS, HeadConfig

EXPORTS = ("saved_model",)  # serving formats of the full classifier
VARIANCE_FLOOR = 1e-3  # relative to the mean variance of all features


@dataclass
class TrainOptions:
    features: str
    model_dir: str
    validation: str | None = None
    validation_split: float | None = None  # default 0.2 when --validation is not given
    head: HeadConfig = field(default_factory=HeadConfig)
    shuffle_buffer: int = 1024
    weights: str | None = None  # the weights file, when it moved since the features were made
    tensorboard: str | None = None  # where TensorBoard logs go (a folder or bucket prefix)
    export: tuple[str, ...] = ()  # serving formats beside classifier.keras: "saved_model"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    address: str | None = None
    verbose: int = 2

    @property
    def split(self) -> float:
        if self.validation:
            return 0.0
        return 0.2 if self.validation_split is None else self.validation_split


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_train(o: TrainOptions) -> Any:
    """Check everything that can be seen before training, and find the conv base weights
    the features were made with (a model.WeightsSpec, for the exported classifier).
    Raises UsageError (FeatureDataError for unusable features)."""
    from ..runner.pool import check_address

    check_address(o.address)
    h = o.head
    if o.validation and o.validation_split is not None:
        raise UsageError("give --validation or --validation-split, not both")
    if not 0.0 <= o.split < 1.0:
        raise UsageError(f"--validation-split must be in [0, 1), not {o.split}")
    require_positive(hidden=h.hidden, epochs=h.epochs, batch_size=h.batch_size,
                     shuffle_buffer=o.shuffle_buffer, learning_rate=h.learning_rate)
    if not 0.0 <= h.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), not {h.dropout}")
    if h.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    if o.tensorboard:
        try:
            import tensorboard  # noqa: F401 - only whether it is there
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install "
                             "tensorboard (or the cpu/gpu extra of vgg-bottleneck)") from None
    unknown = sorted(set(o.export) - set(EXPORTS))
    if unknown:
        raise UsageError(f"--export must be one of {', '.join(EXPORTS)}, not {unknown[0]!r}")
    if h.early_stopping is not None and h.early_stopping <= 0:
        raise UsageError("--early-stopping PATIENCE must be positive")
    try:
        train = FeatureDataset(o.features, o.storage_options)
        if o.validation:
            train.check_compatible(FeatureDataset(o.validation, o.storage_options))
    except FileNotFoundError as e:
        raise FeatureDataError(str(e)) from None
    weights = weights_for(train.metadata, o.weights, o.storage_options)
    try:
        Storage(o.model_dir, o.storage_options).check_writable()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"MODEL_DIR is not writable: {o.model_dir}: {e}") from None
    return weights


def weights_for(meta: Any, weights: str | None, storage_options: dict[str, Any]) -> Any:
    """The conv base weights the features were made with (`meta`: their DatasetMetadata),
    for the exported classifier: the file recorded in the features' metadata, checked
    against its sha256, or `weights` when the file has moved. Raises UsageError."""
    from ..model import resolve_weights

    identity = meta.settings.weights
    if identity == "imagenet" or identity.startswith("random:"):
        return resolve_weights(identity, storage_options)
    where = weights or meta.weights_url
    if not where:
        raise UsageError(f"the features were made with a weights file ({identity}) whose "
                         "location they do not record; pass it with --weights")
    try:
        spec = resolve_weights(where, storage_options)
    except (ValueError, FileNotFoundError, OSError) as e:
        hint = "" if weights else "; pass the file with --weights if it moved"
        raise UsageError(f"the weights file the features were made with: {e}{hint}") from None
    if spec.identity != identity:
        hint = "" if weights else " (the file changed since; pass the original with --weights)"
        raise UsageError(f"weights file {where} is {spec.identity}, but the features were made "
                         f"with {identity}{hint}")
    return spec


def scan_labels(ds: FeatureDataset, split: float, validation: bool) -> Counter:
    """Label counts of one side of the split; refuses rows without a label."""
    counts: Counter = Counter()
    null_example = None
    nulls = 0
    for path, label in ds.iter_labels(split, validation):
        if label is None:
            nulls += 1
            null_example = null_example or path
        else:
            counts[label] += 1
    if nulls:
        raise FeatureDataError(
            f"{nulls} row(s) of {ds.url} have no label (e.g. {null_example}): images directly "
            "in INPUT get none. Put them in INPUT/<label>/ folders, or leave them out.")
    return counts


def feature_stats(ds: FeatureDataset, classes: list[str], split: float,
                  batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of every flattened feature, in one streaming pass (float64 sums)."""
    total = sq = None
    n = 0
    for x, _ in ds.batches(classes, batch_size, split, want_validation=False):
        x = x.reshape(len(x), -1).astype(np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
        n += len(x)
    mean = total / n
    var = np.maximum(sq / n - mean * mean, 0.0)
    # ReLU features that (almost) never fire in training would be scaled by up to 1/sqrt(eps)
    # and blow up on the first image where they do: floor the variance.
    var = np.maximum(var, VARIANCE_FLOOR * max(float(var.mean()), 1e-12))
    return mean.astype(np.float32), var.astype(np.float32)


def _tf_dataset(ds: FeatureDataset, classes: list[str], batch_size: int, split: float,
                validation: bool, shuffle_buffer: int, seed: int, repeat: bool = False) -> Any:
    """Batches streamed from Parquet into tf.data; with `repeat`, one pass per epoch forever."""
    import tensorflow as tf

    epochs = itertools.count()
    shape = ds.settings.shape

    def gen() -> Any:
        # A new seed each pass: each epoch sees another order.
        yield from ds.batches(classes, batch_size, split, validation,
                              shuffle_buffer=shuffle_buffer, seed=seed + next(epochs))

    data = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int32),
    ))
    return (data.repeat() if repeat else data).prefetch(2)


def predict_features(model: Any, ds: FeatureDataset, classes: list[str], split: float,
                     validation: bool, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, true class indices) over one side of a dataset, streamed."""
    probs, ys = [], []
    for x, y in ds.batches(classes, batch_size, split, validation):
        probs.append(np.asarray(model(x, training=False)))
        ys.append(y)
    return np.concatenate(probs), np.concatenate(ys)


def score(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from .metrics import classification_report, confusion_matrix, log_loss

    cm = confusion_matrix(y, probs.argmax(1), len(classes))
    return {"val_accuracy": float((probs.argmax(1) == y).mean()) if len(y) else 0.0,
            "val_loss": log_loss(probs, y) if len(y) else 0.0,
            "rows": int(len(y)), "classes": classes,
            "per_class": classification_report(cm, classes),
            "confusion_matrix": cm.tolist()}


def _save_model(model: Any, out: Storage, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        model.save(local)
        with open(local, "rb") as f:
            out.write_bytes_atomic(f.read(), name)


def train_head(o: TrainOptions, weights: Any = None) -> dict[str, Any]:
    """Train, evaluate and export. Returns the metrics (also written to metrics.json).
    `weights`: the conv base's WeightsSpec from `check_train` (found again when None)."""
    from .head import build_head

    h = o.head
    train = FeatureDataset(o.features, o.storage_options)
    val = FeatureDataset(o.validation, o.storage_options) if o.validation else train
    if val is not train:
        train.check_compatible(val)
    if weights is None:
        weights = weights_for(train.metadata, o.weights, o.storage_options)
    split, val_side = o.split, val is train
    classes, n_train, n_val = _classes(train, val, split)
    _log(f"bottleneck train: {n_train} training rows, {n_val} validation rows, "
         f"{len(classes)} classes, features {train.settings.shape} ({train.settings.weights})")
    mean = var = None
    if h.normalize:
        mean, var = feature_stats(train, classes, split)
    model = build_head(train.settings.shape, len(classes), h, mean, var)
    history, fit_seconds = _fit(model, o, train, val if n_val else None, classes, n_train)
    epochs_run = len(history.get("loss", []))
    metrics: dict[str, Any] = {"val_accuracy": None, "val_loss": None}
    if n_val:
        metrics = score(*predict_features(model, val, classes, split, val_side), classes)
    metrics.update({
        "train_rows": n_train, "validation_rows": n_val, "epochs": epochs_run,
        "fit_seconds": round(fit_seconds, 3),
        "train_rows_per_second": round(n_train * epochs_run / max(fit_seconds, 1e-9), 1),
        "validation": o.validation or f"split {split:g} of {train.url} (hash of path)",
    })
    out = _export(o, train, weights, model, classes, history, metrics)
    _log(f"validation accuracy {metrics['val_accuracy']}, loss {metrics['val_loss']}; "
         f"{metrics['train_rows_per_second']} rows/s; model in {out.url}")
    return metrics


def _classes(train: FeatureDataset, val: FeatureDataset, split: float
             ) -> tuple[list[str], int, int]:
    """(classes, training rows, validation rows); refuses fewer than 2 classes and
    validation labels the training side never has."""
    counts = scan_labels(train, split, validation=False)
    classes = sorted(counts)
    if len(classes) < 2:
        raise FeatureDataError(f"need at least 2 classes to train, found {classes}")
    val_counts = scan_labels(val, split, validation=val is train)
    unknown = sorted(set(val_counts) - set(classes))
    if unknown:
        raise FeatureDataError(f"validation labels {unknown} never occur in the training set "
                               f"(classes: {classes})")
    return classes, sum(counts.values()), sum(val_counts.values())


def _fit(model: Any, o: TrainOptions, train: FeatureDataset, val: FeatureDataset | None,
         classes: list[str], n_train: int) -> tuple[dict[str, list[float]], float]:
    """model.fit over streamed batches; returns (history, seconds)."""
    import keras

    h, split = o.head, o.split
    # FeatureDataset.batches yields exactly ceil(rows / batch) batches a pass.
    steps = -(-n_train // h.batch_size)
    train_data = _tf_dataset(train, classes, h.batch_size, split, False, o.shuffle_buffer, h.seed,
                             repeat=True)
    val_data = (_tf_dataset(val, classes, 256, split, val is train, 0, 0) if val else None)
    callbacks = []
    if h.early_stopping and val_data is not None:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=h.early_stopping, restore_best_weights=True))
    with tempfile.TemporaryDirectory(prefix="bottleneck-tensorboard-") as logs:
        if o.tensorboard:  # written here, then copied: Keras writes to local paths only
            callbacks.append(keras.callbacks.TensorBoard(log_dir=logs))
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # The validation stream's length is not given to Keras; it warns when it ends.
                warnings.filterwarnings("ignore", message="Your input ran out of data")
                fit = model.fit(train_data, validation_data=val_data, epochs=h.epochs,
                                verbose=o.verbose, steps_per_epoch=steps, callbacks=callbacks,
                                shuffle=False)
        finally:  # a failed fit's logs are what one looks at
            if o.tensorboard:
                Storage(o.tensorboard, o.storage_options).upload_dir(logs)
        seconds = time.perf_counter() - t0
    history = {k: [float(v) for v in vs] for k, vs in fit.history.items()}
    return history, seconds


def _export(o: TrainOptions, train: FeatureDataset, weights: Any, head: Any,
            classes: list[str], history: dict[str, Any], metrics: dict[str, Any]) -> Storage:
    """MODEL_DIR: the head, the full classifier, what they were made from, and the plots."""
    from ..model import build_conv_base
    from .head import build_classifier
    from .metrics import confusion_plot, training_plot

    settings = train.settings
    out = Storage(o.model_dir, o.storage_options)
    out.makedirs()
    conv_base = build_conv_base(weights, settings.image_size, settings.pooling,
                                settings.precision)
    classifier = build_classifier(conv_base, head, settings.image_size, classes)
    _save_model(head, out, "head.keras")
    _save_model(classifier, out, "classifier.keras")
    if "saved_model" in o.export:
        with tempfile.TemporaryDirectory() as tmp:
            classifier.export(os.path.join(tmp, "saved_model"), format="tf_saved_model",
                              verbose=False)
            out.upload_dir(os.path.join(tmp, "saved_model"), "saved_model")
    out.write_json_atomic(classes, "classes.json")
    out.write_json_atomic(history, "history.json")
    out.write_json_atomic(metrics, "metrics.json")
    out.write_json_atomic({"settings": settings.to_dict(), "features": train.url,
                           "head": asdict(o.head), "shuffle_buffer": o.shuffle_buffer},
                          "features.json")
    out.write_bytes_atomic(training_plot(history), "training.png")
    if "confusion_matrix" in metrics:
        out.write_bytes_atomic(confusion_plot(np.array(metrics["confusion_matrix"]), classes),
                               "confusion.png")
    return out


def run_train(o: TrainOptions) -> dict[str, Any]:
    """Check, then run `train_head` as one Ray task: on a GPU when the cluster has one, else
    on CPUs. Raises UsageError before Ray starts for anything `check_train` finds."""
    from ..runner.pool import cluster_size, connect, run_task

    weights = check_train(o)
    where = connect(o.address)
    cpus, gpus, node_cpus, _ = cluster_size()
    cpus = min(cpus, node_cpus) or cpus  # one task: at most one node's CPUs
    _log(f"bottleneck train: on {where}, {'1 GPU' if gpus >= 1 else f'{cpus:g} CPUs'}")
    return run_task(train_head, o, weights, num_gpus=1 if gpus >= 1 else 0,
                    num_cpus=1 if gpus >= 1 else max(1, int(cpus)))


def evaluate(model_dir: str, features: str, storage_options: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """Score MODEL_DIR's head on every row of FEATURES (labels must be known classes)."""
    from ..schema import FeatureSettings
    from .head import load_stored_model, read_model_info

    opts = storage_options or {}
    store = Storage(model_dir, opts)
    classes, trained = read_model_info(store)
    ds = FeatureDataset(features, opts)
    diffs = ds.settings.differences(FeatureSettings.from_dict(trained))
    if diffs:
        raise FeatureDataError(f"{features} was made with other settings than the features "
                               f"the model was trained on: " + "; ".join(diffs))
    probs, y = predict_features(load_stored_model(store, "head.keras"), ds, classes, 0.0, False)
    return score(probs, y, classes)


def format_metrics(m: dict[str, Any]) -> str:
    lines = [f"accuracy {m['val_accuracy']:.4f}   loss {m['val_loss']:.4f}   rows {m['rows']}",
             f"{'class':<16} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    for c, r in m["per_class"].items():
        lines.append(f"{c:<16} {r['precision']:>9.3f} {r['recall']:>9.3f} {r['f1']:>9.3f} "
                     f"{r['support']:>8}")
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
