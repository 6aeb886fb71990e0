"""Ray, in one place: connect, size the actor pool, run shards on it, and run one-off tasks.

Ray's own fault machinery does the retrying: an actor whose process dies is restarted
(`max_restarts=-1`), and a shard's call is retried on it, after a crash or an exception
alike (`max_task_retries=-1`, `retry_exceptions`), waiting while the actor restarts. What
Ray lacks is the give-up: each try of a shard asks the job's tracker actor which try it is,
and after `max_attempts` it returns a `ShardFailure` instead of trying again, so a shard
that kills its worker every time does not hold the job for ever.

`choose_layout` is pure. Nothing else imports Ray, except through this module and
`decoding` (the decode workers, which the pool starts when the layout has them).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import decoding
from .planning import Shard

# Measured on 2 cores (README, Performance): one actor using every core beats one per core,
# since each actor holds its own model and the shards would compete for the same cores.
MAX_THREADS_PER_ACTOR = 8
GPU_ACTOR_TF_THREADS = 2
GPU_ACTOR_DECODE_THREADS = 4
# An actor tells the tracker its shard's progress at most this often: a report per batch
# (30 a second at 1,000 img/s) is a Ray call each, whose CPU is taken from decoding.
PROGRESS_EVERY_S = 0.5

# Test hook, used by tests/test_fault_tolerance.py only: shard numbers whose worker process
# dies (os._exit) every time it starts them, standing in for an input that crashes a native
# decoder, which cannot be made on purpose. Unset in normal use.
CRASH_SHARDS_ENV = "BOTTLENECK_TEST_CRASH_SHARDS"


@dataclass(frozen=True)
class Layout:
    """How many actors, and what each reserves and uses."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int  # TensorFlow intra-op threads per actor
    decode_threads: int  # per actor; with decode workers, per decode worker
    decode_workers: int = 0  # CPU-only actors that decode for the others (`decoding`)

    def describe(self) -> str:
        dev = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.threads} TF threads"
        if not self.decode_workers:
            return (f"{self.actors} actor(s), each {dev} + {self.decode_threads} decode "
                    f"threads ({self.num_cpus:g} CPU reserved)")
        return (f"{self.actors} actor(s), each {dev} ({self.num_cpus:g} CPU reserved), fed by "
                f"{self.decode_workers} decode worker(s) of {decoding.WORKER_CPUS} CPU and "
                f"{self.decode_threads} threads")


