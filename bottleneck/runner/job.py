"""The one runner of every sharded job (extract, predict): lock → manifest → Ray → plan
(listed into OUTPUT as the shards run) ‖ actors → progress → outcome.

A job gives only what is its own (`ShardedJob`): its INPUT (a `Source`), how to build its
per-shard worker, and where its output goes. The runner does the rest, the same way for
every job, and holds no Ray import itself (`pool` does).
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..inputs.source import Source
from ..storage import Storage
from .feed import ShardFeed
from .manifest import Manifest, check_resumable, prepare_output, read_manifest
from .output import ShardResult
from .plan import PLAN_DIR
from .planning import committed_shards

# What a worker's first result says of its start-up (seconds), besides its shard's times.
STARTUP_PARTS = ("tensorflow_import", "worker_build", "first_batch")


@dataclass
class RunOptions:
    """How to run, the same for every job (the CLI's shared options)."""

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    threads: int | None = None
    decode_workers: int | None = None  # None: as `decoding.decode_workers_for` decides
    max_attempts: int = 3
    progress: bool = True
    overwrite: bool = False
    relist: bool = False


def run_options(o: Any) -> RunOptions:
    """The runner's options from a job's own options (extract's, predict's), which carry
    the shared ones under the same names."""
    return RunOptions(**{k: getattr(o, k) for k in RunOptions.__dataclass_fields__
                         if hasattr(o, k)})


@dataclass
class ShardedJob:
    """What a job gives the runner."""

    name: str  # "extract", "predict": what the log and the progress bar say
    kind: str  # what the rows are ("features", "predictions"), recorded in the manifest
    source: Source  # INPUT: listed into the plan as the shards run
    # layout → a picklable callable that builds the per-shard worker inside an actor; the
    # worker's `process_shard(shard, progress=fn)` returns a ShardResult.
    make_worker: Callable[[Any], Callable[[], Any]]
    output: Storage | None  # where manifest, plan, lock and part files go; None: results only
    settings: dict[str, Any]  # what the rows mean; a rerun with others is refused
    shard_size: int
    # With this, an OUTPUT made with other settings is replaced instead of refused (predict's
    # staging folder, which is the job's own).
    replace_on_mismatch: bool = False
    # layout → a picklable callable that builds the job's `images.ShardImages` (reader and
    # decoder) inside a decode worker; None: the job has no decode workers.
    make_images: Callable[[Any], Callable[[], Any]] | None = None

    def __post_init__(self) -> None:
        # A source whose unit holds many images (a tar) fixes its shards: one unit each.
        self.shard_size = self.source.entries_per_shard or self.shard_size

    @property
    def counts_images(self) -> bool:
        """Whether a plan entry is one image (the progress bar's total is then known)."""
        return self.source.entries_per_shard is None

    def manifest(self) -> Manifest:
        return Manifest(kind=self.kind, settings=self.settings, input_url=self.source.url,
                        shard_size=self.shard_size, input_format=self.source.format,
                        input_options=self.source.options)


@dataclass
class RunOutcome:
    """What a run did: the plan, what was done before, and this run's shard results."""

    entries: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # rows planned per label
    shards: int = 0
    done_before: set[int] = field(default_factory=set)
    results: list[ShardResult] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    retries: int = 0
    seconds: float = 0.0
    where: str = ""
    layout: str = ""
    listing: dict[str, Any] = field(default_factory=dict)  # the plan's _listed.json
    # Where start-up went, in seconds: Ray's start or join, then (from the first actor's
    # first result) its TensorFlow import, worker build and first batch (the graph's trace),
    # and when that first shard was done, counted from Ray's start.
    startup: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preflight(job: ShardedJob, options: RunOptions) -> None:
    """Refuse early, before INPUT is listed or Ray starts, to add to an OUTPUT made with other
    settings, another INPUT or another shard size. Raises OutputConflict."""
    if job.output is not None and not options.overwrite and not job.replace_on_mismatch:
        check_resumable(job.output, job.manifest())


def run_sharded(job: ShardedJob, options: RunOptions,
                on_result: Callable[[ShardResult], None] | None = None,
                finish: Callable[[RunOutcome], None] | None = None) -> RunOutcome:
    """Run every shard of `job` that OUTPUT lacks; see the module doc.

    `on_result` sees each shard's result in the driver as it finishes. `finish` runs once
    every shard is done, still under the lock (extract's done-marker, predict's assembly).
    Raises UsageError (an empty INPUT, an OUTPUT conflict, an unreachable Ray address) before
    any shard runs, and lock.LockLost if another job takes OUTPUT over mid-run.
    """
    from .lock import OutputLock

    t0 = time.perf_counter()
    lock = OutputLock(job.output) if job.output is not None else None
    with lock or nullcontext():
        committed = resume_point(job, options.overwrite)
        # Without OUTPUT the plan lives in this process' memory, read the same way.
        plan = (job.output.child(PLAN_DIR) if job.output is not None
                else Storage(f"memory://bottleneck-plan-{uuid.uuid4().hex}"))
        feed = ShardFeed(plan, job.source, job.shard_size, committed, options.relist,
                         guard=lock.check if lock else lambda: None)
        outcome = RunOutcome(done_before=committed)
        try:
            if options.relist:
                feed.start()  # whether it finds anything new decides whether Ray is needed
            # A relist that finds nothing new needs no Ray: wait for its first new shard.
            if feed.nothing_to_do or (options.relist and not feed.has_work()):
                log(f"bottleneck {job.name}: all {feed.state.shards} shards in "
                    f"{job.output.url if job.output else 'the plan'} are done; nothing to run"
                    + ("" if options.relist else " (--relist looks for new files)"))
            else:
                _run_feed(job, options, feed, lock, on_result, outcome)
        finally:
            feed.close()
            if job.output is None:
                plan.rm("", recursive=True)
        _log_relist(feed.relist_report)
        s = feed.state
        outcome.entries, outcome.shards, outcome.labels = s.entries, s.shards, s.labels
        outcome.listing = s.listed or {}
        outcome.seconds = time.perf_counter() - t0
        if outcome.ok and finish is not None:
            if lock:
                lock.check()
            finish(outcome)
        return outcome


def _run_feed(job: ShardedJob, options: RunOptions, feed: ShardFeed, lock: Any,
              on_result: Callable[[ShardResult], None] | None, outcome: RunOutcome) -> None:
    from .pool import ShardPool, choose_layout, cluster_size, connect
    from .progress import ProgressBar

    # Ray starts on the main thread, which owns the signal handlers. INPUT is listed once it
    # is up: the driver's peak is then Ray's memory plus the listing's bounded working set
    # at every size of INPUT, not only where the listing outlasts Ray's start, and the two
    # do not share the driver's cores meanwhile. The first shard came no later in the runs
    # measured: the actors' model start outlasts the first plan chunk (README, Listing).
    t_ray = time.perf_counter()
    outcome.where = connect(options.address)
    outcome.startup["ray"] = time.perf_counter() - t_ray
    feed.start()  # (a relist's listing already runs)
    t_list = time.perf_counter()
    cpus, gpus, node_cpus, cpu_node_cpus = cluster_size()
    # Auto only where a plan entry is one image: a tar is one chunk (one decode worker's
    # threads for a whole shard), and a table's chunks would each reread a row group.
    decode_workers = options.decode_workers if job.make_images else 0
    if decode_workers is None and not (job.counts_images and job.source.format != "parquet"):
        decode_workers = 0
    layout = choose_layout(cpus, gpus, options.actors, options.gpus_per_actor,
                           options.threads, node_cpus, decode_workers, cpu_node_cpus)
    if decode_workers and layout.decode_workers < decode_workers:
        log(f"--decode-workers {decode_workers}: {layout.decode_workers} fit beside the "
            "model actors in the cluster's CPUs")
    outcome.layout = layout.describe()
    pool = ShardPool(job.make_worker(layout), layout, options.max_attempts,
                     job.make_images(layout) if job.make_images else None)
    s = feed.state
    unit = {"webdataset": "tars", "parquet": "rows"}.get(job.source.format, "files")
    what = "listing" if feed.listing else f"{s.entries} {unit}, {s.shards} shards"
    log(f"bottleneck {job.name}: INPUT {job.source.url} ({job.source.kind}): {what}; "
        f"{len(outcome.done_before)} shards already done; on {outcome.where}")
    log(f"workers: {outcome.layout}")
    try:
        total = feed.todo_entries if job.counts_images else None  # a tar's images: unknown
        with ProgressBar(total, enabled=options.progress, desc=job.name) as bar:
            def progress(done: int, errors: int) -> None:
                if total is not None:
                    bar.set_total(feed.todo_entries)
                if feed.listing:
                    st = job.source.stats
                    bar.note(listed=st.keys, req_s=round(st.requests / max(
                        1e-9, time.perf_counter() - t_list)))
                else:
                    bar.note(listed=None, req_s=None)
                bar.update(done, errors)

            def should_stop() -> None:
                if lock:
                    lock.check()

            for result in pool.run(feed, on_progress=progress, should_stop=should_stop):
                if "tensorflow_import" in result.seconds and len(outcome.startup) == 1:
                    outcome.startup.update(
                        {k: result.seconds[k] for k in STARTUP_PARTS if k in result.seconds})
                    outcome.startup["first_shard"] = time.perf_counter() - t_ray
                if on_result:
                    on_result(result)
                result.table = None  # handed over: a job with no OUTPUT holds no rows
    finally:
        pool.shutdown()
    outcome.results = pool.outcome.results
    outcome.failed = pool.outcome.failed
    outcome.retries = pool.outcome.retries


def _log_relist(report: dict[str, Any]) -> None:
    if report:
        gone = f", e.g. {', '.join(report['vanished_first'])}" if report["vanished"] else ""
        log(f"relist: {report['new']} new files planned; {report['vanished']} vanished{gone}"
            + (f" (all in {PLAN_DIR}/{report['vanished_file']})" if report["vanished"] else ""))


def resume_point(job: ShardedJob, overwrite: bool) -> set[int]:
    """Record this run's manifest in OUTPUT and return the shards already committed there
    (none without OUTPUT). Raises OutputConflict when OUTPUT was made otherwise, unless
    `overwrite`, or the job's `replace_on_mismatch`, clears it first."""
    if job.output is None:
        return set()
    manifest = job.manifest()
    if job.replace_on_mismatch and not overwrite:
        try:
            old = read_manifest(job.output)
            overwrite = old is not None and bool(manifest.mismatches(old))
        except Exception:  # noqa: BLE001 - unreadable: it is the job's own folder, start again
            overwrite = True
    prepare_output(job.output, manifest, overwrite)
    return committed_shards(job.output.ls_names())
