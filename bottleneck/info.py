"""`bottleneck info PATH`: what a features OUTPUT, a MODEL_DIR or a predictions file holds.

Read from footers, manifests and small JSON files, plus one column (labels, or predictions)
streamed file by file; never the features themselves. No Ray, no TensorFlow.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from .errors import UsageError
from .runner.manifest import MANIFEST, SUCCESS, read_manifest
from .runner.output import (
    ERRORS_DIR,
    count_rows,
    dataset_metadata,
    footer_rows,
    part_paths,
    read_table,
)
from .runner.plan import PLAN_DIR, read_state
from .runner.planning import PART_RE, committed_shards, part_name
from .storage import Storage, with_retries

MODEL_FILES = ("head.keras", "classifier.keras", "classes.json", "features.json",
               "metrics.json", "history.json", "training.png", "confusion.png")


def describe(path: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What PATH holds, as one JSON-ready dict whose `kind` is "features", "predictions"
    (a predictions file, or the staging folder of an unfinished one) or "model".
    Raises UsageError when PATH is none of these."""
    try:
        store = Storage(path, storage_options)
        exists = with_retries(lambda: store.fs.exists(store.root), what=f"exists {path}")
    except Exception as e:  # noqa: BLE001 - an unknown protocol, credentials, endpoint…
        raise UsageError(f"cannot open {path}: {type(e).__name__}: {e}") from None
    if not exists:
        raise UsageError(f"{store.url} does not exist")
    if with_retries(lambda: store.fs.isfile(store.root), what=f"info {store.url}"):
        return _predictions_file(store)
    names = set(store.ls_names())
    if MANIFEST in names or any(PART_RE.match(n) for n in names):
        return _sharded_output(store, names)
    if "classes.json" in names:
        return _model_dir(store, names)
    raise UsageError(f"{store.url} is not a bottleneck OUTPUT, MODEL_DIR or predictions file")


def _size(store: Storage, path: str) -> int:
    return int(with_retries(lambda: store.fs.du(path), what=f"size {path}"))


def _column_counts(store: Storage, paths: list[str], column: str) -> dict[str, int]:
    """Counts of one string column's values over Parquet files, read one file at a time."""
    counts: Counter = Counter()
    for p in paths:
        values = read_table(store, p, [column]).column(column).to_pylist()
        counts.update("(none)" if v is None else v for v in values)
    return dict(sorted(counts.items()))


def _sharded_output(store: Storage, names: set[str]) -> dict[str, Any]:
    manifest = read_manifest(store)
    done = committed_shards(names)
    plan = read_state(store.child(PLAN_DIR)) if PLAN_DIR in names else None
    planned = plan.shards if plan else len(done)
    missing = sorted(set(range(planned)) - done)
    rows, errors = count_rows(store)
    kind = manifest.kind if manifest else "features"
    column = "label" if kind == "features" else "prediction"
    info: dict[str, Any] = {
        "kind": kind, "path": store.url, "input": manifest.input_url if manifest else None,
        "input_format": manifest.input_format if manifest else None,
        "finished": SUCCESS in names and not missing,
        "rows": rows, "errors": errors,
        "shards": {"planned": planned, "committed": len(done),
                   "missing": [part_name(i) for i in missing]},
        # Whether INPUT was listed to its end: until then more shards may come.
        "listing": ({"finished": plan.complete, "entries": plan.entries,
                     "labels": plan.labels, "runs": plan.run + 1} if plan else None),
        f"{column}s": _column_counts(store, part_paths(store), column),
        "settings": manifest.settings if manifest else None,
        "bytes": _size(store, store.root),
    }
    if kind == "features" and done:
        meta = dataset_metadata(store)
        info["settings"] = meta.settings.to_dict()
        info["feature_shape"] = list(meta.settings.shape)
    if ERRORS_DIR in names:
        info["errors_path"] = store.to_url(store.path(ERRORS_DIR))
    return info


