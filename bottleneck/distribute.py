"""Ray, in one place: connect, size the actor pool, and feed it shards from a work queue.

`choose_layout` is pure (no Ray import). `ShardPool` pulls shards to actors as they finish
them, retries a shard whose actor died or whose task failed (a bounded number of times),
replaces dead actors, and reports live progress through a tiny tracker actor.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .planning import Shard

# Measured on 2 cores (README, Performance): one actor using every core beats one per core,
# since each actor holds its own 58 MB model and the shards would compete for the same cores.
MAX_THREADS_PER_ACTOR = 8
GPU_ACTOR_TF_THREADS = 2
GPU_ACTOR_DECODE_THREADS = 4


@dataclass(frozen=True)
class Layout:
    """How many actors, and what each reserves and uses."""

    actors: int
    num_cpus: float
    num_gpus: float
    threads: int  # TensorFlow intra-op threads per actor
    decode_threads: int

    def describe(self) -> str:
        dev = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.threads} TF threads"
        return (f"{self.actors} actor(s), each {dev} + {self.decode_threads} decode threads "
                f"({self.num_cpus:g} CPU reserved)")


def choose_layout(cluster_cpus: float, cluster_gpus: float, actors: int | None = None,
                  gpus_per_actor: float | None = None) -> Layout:
    """One actor per GPU when there are GPUs; otherwise actors of up to 8 threads that fill
    the CPUs. `actors` and `gpus_per_actor` override."""
    cpus = max(1, int(cluster_cpus))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus >= 1 else 0.0
    if gpus_per_actor > 0:
        # With no GPU node up yet (an autoscaler scaling from zero), ask for the actors
        # anyway: their GPU requests are what brings the nodes up.
        n = actors or max(1, int(cluster_gpus // gpus_per_actor))
        # A GPU needs several cores of JPEG decoding to stay busy (README, GPUs); the actor
        # reserves one CPU and runs its decode threads on the GPU node's cores.
        return Layout(n, num_cpus=1, num_gpus=gpus_per_actor, threads=GPU_ACTOR_TF_THREADS,
                      decode_threads=GPU_ACTOR_DECODE_THREADS)
    if actors:
        per = max(1, cpus // actors)
    else:
        per = min(cpus, MAX_THREADS_PER_ACTOR)
        actors = max(1, cpus // per)
    return Layout(actors, num_cpus=per, num_gpus=0.0, threads=per, decode_threads=max(2, per))


def connect(address: str | None = None, **local_kwargs: Any) -> str:
    """Connect to Ray: --address, else RAY_ADDRESS, else a running local head, else start a
    local Ray for this job (``--address local`` always starts one). Returns a short
    description of what it connected to."""
    import ray

    if ray.is_initialized():
        return "the Ray instance already running in this process"
    quiet = {"log_to_driver": True, "logging_level": "WARNING", "configure_logging": True}
    if address == "local":
        ray.init(address="local", include_dashboard=False, **quiet, **local_kwargs)
        return "a local Ray started for this job"
    if address:
        ray.init(address=address, **quiet)
        return f"Ray at {address}"
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        return f"Ray at {os.environ['RAY_ADDRESS']}"
    try:
        ray.init(address="auto", **quiet)
        return "the local Ray head"
    except ConnectionError:
        ray.init(include_dashboard=False, **quiet, **local_kwargs)
        return "a local Ray started for this job"


def cluster_size() -> tuple[float, float]:
    import ray

    res = ray.cluster_resources()
    return res.get("CPU", 0.0), res.get("GPU", 0.0)


def worker_env() -> dict[str, str]:
    """Variables every actor needs: storage settings (endpoint, region, profile…) and
    TensorFlow kept quiet. Never credentials: Ray writes these into its session logs;
    they travel as `Credentials` in the actors' arguments instead."""
    from .storage import aws_env

    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    env.update(aws_env(secrets=False))
    env.update({k: v for k, v in os.environ.items() if k.startswith("BOTTLENECK_")})
    return env


