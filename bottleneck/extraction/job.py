"""The extraction job: INPUT images → Parquet bottleneck features in OUTPUT.

`check_extract` validates everything it can without Ray (bad arguments fail before any
work starts); `run_extract` hands the job to the runner and writes `_SUCCESS.json` when
every shard is committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ..errors import UsageError, require_positive
from ..images import DecodeOptions
from ..inputs import InputOptions, Source, open_source
from ..model import PRECISIONS, WeightsSpec, resolve_weights
from ..runner.job import RunOutcome, ShardedJob, preflight, run_options, run_sharded
from ..runner.manifest import SUCCESS
from ..runner.output import ShardResult, count_labels, count_rows
from ..runner.planning import part_name
from ..runner.pool import check_address
from ..schema import DTYPES, POOLINGS, FeatureSettings
from ..storage import Storage, redact
from .extractor import ExtractConfig, Extractor


@dataclass
class ExtractOptions(InputOptions):
    input: str
    output: str
    weights: str = "imagenet"
    image_size: int = 224
    interpolation: str = "bilinear"
    pooling: str = "none"
    dtype: str = "float32"
    batch_size: int = 32
    shard_size: int = 256
    actors: int | None = None
    gpus_per_actor: float | None = None
    threads: int | None = None
    decode_workers: int | None = None
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    overwrite: bool = False
    jpeg_draft: bool = False
    precision: str = "float32"
    max_attempts: int = 3
    progress: bool = True


STARTUP_WORDS = {"ray": "Ray", "tensorflow_import": "TensorFlow import",
                 "worker_build": "model build", "first_batch": "first batch (tracing)",
                 "first_shard": "first shard done at"}


@dataclass
class ExtractSummary:
    output: str
    images: int
    rows: int
    errors: int
    shards: int
    shards_run: int
    shards_skipped: int
    failed: dict[int, str]
    retries: int
    seconds: float
    layout: str = ""
    listed: str = ""  # what a plan entry is when not an image (" tars")
    startup: dict[str, float] = field(default_factory=dict)  # RunOutcome.startup
    results: list[ShardResult] = field(default_factory=list)  # the shards run now

    @property
    def ok(self) -> bool:
        return not self.failed

    def timing(self) -> dict[str, float | None]:
        """Whole-run and steady-state rates of the shards run now.

        Steady state: images over the time actors spent inside shards, leaving out each
        actor's first shard (it traces the graph and fills the decode pipeline) when that
        actor ran more than one, summed over actors running side by side.
        """
        images = sum(r.rows + r.errors for r in self.results)
        by_worker: dict[str, list[ShardResult]] = {}
        for r in self.results:  # in completion order: an actor's first shard comes first
            by_worker.setdefault(r.worker, []).append(r)
        steady = 0.0
        for runs in by_worker.values():
            warm = runs[1:] or runs
            busy = sum(r.seconds.get("total", 0.0) for r in warm)
            if busy > 0:
                steady += sum(r.rows + r.errors for r in warm) / busy
        return {"seconds": round(self.seconds, 3), "images_this_run": images,
                "img_per_s": round(images / self.seconds, 3) if images else None,
                "steady_img_per_s": round(steady, 3) if steady else None,
                "startup_s": {k: round(v, 3) for k, v in self.startup.items()}}

    def lines(self) -> list[str]:
        rate = self.timing()["img_per_s"]
        out = [
            f"output:  {self.output}",
            f"images:  {self.images}{self.listed} listed, {self.rows} rows written, "
            f"{self.errors} unreadable (see _errors/)",
            f"shards:  {self.shards} in all, {self.shards_run} run now, {self.shards_skipped} "
            f"already done, {self.retries} retried",
            f"time:    {self.seconds:.1f}s"
            + (f" ({rate:.1f} img/s over this run)" if rate else ""),
        ]
        if self.layout:
            out.append(f"workers: {self.layout}")
        if self.startup:
            out.append("start-up: " + ", ".join(
                f"{STARTUP_WORDS.get(k, k)} {v:.1f}s" for k, v in self.startup.items()))
        if self.failed:
            out.append(f"FAILED:  {len(self.failed)} shard(s) could not be written; rerun the "
                       "same command to retry them:")
            out += [f"  {part_name(i)}: {err}" for i, err in sorted(self.failed.items())]
        return out


@dataclass
class CheckedExtract:
    options: ExtractOptions
    source: Source
    out: Storage
    weights: WeightsSpec
    settings: FeatureSettings


def check_extract(o: ExtractOptions) -> CheckedExtract:
    """Everything that can be checked before Ray starts. Raises UsageError."""
    check_address(o.address)
    if o.image_size < 32:
        raise UsageError("--image-size must be at least 32 (VGG16's five poolings), "
                         f"not {o.image_size}")
    require_positive(batch_size=o.batch_size, shard_size=o.shard_size, actors=o.actors,
                     gpus_per_actor=o.gpus_per_actor, threads=o.threads,
                     max_attempts=o.max_attempts)
    if o.pooling not in POOLINGS:
        raise UsageError(f"--pooling must be one of {', '.join(POOLINGS)}, not {o.pooling!r}")
    if o.dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {o.dtype!r}")
    if o.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {o.precision!r}")
    try:
        DecodeOptions(o.image_size, o.interpolation)
    except ValueError as e:
        raise UsageError(f"--interpolation: {e}") from None
    source, out = open_source(o.input, o.output, o.storage_options, o)
    try:
        weights = resolve_weights(o.weights, o.storage_options)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UsageError(f"--weights: {e}") from None
    # Last, since it creates OUTPUT: a command refused for any other reason leaves no trace.
    try:
        out.check_writable()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"OUTPUT is not writable: {out.url}: {e}") from None
    settings = FeatureSettings(weights=weights.identity, image_size=o.image_size,
                               interpolation=o.interpolation, pooling=o.pooling, dtype=o.dtype,
                               jpeg_draft=o.jpeg_draft, precision=o.precision)
    checked = CheckedExtract(o, source, out, weights, settings)
    preflight(extract_job(checked), run_options(o))
    return checked


def extract_job(c: CheckedExtract, stand_in: Any = None) -> ShardedJob:
    """The runner's job; `stand_in`: recorded conv-base outputs replayed in place of the
    conv base (the pipeline-ceiling benchmark's, never a user's option)."""
    o = c.options

    def config(layout: Any) -> ExtractConfig:
        return ExtractConfig(
            settings=c.settings, weights=c.weights, output_url=c.out.url,
            batch_size=o.batch_size, threads=layout.threads,
            decode_threads=layout.decode_threads, reader=c.source.reader,
            storage_options=tuple(sorted(o.storage_options.items())), stand_in=stand_in)

    return ShardedJob(name="extract", kind="features", source=c.source,
                      make_worker=lambda layout: partial(Extractor, config(layout)),
                      make_images=lambda layout: config(layout).images, output=c.out,
                      settings=c.settings.to_dict(), shard_size=o.shard_size)


def run_extract(o: ExtractOptions, checked: CheckedExtract | None = None,
                stand_in: Any = None) -> ExtractSummary:
    """Run the whole job (Ray started or joined as --address says) and return its summary.
    Raises UsageError before any work for bad arguments, a missing INPUT or a conflict.
    `stand_in`: see `extract_job` (benchmarks only)."""
    c = checked or check_extract(o)
    finished: list[ExtractSummary] = []

    def mark_done(run: RunOutcome) -> None:
        summary = _summarize(c, run)
        finished.append(summary)
        tars = c.source.entries_per_shard is not None
        c.out.write_json_atomic({
            # A WebDataset plan counts tars: the images are the rows read, good or not.
            "images": summary.rows + summary.errors if tars else summary.images,
            **({"tars": summary.images} if tars else {}),
            "rows": summary.rows, "errors": summary.errors,
            "shards": summary.shards,
            # A plan of tars knows no labels: they are counted in the part files then.
            "labels": (count_labels(c.out) if tars and summary.rows else run.labels),
            "settings": c.settings.to_dict(),
            "input": c.source.url, "input_format": c.source.format,
            "storage_options": redact(o.storage_options),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timing": summary.timing(),
        }, SUCCESS)

    run = run_sharded(extract_job(c, stand_in), run_options(o), finish=mark_done)
    summary = finished[0] if finished else _summarize(c, run)
    summary.seconds = run.seconds
    return summary


def _summarize(c: CheckedExtract, run: RunOutcome) -> ExtractSummary:
    """Counts for the whole OUTPUT, read from the part and error files' footers."""
    rows, errors = count_rows(c.out)
    return ExtractSummary(
        output=c.out.url, images=run.entries, rows=rows, errors=errors, shards=run.shards,
        listed="" if c.source.entries_per_shard is None else " tars", startup=run.startup,
        shards_run=len(run.results), shards_skipped=len(run.done_before), failed=run.failed,
        retries=run.retries, seconds=run.seconds, layout=run.layout, results=run.results)