def _model_dir(store: Storage, names: set[str]) -> dict[str, Any]:
    from .training.head import read_model_info

    classes, settings = read_model_info(store)
    metrics = store.read_json("metrics.json") if "metrics.json" in names else {}
    keep = ("val_accuracy", "val_loss", "train_rows", "validation_rows", "epochs", "validation")
    return {"kind": "model", "path": store.url, "classes": classes, "settings": settings,
            "metrics": {k: metrics[k] for k in keep if k in metrics},
            "files": {n: _size(store, store.path(n)) for n in MODEL_FILES if n in names},
            "missing_files": [n for n in MODEL_FILES if n not in names],
            "bytes": _size(store, store.root)}


def _predictions_file(store: Storage) -> dict[str, Any]:
    try:
        schema = with_retries(lambda: _schema(store, store.root), what=f"read {store.url}")
    except Exception as e:  # noqa: BLE001 - not Parquet at all
        raise UsageError(f"{store.url} is not a predictions file ({type(e).__name__})") from None
    if "prediction" not in schema.names:
        raise UsageError(f"{store.url} is not a predictions file (no prediction column)")
    rows = footer_rows(store, store.root)
    errors_file = store.root.removesuffix(".parquet") + ".errors.parquet"
    has_errors = with_retries(lambda: store.fs.exists(errors_file), what=f"exists {errors_file}")
    return {"kind": "predictions", "path": store.url, "finished": True, "rows": rows,
            "errors": footer_rows(store, errors_file) if has_errors else 0,
            "predictions": _column_counts(store, [store.root], "prediction"),
            "bytes": _size(store, store.root)}


def _schema(store: Storage, path: str) -> Any:
    with store.fs.open(path, "rb") as f:
        return pq.ParquetFile(f).schema_arrow


def format_info(info: dict[str, Any]) -> str:
    """The dict of `describe` as aligned lines for a terminal."""
    lines = [f"{info['kind']}: {info['path']}"]
    if "shards" in info:
        s = info["shards"]
        state = "finished" if info["finished"] else (
            f"NOT finished: {len(s['missing'])} shard(s) missing" if s["missing"]
            else "not finished (no _SUCCESS.json)")
        lines.append(f"state:    {state}, {s['committed']} of {s['planned']} shards committed")
        if s["missing"]:
            shown = ", ".join(s["missing"][:10])
            more = f" … and {len(s['missing']) - 10} more" if len(s["missing"]) > 10 else ""
            lines.append(f"missing:  {shown}{more} (rerun the same command to finish)")
        if info.get("input"):
            fmt = f" ({info['input_format']})" if info.get("input_format") else ""
            lines.append(f"input:    {info['input']}{fmt}")
        listing = info.get("listing")
        if listing:
            unit = {"webdataset": "tars", "parquet": "rows"}.get(info.get("input_format") or "",
                                                                   "files")
            lines.append(f"listing:  {listing['entries']} {unit} planned"
                         + ("" if listing["finished"] else
                            ", NOT finished: rerun the same command to go on listing"))
    if "rows" in info:
        lines.append(f"rows:     {info['rows']}, {info['errors']} unreadable")
    for key in ("labels", "predictions"):
        if info.get(key):
            counts = ", ".join(f"{k}: {v}" for k, v in info[key].items())
            lines.append(f"{key + ':':<9} {counts}")
    if info["kind"] == "model":
        lines.append(f"classes:  {', '.join(info['classes'])}")
        m = info["metrics"]
        if m.get("val_accuracy") is not None:
            lines.append(f"metrics:  val_accuracy {m['val_accuracy']:.4f}, val_loss "
                         f"{m['val_loss']:.4f} on {m.get('validation_rows')} rows")
        if info["missing_files"]:
            lines.append(f"missing:  {', '.join(info['missing_files'])}")
    if info.get("settings"):
        lines.append("settings: " + json.dumps(info["settings"], sort_keys=True))
    lines.append(f"size:     {_human(info['bytes'])}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
