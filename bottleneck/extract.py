"""The extraction job's driver: list → plan → actors → commit → marker.

`check_extract` validates everything it can without Ray (bad arguments fail before any
work starts); `run_extract` does the job and returns its summary.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from .extractor import ExtractConfig, Extractor, ShardResult
from .images import DecodeOptions
from .listing import list_inputs
from .manifest import SUCCESS, Manifest, OutputLock, check_resumable, prepare_output
from .model import PRECISIONS, WeightsSpec, resolve_weights
from .planning import committed_shards, labels_of, listing_digest, part_name, plan_remaining, plan_shards
from .schema import DTYPES, POOLINGS, FeatureSettings
from .storage import Storage, redact


class UsageError(ValueError):
    """A bad argument, a missing INPUT, an unwritable OUTPUT: exit code 2, before any work."""


@dataclass
class ExtractOptions:
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
    address: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    overwrite: bool = False
    jpeg_draft: bool = False
    precision: str = "float32"
    xla: bool = False
    max_attempts: int = 3
    progress: bool = True


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
                "steady_img_per_s": round(steady, 3) if steady else None}

    def lines(self) -> list[str]:
        rate = self.timing()["img_per_s"]
        out = [
            f"output:  {self.output}",
            f"images:  {self.images} listed, {self.rows} rows written, {self.errors} unreadable "
            f"(see _errors/)",
            f"shards:  {self.shards} in all, {self.shards_run} run now, {self.shards_skipped} "
            f"already done, {self.retries} retried",
            f"time:    {self.seconds:.1f}s" + (f" ({rate:.1f} img/s over this run)" if rate else ""),
        ]
        if self.layout:
            out.append(f"workers: {self.layout}")
        if self.failed:
            out.append(f"FAILED:  {len(self.failed)} shard(s) could not be written; rerun the "
                       "same command to retry them:")
            out += [f"  {part_name(i)}: {err}" for i, err in sorted(self.failed.items())]
        return out


@dataclass
class CheckedExtract:
    options: ExtractOptions
    source: Storage
    out: Storage
    weights: WeightsSpec
    settings: FeatureSettings


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise UsageError(f"{name} must be positive, not {value}")


def check_extract(o: ExtractOptions) -> CheckedExtract:
    """Everything that can be checked before Ray starts. Raises UsageError."""
    if o.image_size < 32:
        raise UsageError(f"--image-size must be at least 32 (VGG16's five poolings), not {o.image_size}")
    for name, v in (("--batch-size", o.batch_size), ("--shard-size", o.shard_size),
                    ("--actors", o.actors), ("--gpus-per-actor", o.gpus_per_actor),
                    ("--threads", o.threads), ("--max-attempts", o.max_attempts)):
        _positive(name, v)
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
    try:
        source = Storage(o.input, o.storage_options)
        out = Storage(o.output, o.storage_options)
    except (ValueError, ImportError) as e:
        raise UsageError(f"cannot open storage: {e}") from None
    try:
        exists = source.fs.exists(source.root)
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, DNS…
        raise UsageError(f"cannot reach INPUT {source.url}: {e}") from None
    if not exists:
        raise UsageError(f"INPUT does not exist: {source.url}")
    if not source.fs.isdir(source.root):
        raise UsageError(f"INPUT must be a folder or bucket prefix: {source.url}")
    if out.protocol == source.protocol and (out.root + "/").startswith(source.root + "/"):
        raise UsageError(f"OUTPUT {out.url} must not be inside INPUT {source.url}")
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
    if not o.overwrite:  # OutputConflict now, not after Ray has started
        check_resumable(out, "features", settings.to_dict(), source.url, o.shard_size)
    return CheckedExtract(o, source, out, weights, settings)


# Test hook, used by tests/test_fault_tolerance.py only: shard numbers whose worker process
# dies (os._exit) every time it starts them, standing in for an input that crashes a native
# decoder, which cannot be made on purpose. Unset in normal use.
CRASH_SHARDS_ENV = "BOTTLENECK_TEST_CRASH_SHARDS"


class ExtractorActor(Extractor):
    """The Ray actor: an Extractor that reports progress to the driver's tracker."""

    def __init__(self, config: ExtractConfig, tracker: Any):
        super().__init__(config)
        self.tracker = tracker
        self.crash_shards = {int(i) for i in os.environ.get(CRASH_SHARDS_ENV, "").split(",") if i}

    def process_shard(self, shard: Any, labels: tuple[str, ...] = (),
                      progress: Any = None) -> ShardResult:
        import ray

        if shard.index in self.crash_shards:
            os._exit(1)

        def report(index: int, done: int, errors: int) -> None:
            self.tracker.update.remote(index, done, errors)
        result = super().process_shard(shard, labels, report)
        result.worker = ray.get_runtime_context().get_actor_id() or ""
        result.gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        return result


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_extract(o: ExtractOptions, checked: CheckedExtract | None = None) -> ExtractSummary:
    """Run the whole job (Ray started or joined as --address says). See the module doc.

    Start-up is overlapped: the lock is taken first (a second job is refused before it
    starts Ray), then OUTPUT is listed while Ray starts and the actors load their model.
    """
    import ray

    from .distribute import Credentials, ShardPool, choose_layout, cluster_size, connect, worker_env
    from .progress import ProgressBar

    c = checked or check_extract(o)
    t0 = time.perf_counter()
    with OutputLock(c.out):
        # List while Ray starts and the actors load the conv base: none needs the others.
        # (Ray must start on the main thread, which owns the signal handlers.)
        with ThreadPoolExecutor(1) as ex:
            listing = ex.submit(list_inputs, c.source)
            where = connect(o.address)
            cpus, gpus = cluster_size()
            layout = choose_layout(cpus, gpus, o.actors, o.gpus_per_actor)
            if o.threads:
                layout = replace(layout, threads=o.threads)
            config = ExtractConfig(
                settings=c.settings, weights=c.weights, output_url=c.out.url,
                batch_size=o.batch_size, threads=layout.threads,
                decode_threads=layout.decode_threads,
                input_options=tuple(sorted(o.storage_options.items())),
                output_options=tuple(sorted(o.storage_options.items())), xla=o.xla,
                credentials=Credentials())
            remote_cls = ray.remote(ExtractorActor).options(
                num_cpus=layout.num_cpus, num_gpus=layout.num_gpus, max_restarts=0,
                runtime_env={"env_vars": worker_env()})
            pool = ShardPool(lambda tracker: remote_cls.remote(config, tracker), layout.actors,
                             max_attempts=o.max_attempts)
            try:
                entries = listing.result()
            except BaseException:
                pool.shutdown()
                raise
        try:
            summary = _run_planned(c, o, pool, entries, where, layout.describe(), t0, ProgressBar)
        finally:
            pool.shutdown()
    return summary


