"""The one runner of every sharded job (extract, predict): lock → list ‖ start Ray → plan →
manifest → actors → progress → outcome.

A job gives only what is its own (`ShardedJob`): how to list its inputs, how to build its
per-shard worker, and where its output goes. The runner does the rest, the same way for
every job, and holds no Ray import itself (`pool` does).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..storage import Storage
from .manifest import Manifest, check_resumable, prepare_output, read_manifest
from .output import ShardResult
from .planning import (
    Entry,
    Shard,
    committed_shards,
    labels_of,
    listing_digest,
    plan_remaining,
    plan_shards,
)


@dataclass
class RunOptions:
    """How to run, the same for every job (the CLI's shared options)."""

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float | None = None
    threads: int | None = None
    max_attempts: int = 3
    progress: bool = True
    overwrite: bool = False


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
    source: Storage  # INPUT, recorded in the manifest
    list_inputs: Callable[[], list[Entry]]  # called once, while Ray starts
    # layout → a picklable callable that builds the per-shard worker inside an actor; the
    # worker's `process_shard(shard, *args, progress=fn)` returns a ShardResult.
    make_worker: Callable[[Any], Callable[[], Any]]
    output: Storage | None  # where manifest, lock and part files go; None: results only
    settings: dict[str, Any]  # what the rows mean; a rerun with others is refused
    shard_size: int
    # The extra arguments of each shard's call, from the whole listing's sorted labels
    # (extract records them in every part file's metadata).
    shard_args: Callable[[list[str]], tuple] = lambda labels: ()
    # With this, an OUTPUT made with other settings is replaced instead of refused (predict's
    # staging folder, which is the job's own).
    replace_on_mismatch: bool = False


@dataclass
class RunOutcome:
    """What a run did: the plan, what was done before, and this run's shard results."""

    entries: int
    labels: list[str]
    shards: int
    done_before: set[int]
    results: list[ShardResult] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    retries: int = 0
    seconds: float = 0.0
    where: str = ""
    layout: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def preflight(job: ShardedJob, options: RunOptions) -> None:
    """Refuse early, before INPUT is listed or Ray starts, to add to an OUTPUT made with other
    settings, another INPUT or another shard size. Raises OutputConflict."""
    if job.output is not None and not options.overwrite and not job.replace_on_mismatch:
        check_resumable(job.output, job.kind, job.settings, job.source.url, job.shard_size)


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
    from .pool import ShardPool, choose_layout, cluster_size, connect

    t0 = time.perf_counter()
    lock = OutputLock(job.output) if job.output is not None else None
    with lock or nullcontext():
        # List while Ray starts and the actors load their model: none needs the others.
        # (Ray must start on the main thread, which owns the signal handlers.)
        ex = ThreadPoolExecutor(1, thread_name_prefix="listing")
        listing = ex.submit(job.list_inputs)
        try:
            where = connect(options.address)
            cpus, gpus, node_cpus = cluster_size()
            layout = choose_layout(cpus, gpus, options.actors, options.gpus_per_actor,
                                   options.threads, node_cpus)
            pool = ShardPool(job.make_worker(layout), layout, options.max_attempts)
        except BaseException:  # Ctrl-C or a failed start: do not wait for the listing
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        try:
            entries = listing.result()
        except BaseException:
            pool.shutdown()
            raise
        finally:
            ex.shutdown(wait=False, cancel_futures=True)
        try:
            outcome = _run_planned(job, options, pool, entries, lock, on_result,
                                   RunOutcome(entries=len(entries), labels=labels_of(entries),
                                              shards=0, done_before=set(), where=where,
                                              layout=layout.describe()))
        finally:
            pool.shutdown()
        outcome.seconds = time.perf_counter() - t0
        if outcome.ok and finish is not None:
            if lock:
                lock.check()
            finish(outcome)
        return outcome


def _run_planned(job: ShardedJob, options: RunOptions, pool: Any, entries: list[Entry],
                 lock: Any, on_result: Callable[[ShardResult], None] | None,
                 outcome: RunOutcome) -> RunOutcome:
    from .progress import ProgressBar

    if not entries:
        raise UsageError(f"INPUT has no files: {job.source.url}")
    shards = plan_shards(entries, job.shard_size)
    outcome.shards = len(shards)
    outcome.done_before = done = resume_point(job, entries, len(shards), options.overwrite)
    todo: list[Shard] = plan_remaining(shards, done)
    log(f"bottleneck {job.name}: {len(entries)} files, {len(outcome.labels)} labels, "
        f"{len(shards)} shards of {job.shard_size}; {len(done)} already done; on {outcome.where}")
    if todo:
        log(f"workers: {outcome.layout}")
        with ProgressBar(sum(len(s) for s in todo), enabled=options.progress,
                         desc=job.name) as bar:
            for result in pool.run(todo, job.shard_args(outcome.labels), on_progress=bar.update,
                                   should_stop=lock.check if lock else lambda: None):
                if on_result:
                    on_result(result)
                result.table = None  # handed over: a job with no OUTPUT holds no rows
        outcome.results = pool.outcome.results
        outcome.failed = pool.outcome.failed
        outcome.retries = pool.outcome.retries
    else:
        outcome.layout = ""
    return outcome


def resume_point(job: ShardedJob, entries: list[Entry], shards: int, overwrite: bool
                 ) -> set[int]:
    """Record this run's manifest in OUTPUT and return the shards already committed there
    (none without OUTPUT). Raises OutputConflict when OUTPUT was made otherwise, unless
    `overwrite`, or the job's `replace_on_mismatch`, clears it first."""
    if job.output is None:
        return set()
    manifest = Manifest(kind=job.kind, settings=job.settings, input_url=job.source.url,
                        listing_sha256=listing_digest(entries), images=len(entries),
                        shard_size=job.shard_size, shards=shards)
    if job.replace_on_mismatch and not overwrite:
        try:
            old = read_manifest(job.output)
            overwrite = old is not None and bool(manifest.mismatches(old))
        except UsageError:  # unreadable: it is the job's own folder, start it again
            overwrite = True
    prepare_output(job.output, manifest, overwrite)
    return committed_shards(job.output.ls_names())
