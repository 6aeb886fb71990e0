"""Decode workers: reading and decoding on CPU-only Ray actors anywhere in the cluster, for
conv-base actors whose own node lacks the cores to keep a GPU busy.

A conv-base actor's `RemoteImages` sends its shard's entries out in chunks, round-robin over
the decode workers, and reads back ready uint8 batches through Ray's object store. In
flight, per conv-base actor: at most `CHUNKS_PER_WORKER` chunks per decode worker, each a
Ray generator at most `BACKPRESSURE` batches ahead of its reader (a tar is one chunk), so
memory is bounded and nothing spills. Faults are Ray's: a decode worker that dies is
restarted, and its chunk's generator replayed, skipping the batches already delivered
(decoding is deterministic). A replay that fails, and any other failure, raises in the
conv-base actor, and the whole shard is retried: nothing of it was committed. Either way a
batch is never lost or duplicated.

`decode_workers_for` is pure: the rule that turns decode workers on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# Cores of decoding one GPU needs to stay busy: ~500 img/s per core at 224 px (README,
# Performance) against 1,500 (A10G, float16) to several thousand (H100, bfloat16) img/s.
CORES_PER_GPU = 8
WORKER_CPUS = 1  # each decode worker reserves one CPU…
# …and runs three threads, so that one waiting on a read or the GIL leaves the core to
# another: on 2 cores, the ceiling benchmark's pipeline kept 1.80 cores busy with two
# threads, 1.85 with three, no more with four (README, Performance).
WORKER_THREADS = 3
WORKER_CONCURRENCY = 2  # …on two chunks at a time, so that they never idle between chunks
CHUNKS_PER_WORKER = 2
# A chunk is up to this many batches, fewer when a shard would not give every worker one:
# each chunk is a Ray call, and fewer calls leave more of the cores to decoding.
CHUNK_BATCHES = 4
# Batches a chunk's generator may run ahead of its reader: a whole chunk, so that a worker
# whose chunk waits its turn (chunks are read in order) still decodes all of it. A tar is
# one chunk of any length: this is what bounds it.
BACKPRESSURE = CHUNK_BATCHES
# A decode worker that keeps dying on a chunk (a native decoder crashing on an image) gives
# up after this many retries of the call (Ray may count one death twice: "restarted", then
# "restarting"); the shard is then retried, and given up, as any.
CALL_RETRIES = 6
# How long a model actor waits for its first decode worker to start before its shard fails.
START_TIMEOUT_S = 300.0

# Test hook, used by tests/test_decode_workers.py only: a file path; the first decode worker
# to deliver a batch while the file is absent creates it and dies (os._exit), standing in
# for a node lost mid-chunk. Unset in normal use.
KILL_ONCE_ENV = "BOTTLENECK_TEST_KILL_DECODE_WORKER_ONCE"


def decode_workers_for(requested: int | None, gpu_actors: int, gpu_node_cpus: float,
                       cpu_node_cpus: float) -> int:
    """How many decode workers to start.

    `requested` (--decode-workers) wins. Otherwise (auto) they start only for GPU actors
    (`gpu_actors` > 0) whose nodes have fewer than CORES_PER_GPU cores per actor
    (`gpu_node_cpus`: the CPUs of the nodes with GPUs, as up now), and only when the
    CPU-only nodes (`cpu_node_cpus`) have more cores than the GPU nodes would decode on:
    then one per CPU-only core, up to CORES_PER_GPU per GPU actor. With no GPU node up yet
    (an autoscaler scaling from zero) nothing is known of their cores: 0.
    """
    if requested is not None:
        return max(0, requested)
    if gpu_actors <= 0 or gpu_node_cpus <= 0:
        return 0
    local = gpu_node_cpus - gpu_actors  # each GPU actor keeps a core for itself
    need = gpu_actors * CORES_PER_GPU
    if gpu_node_cpus >= need or cpu_node_cpus <= local:
        return 0
    return int(min(cpu_node_cpus // WORKER_CPUS, need))


class DecodeWorker:
    """The actor: one `ShardImages` (the job's reader and decoder) on a CPU-only node."""

    def __init__(self, make_images: Callable[[], Any], credentials: Any):
        import ray

        credentials.restore()
        self.images = make_images()
        self.node = ray.get_runtime_context().get_node_id()
        self.kill_once = os.environ.get(KILL_ONCE_ENV)

    def batch_size(self) -> int:
        return int(self.images.batch_size)

    def decode(self, entries: Sequence[Any]) -> Iterator[tuple[list, Any, list, str, int]]:
        """A Ray generator: (rows, uint8 pixels or None, [(entry, reason)], node id, rows
        and failures so far) for each batch of `entries`, failures riding with the next
        batch; then one closing item without rows, with any failures left. The count lets
        the reader check that a replay lines up, and the closing item that none ended early
        (a count of entries would not do: a tar's entry is many rows)."""
        errors: list[tuple[Any, str]] = []
        covered = 0
        for rows, pixels in self.images.batches(tuple(entries),
                                                lambda e, r: errors.append((e, r))):
            covered += len(rows) + len(errors)
            yield rows, pixels, errors[:], self.node, covered
            errors.clear()
            if self.kill_once and not os.path.exists(self.kill_once):
                open(self.kill_once, "w").close()
                os._exit(1)
        yield [], None, errors, self.node, covered + len(errors)


class RemoteImages:
    """A conv-base actor's image stream when decode workers do the decoding: the same
    `batches(entries, on_error)` as `images.ShardImages`, in the same order, in full batches."""

    def __init__(self, names: Sequence[str]):
        import ray

        self.ray = ray
        self._names = list(names)  # looked up at the first shard: they start after us
        # Chunks go only to decode workers that are up: one still starting (its node still
        # booting) would hold them.
        self._starting: dict[Any, Any] = {}
        self.workers: list[Any] = []
        self.batch_size = 0
        self.nodes: set[str] = set()  # where this actor's batches were decoded
        # Conv-base actors start at different workers, so that their first chunks spread.
        self._next = int.from_bytes(os.urandom(2), "little")

    def _take_started(self) -> None:
        """Add the decode workers started since the last look; wait up to START_TIMEOUT_S
        for one if none is. Raises RuntimeError when none can start."""
        ray = self.ray
        deadline = time.monotonic() + START_TIMEOUT_S
        while self._names:  # registered by the driver just after this actor was asked for
            try:
                handle = ray.get_actor(self._names[0])
            except ValueError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"decode worker {self._names[0]} was never created") from None
                time.sleep(0.1)
                continue
            self._starting[handle.batch_size.remote()] = handle
            self._names.pop(0)
        while self._starting and not self.workers:  # none to send chunks to: wait for one
            ready, _ = ray.wait(list(self._starting), num_returns=1,
                                timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(f"no decode worker started in {START_TIMEOUT_S} s: "
                                   "the cluster has no CPU free for one")
            self._add_started(ready)
        if self._starting:  # and any others up by now, without waiting
            self._add_started(ray.wait(list(self._starting), num_returns=len(self._starting),
                                       timeout=0)[0])
        if not self.workers:
            raise RuntimeError("no decode worker could start")

    def _add_started(self, ready: list[Any]) -> None:
        for ref in ready:
            worker = self._starting.pop(ref)
            try:
                self.batch_size = self.ray.get(ref)
                self.workers.append(worker)
            except self.ray.exceptions.RayError:  # it cannot start: the others do its work
                pass

    def _submit(self, chunk: Sequence[Any]) -> Any:
        worker = self.workers[self._next % len(self.workers)]
        self._next += 1
        return worker.decode.options(
            _generator_backpressure_num_objects=BACKPRESSURE,
            max_task_retries=CALL_RETRIES).remote(list(chunk))

    def batches(self, entries: Sequence[Any], on_error: Callable[[Any, str], None]
                ) -> Iterator[tuple[list, np.ndarray]]:
        self._take_started()
        n = self.batch_size
        per = n * max(1, min(CHUNK_BATCHES, len(entries) // (n * len(self.workers))))
        chunks = iter([entries[i:i + per] for i in range(0, len(entries), per)])
        window = CHUNKS_PER_WORKER * len(self.workers)
        pending: deque[Any] = deque(self._submit(c) for _, c in zip(range(window), chunks))
        rows: list[Any] = []
        arrays: list[np.ndarray] = []
        while pending:
            gen = pending.popleft()
            if (chunk := next(chunks, None)) is not None:
                pending.append(self._submit(chunk))
            covered, closed = 0, False
            for ref in gen:
                got_rows, pixels, errors, node, now = self.ray.get(ref)
                del ref  # the batch leaves the object store once `pixels` is dropped
                # A replay after a decode worker died skips what was delivered by position:
                # it must line up with it (an input that changed in between would not).
                covered += len(got_rows) + len(errors)
                if now != covered:
                    raise RuntimeError("a decode worker's replay did not line up with its "
                                       "first try (did INPUT change?)")
                self.nodes.add(node)
                for e, reason in errors:
                    on_error(e, reason)
                closed = not got_rows  # every batch has rows: only the closing item has none
                if got_rows:
                    rows += got_rows
                    arrays.append(pixels)
                # Chunks end in short batches where images failed: regroup into full ones,
                # since the model pads every short batch to full size.
                if len(rows) >= n:
                    stacked = np.concatenate(arrays)
                    while len(rows) >= n:
                        yield rows[:n], stacked[:n]
                        rows, stacked = rows[n:], stacked[n:]
                    arrays = [stacked] if len(rows) else []
            if not closed:  # a replay that came up shorter than what was delivered
                raise RuntimeError("a decode worker's chunk ended early (did INPUT change?)")
        if rows:
            yield rows, np.concatenate(arrays)

    def take_nodes(self) -> tuple[str, ...]:
        """The nodes that decoded this actor's batches since the last call."""
        nodes, self.nodes = tuple(sorted(self.nodes)), set()
        return nodes

    def close(self) -> None:
        pass