def choose_layout(cluster_cpus: float, cluster_gpus: float, actors: int | None = None,
                  gpus_per_actor: float | None = None, threads: int | None = None,
                  node_cpus: float | None = None, decode_workers: int | None = None,
                  cpu_node_cpus: float = 0.0) -> Layout:
    """One actor per GPU when there are GPUs; otherwise actors of up to 8 threads that fill
    the CPUs, none bigger than the largest node (`node_cpus`, default: all the CPUs), so
    that every actor fits on some node. `actors`, `gpus_per_actor` and `threads` override.

    `decode_workers` (None: `decoding.decode_workers_for` decides, from the CPUs on nodes
    without GPUs, `cpu_node_cpus`) adds CPU-only actors that decode for the others. On CPUs
    they take their cores from the conv-base actors', leaving those at least one.
    """
    cpus = max(1, int(cluster_cpus))
    largest = max(1, int(node_cpus or cpus))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        # With no GPU node up yet (an autoscaler scaling from zero), ask for the actors
        # anyway: their GPU requests are what brings the nodes up.
        n = actors or max(1, int(cluster_gpus // gpus_per_actor))
        # A GPU needs several cores of JPEG decoding to stay busy (README, GPUs): the actor
        # reserves one CPU and runs its decode threads on the GPU node's cores, unless
        # decode workers elsewhere have more.
        gpu_node_cpus = cluster_cpus - cpu_node_cpus
        workers = decoding.decode_workers_for(decode_workers, n, gpu_node_cpus, cpu_node_cpus)
        # No more than the cluster's CPUs beside the actors' (on GPU nodes, if up), counted
        # as the job starts: a decode worker that dies could not be restarted while another
        # waited for its CPU, and its chunk would wait with it.
        free = int(cluster_cpus - (n if gpu_node_cpus > 0 else 0))
        workers = min(workers, max(0, free) // decoding.WORKER_CPUS)
        return Layout(n, num_cpus=1, num_gpus=gpus_per_actor,
                      threads=threads or GPU_ACTOR_TF_THREADS,
                      decode_threads=(decoding.WORKER_THREADS if workers
                                      else GPU_ACTOR_DECODE_THREADS),
                      decode_workers=workers)
    workers = min(max(0, decode_workers or 0), (cpus - 1) // decoding.WORKER_CPUS)
    cpus -= workers * decoding.WORKER_CPUS
    largest = min(largest, cpus)
    if actors:
        per = max(1, min(cpus // actors, largest))
    else:
        per = min(largest, MAX_THREADS_PER_ACTOR)
        actors = max(1, cpus // per)
    # A decode thread more than the cores: one waiting on a read or the GIL leaves its
    # core to another (README, Performance).
    return Layout(actors, num_cpus=per, num_gpus=0.0, threads=threads or per,
                  decode_threads=decoding.WORKER_THREADS if workers else per + 1,
                  decode_workers=workers)


def _current_cluster() -> str | None:
    """The head that `ray start` on this machine recorded as the current cluster, if its GCS
    is still running here; None otherwise (no head, or a stale record)."""
    from ray._private.services import find_bootstrap_address, find_gcs_addresses

    address = find_bootstrap_address(None)
    return address if address and address in find_gcs_addresses() else None


def check_address(address: str | None) -> None:
    """Refuse, before any work, a Ray address (--address or $RAY_ADDRESS) where nothing
    listens: `ray.init` would retry it for minutes. `local` and `auto` are left to Ray.
    Raises UsageError."""
    from ..errors import UsageError

    chosen = address or os.environ.get("RAY_ADDRESS")
    if not chosen or chosen in ("local", "auto"):
        return
    host, _, port = chosen.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address must be HOST:PORT (or ray://HOST:PORT), 'local' or "
                         f"'auto', not {chosen!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"cannot reach Ray at {chosen} ({e.strerror or e}): start a head "
                         "there with `ray start --head`, or leave --address out to run on a "
                         "private Ray") from None


def connect(address: str | None = None, **local_kwargs: Any) -> str:
    """Connect to Ray and say where, in a few words.

    In order: the Ray this process already runs (a notebook's `ray.init()`); `address`
    (`local` always starts a private one); $RAY_ADDRESS; the head that `ray start` recorded
    on this machine; else a private Ray for this job alone. Never any other Ray instance
    that happens to run here: Ray's own `address="auto"` would join one that a test run or
    a colleague's notebook started, and the job would die with it.
    Raises UsageError when the given address cannot be reached.
    """
    import ray

    from ..errors import UsageError

    if ray.is_initialized():
        return "the Ray instance already running in this process"
    quiet = {"log_to_driver": True, "logging_level": "WARNING", "configure_logging": True}
    private = {"address": "local", "include_dashboard": False, **local_kwargs}
    chosen = address or os.environ.get("RAY_ADDRESS") or None
    if chosen == "local" or (chosen is None and (chosen := _current_cluster()) is None):
        ray.init(**private, **quiet)
        return "a private Ray started for this job"
    try:
        ray.init(address=chosen, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot connect to Ray at {chosen}: {first}") from None
    return f"Ray at {chosen}"


def disconnect() -> None:
    """Leave Ray (and stop it, when this process started it)."""
    import ray

    ray.shutdown()


def cluster_size() -> tuple[float, float, float, float]:
    """(CPUs, GPUs) of the whole cluster, the CPUs of its largest node, and the CPUs of its
    nodes without GPUs."""
    import ray

    res = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    cpus = [r.get("CPU", 0.0) for r in nodes]
    cpu_only = sum(r.get("CPU", 0.0) for r in nodes if not r.get("GPU"))
    return res.get("CPU", 0.0), res.get("GPU", 0.0), max(cpus, default=0.0), cpu_only


def worker_env() -> dict[str, str]:
    """Variables every worker needs: storage settings (endpoint, region, profile…) and
    TensorFlow kept quiet. Never credentials: Ray writes these into its session logs;
    they travel as `Credentials` in the workers' arguments instead."""
    from ..storage import aws_env

    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.update(aws_env(secrets=False))
    env.update({k: v for k, v in os.environ.items() if k.startswith("BOTTLENECK_")})
    return env


class Credentials:
    """The driver's credential variables (AWS_SECRET_ACCESS_KEY…), carried to a worker as an
    argument, which Ray does not log; its repr hides them."""

    def __init__(self, values: dict[str, str] | None = None):
        if values is None:
            from ..storage import credentials_env

            values = credentials_env()
        self.values = dict(values)

    def restore(self) -> None:
        """In the worker: set what this process lacks (the worker's own role wins)."""
        from ..storage import restore_env

        restore_env(self.values)

    def __repr__(self) -> str:
        return f"Credentials({sorted(self.values)} hidden)"


class ProgressTracker:
    """The job's tallies, one actor: images done per shard (reported by the workers as
    they go, and by the driver from each result; read by the driver), and each shard's
    tries and last error.

    Ray's tqdm integration draws one bar per worker process, where a job wants one total;
    and Ray's task retries report neither a try's number nor a count of retries."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts
        self.shards: dict[int, tuple[int, int]] = {}
        self.starts: dict[int, int] = {}
        self.errors: dict[int, str] = {}

    def start(self, shard: int) -> int:
        """Count a try of `shard` and return its number (1 for the first)."""
        self.starts[shard] = self.starts.get(shard, 0) + 1
        self.shards[shard] = (0, 0)
        return self.starts[shard]

    def fail(self, shard: int, error: str) -> None:
        self.errors[shard] = error

    def last_error(self, shard: int) -> str | None:
        return self.errors.get(shard)

    def update(self, shard: int, done: int, errors: int) -> None:
        # The higher count wins: a worker's report can arrive after the driver's final one
        # (Ray orders calls per caller only).
        old_done, old_errors = self.shards.get(shard, (0, 0))
        self.shards[shard] = (max(old_done, done), max(old_errors, errors))

    def snapshot(self) -> tuple[int, int, int]:
        """(images done, errors, retries) over the whole job. A start past the last try only
        gives the shard up, and is no retry."""
        return (sum(d for d, _ in self.shards.values()), sum(e for _, e in self.shards.values()),
                sum(min(n, self.max_attempts) - 1 for n in self.starts.values()))


@dataclass
class ShardFailure:
    """A shard given up after its last try."""

    index: int
    error: str


class ShardActor:
    """The Ray actor around a job's plain per-shard worker.

    `factory()` builds the worker in the actor's process (it loads the model there);
    `worker.process_shard(shard, *args, progress=fn)` returns an `output.ShardResult`.
    With `decode_workers` (their actor names), the worker is built as
    `factory(images=decoding.RemoteImages(names))` and reads its images from them.
    """

    def __init__(self, factory: Callable[..., Any], tracker: str, credentials: Credentials,
                 max_attempts: int, decode_workers: Sequence[str] = ()):
        import ray

        from ..tflog import quiet_tensorflow

        t0 = time.perf_counter()
        quiet_tensorflow()  # before the worker's model imports it
        t1 = time.perf_counter()
        credentials.restore()
        # By name, not by handle: Ray keeps handle arguments in its object store, and an
        # actor that restarts must not depend on those.
        self.tracker = ray.get_actor(tracker)
        self.max_attempts = max_attempts
        self.crash_shards = {int(i) for i in os.environ.get(CRASH_SHARDS_ENV, "").split(",") if i}
        t2 = time.perf_counter()
        self.remote_images = decoding.RemoteImages(decode_workers) if decode_workers else None
        self.worker = (factory(images=self.remote_images) if self.remote_images
                       else factory())
        # Reported with this actor's first result: where its start-up went.
        self.startup: dict[str, float] | None = {
            "tensorflow_import": t1 - t0, "worker_build": time.perf_counter() - t2}

    def process_shard(self, shard: Shard, *args: Any) -> Any:
        import ray

        try:
            attempt = ray.get(self.tracker.start.remote(shard.index))
            error = (ray.get(self.tracker.last_error.remote(shard.index))
                     if attempt > self.max_attempts else None)
        except ray.exceptions.RayActorError as e:  # no tracker, no give-up: fail, not loop
            return ShardFailure(shard.index, f"the job's tracker actor is gone: {short_error(e)}")
        if attempt > self.max_attempts:
            return ShardFailure(shard.index, f"{error or 'its worker process died each time'} "
                                             f"({self.max_attempts} tries)")
        if shard.index in self.crash_shards:
            os._exit(1)
        last = 0.0

        def progress(index: int, done: int, errors: int) -> None:
            nonlocal last
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                self.tracker.update.remote(index, done, errors)

        try:
            result = self.worker.process_shard(shard, *args, progress=progress)
        except Exception as e:
            ray.get(self.tracker.fail.remote(shard.index, short_error(e)))
            raise
        context = ray.get_runtime_context()
        result.worker = context.get_actor_id() or ""
        result.node = context.get_node_id()
        result.gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        if self.remote_images:
            result.decode_nodes = self.remote_images.take_nodes()
        if self.startup is not None:
            result.seconds.update(self.startup)
            self.startup = None
        return result


class ShardSource(Protocol):
    """Where the pool takes shards from (`feed.ShardFeed`)."""

    def next(self) -> Shard | None: ...  # None: none ready yet
    @property
    def finished(self) -> bool: ...  # no shard will come any more
    def wait(self, timeout: float) -> None: ...


class SequenceFeed:
    """A fixed list of shards as a ShardSource."""

    def __init__(self, shards: Sequence[Shard]):
        self._left = deque(shards)
        self.finished = False

    def next(self) -> Shard | None:
        if not self._left:
            self.finished = True
            return None
        return self._left.popleft()

    def wait(self, timeout: float) -> None:
        self.finished = not self._left


def drain(feed: ShardSource, into: list[Shard] | None = None, poll: float = 0.5
          ) -> list[Shard]:
    """Every shard a feed still holds, waiting while it has none ready (a dead pool fails
    them all). Shards taken before the feed raises are left in `into`."""
    out: list[Shard] = [] if into is None else into
    while not feed.finished:
        shard = feed.next()
        if shard is None:
            feed.wait(poll)
        else:
            out.append(shard)
    return out


@dataclass
class PoolOutcome:
    results: list[Any] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard index → last error
    retries: int = 0


def short_error(e: BaseException) -> str:
    """The last line of an error (Ray wraps the cause in a long traceback), at most 500 chars."""
    text = str(e).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] or [type(e).__name__]
    return f"{type(e).__name__}: {tail[0]}"[:500]


class ShardPool:
    """Runs shards on a pool of `ShardActor`s, one shard in flight per actor.

    A shard whose actor dies, or whose call raises, is retried by Ray on the restarted
    actor, up to `max_attempts` tries in all; then it is reported in `outcome.failed`.
    """

    def __init__(self, factory: Callable[..., Any], layout: Layout, max_attempts: int = 3,
                 make_images: Callable[[], Any] | None = None):
        """`make_images` builds the job's `images.ShardImages` in each decode worker; the
        layout's decode workers start only with it."""
        import ray

        self.ray = ray
        run = uuid.uuid4().hex
        tracker = f"bottleneck-tracker-{run}"
        self.tracker = ray.remote(num_cpus=0)(ProgressTracker).options(name=tracker).remote(
            max_attempts)
        env = {"env_vars": worker_env()}
        credentials = Credentials()
        names = ([f"bottleneck-decode-{run}-{i}" for i in range(layout.decode_workers)]
                 if make_images is not None else [])
        actor_cls = ray.remote(ShardActor).options(
            num_cpus=layout.num_cpus, num_gpus=layout.num_gpus, max_restarts=-1,
            runtime_env=env)
        self.actors = [actor_cls.remote(factory, tracker, credentials, max_attempts, names)
                       for _ in range(layout.actors)]
        # Asked for after the model actors (Ray schedules in about the order asked): decode
        # workers placed first could leave no node with room for a model actor.
        self.decoders = [ray.remote(decoding.DecodeWorker).options(
            name=name, num_cpus=decoding.WORKER_CPUS, max_restarts=-1,
            max_concurrency=decoding.WORKER_CONCURRENCY,
            runtime_env=env).remote(make_images, credentials) for name in names]
        self.dead_reason = ""

    def run(self, feed: ShardSource | Sequence[Shard],
            on_progress: Callable[[int, int], None] | None = None,
            should_stop: Callable[[], None] = lambda: None) -> Iterator[Any]:
        """Yield each shard's result as it finishes; failures end up in `self.outcome`.

        Shards are taken from `feed` as actors come free (a `ShardFeed`, which may still be
        listing, or a plain sequence), so the pool holds only the shards in flight.
        `should_stop()` is called about twice a second and may raise to end the run (the
        caller then shuts the pool down, which kills shards in flight: commits are atomic).
        """
        ray = self.ray
        feed = feed if hasattr(feed, "next") else SequenceFeed(feed)
        self.outcome = out = PoolOutcome()
        retry: deque[Shard] = deque()  # taken from the feed, to run again elsewhere
        idle = list(range(len(self.actors)))
        in_flight: dict[Any, tuple[int, Shard]] = {}
        last_poll = 0.0
        while True:
            if not idle and not in_flight:  # every actor is dead: what is left fails
                for shard in [*retry, *drain(feed)]:
                    out.failed[shard.index] = self.dead_reason
                break
            while idle and (shard := retry.popleft() if retry else feed.next()) is not None:
                slot = idle.pop()
                call = self.actors[slot].process_shard.options(
                    max_task_retries=-1, retry_exceptions=True)
                in_flight[call.remote(shard)] = (slot, shard)
            if not in_flight:
                if not retry and feed.finished:
                    break
                feed.wait(0.5)  # the listing has not planned the next shard yet
                ready = []
            else:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                slot, shard = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    # Dead for good (its constructor raised: no model, no GPU memory…): the
                    # shard never ran, so it goes to another actor; this slot is retired.
                    self.dead_reason = short_error(e)
                    retry.append(shard)
                    continue
                except ray.exceptions.RayError as e:
                    idle.append(slot)
                    out.failed[shard.index] = short_error(e)
                    continue
                idle.append(slot)
                if isinstance(result, ShardFailure):
                    out.failed[shard.index] = result.error
                    continue
                out.results.append(result)
                # The final count, from the result itself (the actor's last report may lag).
                self.tracker.update.remote(shard.index, result.rows + result.errors,
                                           result.errors)
                yield result
            should_stop()
            if on_progress and time.monotonic() - last_poll > 0.5:
                last_poll = time.monotonic()
                self._progress(on_progress)
        self._progress(on_progress)

    def _progress(self, on_progress: Callable[[int, int], None] | None) -> None:
        try:
            done, errors, retries = self.ray.get(self.tracker.snapshot.remote())
        except self.ray.exceptions.RayActorError:  # the tracker is gone: no counts to show
            return
        self.outcome.retries = retries
        if on_progress:
            on_progress(done, errors)

    def shutdown(self) -> None:
        for a in [*self.actors, *self.decoders, self.tracker]:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - it is already gone
                pass


def _call_with_credentials(fn: Callable[..., Any], credentials: Credentials, *args: Any) -> Any:
    from ..tflog import quiet_tensorflow

    quiet_tensorflow()
    credentials.restore()
    return fn(*args)


def run_task(fn: Callable[..., Any], *args: Any, num_cpus: float, num_gpus: float) -> Any:
    """Run `fn(*args)` once as a Ray task with the driver's credentials and return its result.

    No retry: a failed training run is reported, not silently repeated. The task's own
    exception is re-raised as it is, so a UsageError raised inside stays a UsageError.
    """
    import ray

    task = ray.remote(_call_with_credentials).options(
        name=fn.__name__, num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0,
        runtime_env={"env_vars": worker_env()})
    try:
        return ray.get(task.remote(fn, Credentials(), *args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(getattr(e, "cause", None), BaseException):
            raise e.cause from None
        raise
