"""The prediction job: classify the images of INPUT with MODEL_DIR's classifier.

With --output, each shard is committed to a staging folder beside the output
(`_<name>.parts/`, with the runner's lock and manifest), so a killed run resumes; the final
file is assembled from the parts at the end. Without it, each shard's predictions go to the
caller as they finish, and none are held.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError, require_positive
from ..images import DecodeOptions
from ..inputs import InputOptions, Source, open_source
from ..runner.job import ShardedJob, preflight, run_options, run_sharded
from ..runner.output import read_errors, read_table
from ..runner.planning import part_name
from ..runner.pool import check_address
from ..schema import ERRORS_SCHEMA
from ..storage import Storage
from ..training.head import read_model_info
from .predictor import PredictConfig, Predictor


@dataclass
class PredictOptions(InputOptions):
    model_dir: str
    input: str
    output: str | None = None
    top_k: int = 1
    batch_size: int = 32
    shard_size: int = 256
    actors: int | None = None
    gpus_per_actor: float | None = None
    decode_workers: int | None = None
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    max_attempts: int = 3
    progress: bool = True


@dataclass
class CheckedPredict:
    options: PredictOptions
    model_dir: Storage
    source: Source
    settings: dict[str, Any]  # the feature settings the model was trained on
    parent: Storage | None  # the folder of --output
    staged: Storage | None  # its staging folder


@dataclass
class PredictSummary:
    rows: int
    errors: list[tuple[str, str]]
    failed: dict[int, str]
    output: str | None
    seconds: float
    shards_skipped: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def _output_name(output: str) -> str:
    return output.rstrip("/").rpartition("/")[2]


def check_predict(o: PredictOptions) -> CheckedPredict:
    """Everything that can be checked before Ray starts. Raises UsageError."""
    check_address(o.address)
    if o.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, not {o.top_k}")
    require_positive(batch_size=o.batch_size, shard_size=o.shard_size, actors=o.actors,
                     gpus_per_actor=o.gpus_per_actor, max_attempts=o.max_attempts)
    model_dir = Storage(o.model_dir, o.storage_options)
    _, settings = read_model_info(model_dir)  # names a missing classes.json or features.json
    if not model_dir.exists("classifier.keras"):
        raise UsageError(f"MODEL_DIR {model_dir.url} lacks classifier.keras: train one with "
                         "`bottleneck train`")
    parent = staged = None
    if o.output:
        if not o.output.endswith(".parquet"):
            raise UsageError(f"--output must name a .parquet file, not {o.output}")
        parent_url = o.output.rstrip("/").rpartition("/")[0] or "."
        source, parent = open_source(o.input, parent_url, o.storage_options, o, allow_file=True)
        try:
            parent.check_writable()
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--output is not writable: {o.output}: {e}") from None
        staged = parent.child(f"_{_output_name(o.output)}.parts")
    else:
        source, _ = open_source(o.input, None, o.storage_options, o, allow_file=True)
    checked = CheckedPredict(o, model_dir, source, settings, parent, staged)
    preflight(predict_job(checked), run_options(o))
    return checked


def predict_job(c: CheckedPredict) -> ShardedJob:
    o = c.options
    s = c.settings
    decode = DecodeOptions(s["image_size"], s["interpolation"], s.get("jpeg_draft", False))

    def config(layout: Any) -> PredictConfig:
        return PredictConfig(
            c.model_dir.url, o.batch_size, o.top_k, decode,
            staging_url=c.staged.url if c.staged else None, threads=layout.threads,
            decode_threads=layout.decode_threads, reader=c.source.reader,
            storage_options=tuple(sorted(o.storage_options.items())))

    return ShardedJob(name="predict", kind="predictions", source=c.source,
                      make_worker=lambda layout: partial(Predictor, config(layout)),
                      make_images=lambda layout: config(layout).images, output=c.staged,
                      settings={"model_dir": c.model_dir.url, "top_k": o.top_k, **s},
                      shard_size=o.shard_size, replace_on_mismatch=True)


def run_predict(o: PredictOptions, on_table: Callable[[pa.Table], None] | None = None
                ) -> PredictSummary:
    """Classify INPUT. With `o.output`, write every prediction there (resumable); without,
    hand each shard's table to `on_table` as it finishes. Raises UsageError before any work
    for bad arguments."""
    c = check_predict(o)
    errors: list[tuple[str, str]] = []
    rows = 0

    def on_result(r: Any) -> None:
        nonlocal rows
        if c.staged is None:
            errors.extend(r.error_rows)
            rows += r.rows
            if on_table is not None and r.table.num_rows:
                on_table(r.table)

    def assemble(run: Any) -> None:
        nonlocal rows, errors
        if c.staged is not None and c.parent is not None:
            errors = read_errors(c.staged)
            rows = _assemble(c.parent, _output_name(o.output or ""), c.staged, run.shards,
                             errors)

    run = run_sharded(predict_job(c), run_options(o), on_result=on_result, finish=assemble)
    if c.staged is not None:
        if run.ok:  # assembled: the staging folder (and the lock in it) is done with
            c.staged.rm(recursive=True)
        else:
            errors = read_errors(c.staged)
    return PredictSummary(rows, sorted(errors), run.failed, o.output, run.seconds,
                          len(run.done_before))


def _assemble(parent: Storage, name: str, staged: Storage, n_shards: int,
              errors: list[tuple[str, str]]) -> int:
    """Concatenate the staged shard files into OUTPUT (atomically) and write `errors`
    beside it. Returns the rows written."""
    rows = 0
    writer = None
    with parent.open_atomic(name) as f:
        for i in range(n_shards):
            t = read_table(staged, staged.path(part_name(i)))
            if writer is None:
                writer = pq.ParquetWriter(f, t.schema)
            writer.write_table(t)
            rows += t.num_rows
        if writer is not None:
            writer.close()
    errors_name = name.removesuffix(".parquet") + ".errors.parquet"
    if errors:
        t = pa.table({"path": [p for p, _ in errors], "error": [e for _, e in errors]},
                     schema=ERRORS_SCHEMA)
        with parent.open_atomic(errors_name) as f:
            pq.write_table(t, f)
    else:  # an earlier run's errors file would describe other images
        parent.rm(errors_name)
    _remove_empty_spool(parent)
    return rows


def _remove_empty_spool(parent: Storage) -> None:
    """On a local disk, open_atomic leaves an empty `_tmp/` folder beside OUTPUT: remove it
    only when empty, since a `_tmp/` there may be the user's own."""
    if parent.is_local:
        try:
            os.rmdir(parent.path("_tmp"))
        except OSError:  # absent, or not empty: not ours to remove
            pass


def format_rows(table: pa.Table, width: int = 80) -> list[str]:
    """path, prediction and probability as aligned text lines, long paths cut from the left."""
    lines = []
    for r in table.to_pylist():
        p = r["path"] if len(r["path"]) <= width else "…" + r["path"][-(width - 1):]
        lines.append(f"{p:<{width}}  {r['prediction']:<16} {r['probability']:.4f}")
    return lines


def header(width: int = 80) -> str:
    return f"{'path':<{width}}  {'prediction':<16} probability"
