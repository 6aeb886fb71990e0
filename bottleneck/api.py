"""The Python API: the CLI's commands as functions, for notebooks and scripts.

Keyword names are the CLI options' names (`--image-size` → `image_size`). A function
joins the Ray instance the caller already runs (`ray.init()` in a notebook), or starts or
joins one as the CLI does (`address=`). Errors are the CLI's: `UsageError` for whatever the
CLI refuses with exit 2, raised before any work. Importing this module is cheap: the
commands import what they need when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

    from .extraction import ExtractSummary
    from .prediction import PredictSummary


def _options(cls: type, command: str, given: dict[str, Any], **fixed: Any) -> Any:
    """`cls(**fixed, **given)`, with an unknown keyword refused as a UsageError."""
    known = set(cls.__dataclass_fields__) - set(fixed)  # type: ignore[attr-defined]
    unknown = sorted(set(given) - known)
    if unknown:
        raise UsageError(f"{command}: unknown option(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    return cls(**fixed, **given)


def extract(input: str, output: str, **options: Any) -> ExtractSummary:
    """`bottleneck extract INPUT OUTPUT`: images → Parquet bottleneck features.
    Returns the summary (`.ok`, `.rows`, `.errors`, `.failed`…)."""
    from .extraction import ExtractOptions, run_extract

    return run_extract(_options(ExtractOptions, "extract", options, input=input, output=output))


@dataclass
class TrainResult:
    model_dir: str
    metrics: dict[str, Any]  # also in MODEL_DIR/metrics.json

    @property
    def val_accuracy(self) -> float | None:
        return self.metrics.get("val_accuracy")


def train(features: str, model_dir: str, **options: Any) -> TrainResult:
    """`bottleneck train FEATURES MODEL_DIR`: the head, evaluated and exported with the
    full classifier. Head options (`hidden`, `epochs`, `learning_rate`…) as in the CLI."""
    from .training import HeadConfig, TrainOptions, run_train

    head_fields = set(HeadConfig.__dataclass_fields__)
    head = HeadConfig(**{k: options.pop(k) for k in list(options) if k in head_fields})
    o = _options(TrainOptions, "train", options, features=features, model_dir=model_dir,
                 head=head)
    return TrainResult(model_dir, run_train(o))


def evaluate(model_dir: str, features: str, storage_options: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """`bottleneck evaluate MODEL_DIR FEATURES`: accuracy, loss, per-class report."""
    from .training import evaluate as run_evaluate

    return run_evaluate(model_dir, features, storage_options)


def predict(model_dir: str, input: str, output: str | None = None,
            on_table: Callable[[pa.Table], None] | None = None, **options: Any
            ) -> pa.Table | PredictSummary:
    """`bottleneck predict MODEL_DIR INPUT`: with `output=` (a .parquet path), writes every
    prediction there and returns the summary; without, returns the predictions as a
    pyarrow Table (path, prediction, probability, and top-k columns with `top_k`) — or,
    with `on_table`, hands it each shard's table as the shard finishes, holds none, and
    returns the summary."""
    import pyarrow as pa

    from .prediction import PredictOptions, run_predict
    from .prediction.predictor import prediction_schema

    o = _options(PredictOptions, "predict", options, model_dir=model_dir, input=input,
                 output=output)
    if output or on_table:
        return run_predict(o, on_table=on_table)
    tables: list[pa.Table] = []
    summary = run_predict(o, on_table=tables.append)
    if not summary.ok:
        raise RuntimeError(f"predict: {len(summary.failed)} shard(s) failed: "
                           + "; ".join(f"{i}: {e}" for i, e in sorted(summary.failed.items())))
    return pa.concat_tables(tables) if tables else prediction_schema(o.top_k).empty_table()


def read_features(path: str, columns: list[str] | None = None, as_: str = "numpy",
                  storage_options: dict[str, Any] | None = None) -> Any:
    """A feature dataset as `as_`:
    - "arrow": a pyarrow Table of `columns` (default path, label, features);
    - "numpy": a dict of column → ndarray, features shaped (rows, *feature shape);
    - "tf": a tf.data.Dataset of such dicts, one row each, streamed row group by row group.
    Raises UsageError for a path that holds no bottleneck features."""
    from .training.features import read_feature_dataset

    return read_feature_dataset(path, columns, as_, storage_options)


def load_classifier(model_dir: str, storage_options: dict[str, Any] | None = None) -> Any:
    """MODEL_DIR's classifier (a Keras model: RGB images S×S×3, values 0–255 → class
    probabilities), loaded in safe mode. Its class names are in MODEL_DIR/classes.json."""
    from .storage import Storage
    from .training.head import load_stored_model, read_model_info

    store = Storage(model_dir, storage_options)
    read_model_info(store)  # a clear error for a folder that is no MODEL_DIR
    return load_stored_model(store, "classifier.keras")