def _run_planned(c: CheckedExtract, o: ExtractOptions, pool: Any, entries: list, where: str,
                 layout_text: str, t0: float, progress_bar: Any) -> ExtractSummary:
    if not entries:
        raise UsageError(f"INPUT has no files: {c.source.url}")
    shards = plan_shards(entries, o.shard_size)
    labels = tuple(labels_of(entries))
    manifest = Manifest(kind="features", settings=c.settings.to_dict(), input_url=c.source.url,
                        listing_sha256=listing_digest(entries), images=len(entries),
                        shard_size=o.shard_size, shards=len(shards))
    prepare_output(c.out, manifest, o.overwrite)
    done = committed_shards(c.out.ls_names())
    todo = plan_remaining(shards, done)
    _log(f"bottleneck extract: {len(entries)} files, {len(labels)} labels, {len(shards)} "
         f"shards of {o.shard_size}; {len(done)} already done; on {where}")
    outcome = None
    if todo:
        _log(f"workers: {layout_text}")
        pool.call_args = (labels,)
        with progress_bar(sum(len(s) for s in todo), enabled=o.progress) as bar:
            outcome = pool.run(todo, on_progress=bar.update)
    summary = _summarize(c, o, entries, shards, done, outcome, time.perf_counter() - t0,
                         layout_text if todo else "")
    if summary.ok:
        c.out.write_json_atomic({
            "images": summary.images, "rows": summary.rows, "errors": summary.errors,
            "shards": summary.shards, "settings": c.settings.to_dict(),
            "input": c.source.url, "storage_options": redact(o.storage_options),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timing": summary.timing(),
        }, SUCCESS)
    return summary


def _summarize(c: CheckedExtract, o: ExtractOptions, entries: list, shards: list, done: set[int],
               outcome: Any, seconds: float, layout: str) -> ExtractSummary:
    """Counts for the whole OUTPUT, read from the part and error files' footers."""
    from .reader import count_rows

    rows, errors = count_rows(c.out)
    return ExtractSummary(
        output=c.out.url, images=len(entries), rows=rows, errors=errors, shards=len(shards),
        shards_run=len(outcome.results) if outcome else 0, shards_skipped=len(done),
        failed=dict(outcome.failed) if outcome else {}, retries=outcome.retries if outcome else 0,
        seconds=seconds, layout=layout, results=list(outcome.results) if outcome else [])