class Credentials:
    """The driver's credential variables (AWS_SECRET_ACCESS_KEY…), carried to a worker as an
    argument, which Ray does not log; its repr hides them."""

    def __init__(self, values: dict[str, str] | None = None):
        if values is None:
            from .storage import credentials_env

            values = credentials_env()
        self.values = dict(values)

    def restore(self) -> None:
        """In the worker: set what this process lacks (the worker's own role wins)."""
        from .storage import restore_env

        restore_env(self.values)

    def __repr__(self) -> str:
        return f"Credentials({sorted(self.values)} hidden)"


class ProgressTracker:
    """Latest (done, errors) per shard, written by actors after each batch, read by the driver."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple[int, int]] = {}

    def update(self, shard: int, done: int, errors: int) -> None:
        self.shards[shard] = (done, errors)

    def snapshot(self) -> tuple[int, int]:
        return (sum(d for d, _ in self.shards.values()), sum(e for _, e in self.shards.values()))


@dataclass
class PoolOutcome:
    results: list[Any] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)  # shard index → last error
    retries: int = 0
    actors_replaced: int = 0


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    tail = [line for line in text if line.strip()][-1:] or [type(e).__name__]
    return f"{type(e).__name__}: {tail[0]}"[:500]


class ShardPool:
    """Feeds shards to a pool of actors, one shard in flight per actor.

    make_actor(tracker) → an actor handle with `process_shard(shard, *args)` returning an
    object with `.index`, `.rows` and `.errors`. A shard whose actor dies is retried on a
    fresh actor; a shard that fails `max_attempts` times is reported in `failed`.
    """

    def __init__(self, make_actor: Callable[[Any], Any], n_actors: int,
                 max_attempts: int = 3, call_args: Sequence[Any] = ()):
        import ray

        self.ray = ray
        self.tracker = ray.remote(num_cpus=0)(ProgressTracker).remote()
        self.make_actor = make_actor
        self.call_args = tuple(call_args)
        self.max_attempts = max_attempts
        self.actors = [make_actor(self.tracker) for _ in range(n_actors)]

    def run(self, shards: Sequence[Shard],
            on_progress: Callable[[int, int], None] | None = None,
            on_result: Callable[[Any], None] | None = None) -> PoolOutcome:
        ray = self.ray
        out = PoolOutcome()
        queue: deque[Shard] = deque(shards)
        attempts: dict[int, int] = {}
        idle = list(range(len(self.actors)))
        in_flight: dict[Any, tuple[int, Shard]] = {}
        last_poll = 0.0
        while queue or in_flight:
            while queue and idle:
                slot = idle.pop()
                shard = queue.popleft()
                attempts[shard.index] = attempts.get(shard.index, 0) + 1
                ref = self.actors[slot].process_shard.remote(shard, *self.call_args)
                in_flight[ref] = (slot, shard)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            for ref in ready:
                slot, shard = in_flight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    self._replace(slot)
                    out.actors_replaced += 1
                    self._retry_or_fail(shard, attempts, queue, out, e)
                except ray.exceptions.RayError as e:  # the task raised, or its object was lost
                    self._retry_or_fail(shard, attempts, queue, out, e)
                else:
                    out.results.append(result)
                    # The final count, from the result itself (the actor's last report may lag).
                    self.tracker.update.remote(shard.index, result.rows + result.errors,
                                               result.errors)
                    if on_result:
                        on_result(result)
                idle.append(slot)
            if on_progress and time.monotonic() - last_poll > 0.5:
                last_poll = time.monotonic()
                on_progress(*ray.get(self.tracker.snapshot.remote()))
        if on_progress:
            on_progress(*ray.get(self.tracker.snapshot.remote()))
        return out

    def _retry_or_fail(self, shard: Shard, attempts: dict[int, int], queue: deque[Shard],
                       out: PoolOutcome, e: BaseException) -> None:
        self.ray.get(self.tracker.update.remote(shard.index, 0, 0))
        if attempts[shard.index] < self.max_attempts:
            out.retries += 1
            queue.append(shard)
        else:
            out.failed[shard.index] = short_error(e)

    def _replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        self.actors[slot] = self.make_actor(self.tracker)

    def shutdown(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.ray.kill(self.tracker, no_restart=True)
