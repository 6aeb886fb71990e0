"""Classify new images with MODEL_DIR/classifier.keras on Ray actors.

Reading, decoding and error handling are extract's own (`extractor.ShardImages`), so a file that extract reports as unreadable is reported here too.
With --output, each finished shard is committed to a staging folder beside the output
(`_<name>.parts/`), so a killed run resumes; the final file is assembled from them at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .extractor import ShardImages, prepare_worker
from .images import DecodeOptions
from .planning import (Entry, Shard, committed_shards, listing_digest, make_entries, part_name,
                       plan_remaining, plan_shards)
from .storage import Storage, with_retries


class PredictUsageError(ValueError):
    """Bad arguments, a missing INPUT or MODEL_DIR: exit code 2 before any work."""


@dataclass
class PredictOptions:
    model_dir: str
    input: str
    output: str | None = None
    top_k: int = 1
    batch_size: int = 32
    shard_size: int = 256
    actors: int | None = None
    gpus_per_actor: float | None = None
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    max_attempts: int = 3
    progress: bool = True


@dataclass(frozen=True)
class PredictConfig:
    model_dir: str
    batch_size: int
    top_k: int
    decode: DecodeOptions
    threads: int | None = None
    decode_threads: int = 2
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    credentials: Any = None  # distribute.Credentials, restored in the worker


@dataclass
class PredictResult:
    index: int
    rows: int
    errors: int
    table: Any  # pa.Table of predictions
    error_rows: list[tuple[str, str]]


def prediction_schema(top_k: int) -> pa.Schema:
    fields = [("path", pa.string()), ("prediction", pa.string()), ("probability", pa.float32())]
    if top_k > 1:
        fields += [("top_k_labels", pa.list_(pa.string(), top_k)),
                   ("top_k_probabilities", pa.list_(pa.float32(), top_k))]
    return pa.schema(fields)


def model_settings(model_dir: Storage) -> tuple[list[str], dict[str, Any]]:
    """classes.json and the feature settings of a trained MODEL_DIR."""
    return model_dir.read_json("classes.json"), model_dir.read_json("features.json")["settings"]


class Predictor:
    """Holds the classifier; turns a shard of images into a table of predictions."""

    def __init__(self, config: PredictConfig):
        from .head import load_model
        from .model import BatchRunner

        prepare_worker(config.credentials, config.threads)
        self.config = config
        self.options = dict(config.storage_options)
        store = Storage(config.model_dir, self.options)
        self.classes, _ = model_settings(store)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "classifier.keras")
            with open(local, "wb") as f:
                f.write(store.read_bytes(store.path("classifier.keras")))
            model = load_model(local)
        self.run_model = BatchRunner(model, config.batch_size)
        self.images = ShardImages(self.options, config.decode, config.batch_size,
                                  config.decode_threads)

    def process_shard(self, shard: Shard, progress: Any = None) -> PredictResult:
        k = min(self.config.top_k, len(self.classes))
        cols: dict[str, list] = {n: [] for n in prediction_schema(k).names}
        errors: list[tuple[str, str]] = []

        def on_error(e: Entry, reason: str) -> None:
            errors.append((e.url, reason))

        for entries, pixels in self.images.batches(shard.entries, on_error):
            probs = self.run_model(pixels)
            order = np.argsort(-probs, axis=1)[:, :k]
            cols["path"] += [e.url for e in entries]
            cols["prediction"] += [self.classes[i] for i in order[:, 0]]
            cols["probability"] += [float(p[i]) for p, i in zip(probs, order[:, 0])]
            if k > 1:
                cols["top_k_labels"] += [[self.classes[i] for i in row] for row in order]
                cols["top_k_probabilities"] += [[float(p[i]) for i in row]
                                                for p, row in zip(probs, order)]
            if progress:
                progress(shard.index, len(cols["path"]) + len(errors), len(errors))
        table = pa.table(cols, schema=prediction_schema(k))
        return PredictResult(shard.index, table.num_rows, len(errors), table, errors)


class PredictorActor(Predictor):
    def __init__(self, config: PredictConfig, tracker: Any):
        super().__init__(config)
        self.tracker = tracker

    def process_shard(self, shard: Shard, progress: Any = None) -> PredictResult:
        return super().process_shard(
            shard, lambda i, d, e: self.tracker.update.remote(i, d, e))


def list_predict_inputs(source: Storage) -> list[Entry]:
    """A folder (every file under it) or a single image file."""
    from .listing import list_inputs

    if with_retries(lambda: source.fs.isfile(source.root)):
        parent = source.root.rsplit("/", 1)[0]
        return make_entries(parent, [source.root], source.to_url)
    return list_inputs(source)


def _staging(output: str, options: dict[str, Any]) -> tuple[Storage, Storage, str]:
    parent_url, _, name = output.rstrip("/").rpartition("/")
    parent = Storage(parent_url or ".", options)
    return parent, parent.child(f"_{name}.parts"), name


def check_predict(o: PredictOptions) -> tuple[Storage, Storage, list[str], dict[str, Any]]:
    if o.top_k < 1:
        raise PredictUsageError(f"--top-k must be at least 1, not {o.top_k}")
    for name, v in (("--batch-size", o.batch_size), ("--shard-size", o.shard_size),
                    ("--actors", o.actors), ("--max-attempts", o.max_attempts)):
        if v is not None and v <= 0:
            raise PredictUsageError(f"{name} must be positive, not {v}")
    model_dir = Storage(o.model_dir, o.storage_options)
    missing = [n for n in ("classifier.keras", "classes.json", "features.json")
               if not model_dir.exists(n)]
    if missing:
        raise PredictUsageError(f"MODEL_DIR {model_dir.url} lacks {', '.join(missing)}: "
                                "train one with `bottleneck train`")
    source = Storage(o.input, o.storage_options)
    if not source.fs.exists(source.root):
        raise PredictUsageError(f"INPUT does not exist: {source.url}")
    if o.output:
        if not o.output.endswith(".parquet"):
            raise PredictUsageError(f"--output must name a .parquet file, not {o.output}")
        parent, _, _ = _staging(o.output, o.storage_options)
        if parent.protocol == source.protocol and (parent.root + "/").startswith(source.root + "/"):
            # A rerun would list the output and its staging folder as images.
            raise PredictUsageError(f"--output {o.output} must not be inside INPUT {source.url}")
        try:
            parent.check_writable()
        except Exception as e:  # noqa: BLE001
            raise PredictUsageError(f"--output is not writable: {o.output}: {e}") from None
    classes, settings = model_settings(model_dir)
    return model_dir, source, classes, settings


@dataclass
class PredictSummary:
    rows: int
    errors: list[tuple[str, str]]
    failed: dict[int, str]
    table: Any | None  # all predictions, when there is no --output
    output: str | None
    seconds: float
    shards_skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def run_predict(o: PredictOptions) -> PredictSummary:
    import ray

    from .distribute import Credentials, ShardPool, choose_layout, cluster_size, connect, worker_env
    from .progress import ProgressBar
    from .writer import ERRORS_DIR, write_errors

    t0 = time.perf_counter()
    model_dir, source, classes, settings = check_predict(o)
    with ThreadPoolExecutor(1) as ex:
        listing = ex.submit(list_predict_inputs, source)
        connect(o.address)
        entries = listing.result()
    if not entries:
        raise PredictUsageError(f"INPUT has no files: {source.url}")
    shards = plan_shards(entries, o.shard_size)
    staged: Storage | None = None
    if o.output:
        _, staged, _ = _staging(o.output, o.storage_options)
        _prepare_staging(staged, {"input": source.url, "listing_sha256": listing_digest(entries),
                                  "shard_size": o.shard_size, "top_k": o.top_k,
                                  "model_dir": model_dir.url})
    done = committed_shards(staged.ls_names()) if staged else set()
    todo = plan_remaining(shards, done)
    decode = DecodeOptions(settings["image_size"], settings["interpolation"],
                           settings.get("jpeg_draft", False))
    tables: dict[int, Any] = {}
    errors: list[tuple[str, str]] = []

    def on_result(r: PredictResult) -> None:
        errors.extend(r.error_rows)
        if staged is not None:
            write_errors(staged, r.index, r.error_rows)
            if not r.error_rows:  # an earlier, killed attempt may have left one
                staged.rm(ERRORS_DIR, part_name(r.index))
            with staged.open_atomic(part_name(r.index)) as f:
                pq.write_table(r.table, f)
        else:
            tables[r.index] = r.table

    outcome = None
    if todo:
        cpus, gpus = cluster_size()
        layout = choose_layout(cpus, gpus, o.actors, o.gpus_per_actor)
        config = PredictConfig(model_dir.url, o.batch_size, o.top_k, decode, layout.threads,
                               layout.decode_threads, tuple(sorted(o.storage_options.items())),
                               Credentials())
        remote_cls = ray.remote(PredictorActor).options(
            num_cpus=layout.num_cpus, num_gpus=layout.num_gpus, max_restarts=0,
            runtime_env={"env_vars": worker_env()})
        pool = ShardPool(lambda tracker: remote_cls.remote(config, tracker),
                         min(layout.actors, len(todo)), max_attempts=o.max_attempts)
        with ProgressBar(sum(len(s) for s in todo), enabled=o.progress, desc="predict") as bar:
            try:
                outcome = pool.run(todo, on_progress=bar.update, on_result=on_result)
            finally:
                pool.shutdown()
    failed = dict(outcome.failed) if outcome else {}
    table = None
    rows = 0
    if staged is not None:
        errors.extend(_read_errors(staged, sorted(done)))
        if not failed:
            rows = _assemble(o.output, staged, len(shards), o.storage_options)
    else:
        table = pa.concat_tables([tables[i] for i in sorted(tables)]) if tables else None
        rows = table.num_rows if table is not None else 0
    return PredictSummary(rows, sorted(errors), failed, table, o.output,
                          time.perf_counter() - t0, len(done))


def _read_errors(staged: Storage, indexes: list[int]) -> list[tuple[str, str]]:
    """The staged error rows of these shards (one listing of _errors/ for all of them)."""
    from .writer import ERRORS_DIR

    present = set(staged.ls_names(ERRORS_DIR))
    rows: list[tuple[str, str]] = []
    for i in indexes:
        if part_name(i) in present:
            t = _read_table(staged, staged.path(ERRORS_DIR, part_name(i)))
            rows += zip(t.column("path").to_pylist(), t.column("error").to_pylist())
    return rows


def _read_table(store: Storage, path: str) -> Any:
    with store.fs.open(path, "rb") as f:
        return pq.read_table(f)


def _prepare_staging(staged: Storage, plan: dict[str, Any]) -> None:
    """Resume staged shards only if they were made by the same plan; otherwise start over
    (other INPUT files, shard size, --top-k or model would mix rows)."""
    try:
        same = staged.exists("_plan.json") and staged.read_json("_plan.json") == plan
    except ValueError:
        same = False
    if not same:
        staged.rm(recursive=True)
    staged.makedirs()
    staged.write_json_atomic(plan, "_plan.json")


def _assemble(output: str, staged: Storage, n_shards: int, options: dict[str, Any]) -> int:
    """Concatenate the staged shard files into OUTPUT (atomically), then drop the staging."""
    parent, _, name = _staging(output, options)
    rows = 0
    writer = None
    with parent.open_atomic(name) as f:
        for i in range(n_shards):
            t = _read_table(staged, staged.path(part_name(i)))
            if writer is None:
                writer = pq.ParquetWriter(f, t.schema)
            writer.write_table(t)
            rows += t.num_rows
        if writer is not None:
            writer.close()
    errs = _read_errors(staged, list(range(n_shards)))
    if errs:
        from .schema import ERRORS_SCHEMA

        t = pa.table({"path": [p for p, _ in errs], "error": [e for _, e in errs]},
                     schema=ERRORS_SCHEMA)
        with parent.open_atomic(name.removesuffix(".parquet") + ".errors.parquet") as f:
            pq.write_table(t, f)
    staged.rm(recursive=True)
    _remove_empty_spool(parent)
    return rows


def _remove_empty_spool(parent: Storage) -> None:
    """On a local disk, open_atomic leaves an empty `_tmp/` folder beside OUTPUT: remove it
    only when empty, since a `_tmp/` there may be the user's own. Buckets have no folders,
    and open_atomic already removed its own objects."""
    if parent.is_local:
        try:
            os.rmdir(parent.path("_tmp"))
        except OSError:  # absent, or not empty: not ours to remove
            pass


def format_table(table: Any, limit: int = 50) -> str:
    """path, prediction and probability as aligned text (the first `limit` rows)."""
    rows = table.slice(0, limit).to_pylist()
    width = min(max((len(r["path"]) for r in rows), default=4), 80)
    lines = [f"{'path':<{width}}  {'prediction':<16} probability"]
    for r in rows:
        p = r["path"] if len(r["path"]) <= width else "…" + r["path"][-(width - 1):]
        lines.append(f"{p:<{width}}  {r['prediction']:<16} {r['probability']:.4f}")
    if table.num_rows > limit:
        lines.append(f"… and {table.num_rows - limit} more (use --output to save them all)")
    return "\n".join(lines)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
