"""The per-shard work: read → decode → preprocess → conv base → write, in one plain class.

`Extractor` knows nothing of Ray: tests call `process_shard` in-process, and
`bottleneck.distribute` wraps the same class in `ray.remote` for the actor pool.
Decoding runs on a small thread pool ahead of inference (Pillow releases the GIL while it
decodes, TensorFlow while it computes), so the conv base never waits for pixels.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .images import DecodeOptions, ImageError, load_image, preprocess
from .planning import Entry, Shard
from .schema import DatasetMetadata, FeatureSettings, feature_schema
from .storage import Storage

ProgressFn = Callable[[int, int, int], None]  # (shard index, images done, errors so far)


@dataclass(frozen=True)
class ExtractConfig:
    """Everything an extractor needs; plain data, so Ray can ship it to actors."""

    settings: FeatureSettings
    weights: Any  # model.WeightsSpec
    output_url: str
    batch_size: int = 32
    threads: int | None = None  # TensorFlow intra-op threads; None: TensorFlow's default
    decode_threads: int = 2
    # repr=False: storage options may hold secrets, and reprs end up in logs.
    input_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    output_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)
    xla: bool = False
    credentials: Any = None  # distribute.Credentials, restored in the worker

    @property
    def decode_options(self) -> DecodeOptions:
        s = self.settings
        return DecodeOptions(s.image_size, s.interpolation, s.jpeg_draft)


@dataclass
class ShardResult:
    index: int
    rows: int
    errors: int
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""  # who ran it (a Ray actor id); empty in-process
    gpu_ids: tuple[str, ...] = ()  # the accelerators Ray gave that worker


def decode_stream(entries: tuple[Entry, ...], read: Callable[[str], bytes],
                  options: DecodeOptions, pool: ThreadPoolExecutor,
                  lookahead: int) -> Iterator[tuple[Entry, np.ndarray | None, str | None]]:
    """Decode entries on `pool`, at most `lookahead` ahead, yielding them in order as
    (entry, pixels, None) or (entry, None, reason)."""
    def one(e: Entry) -> tuple[np.ndarray | None, str | None]:
        try:
            return load_image(e.path, read, options), None
        except ImageError as err:
            return None, str(err)

    pending: deque[tuple[Entry, Future]] = deque()
    it = iter(entries)
    for e in it:
        pending.append((e, pool.submit(one, e)))
        if len(pending) >= lookahead:
            break
    while pending:
        e, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(one, nxt)))
        pixels, reason = fut.result()
        yield e, pixels, reason


def batched_pixels(stream: Iterator[tuple[Entry, np.ndarray | None, str | None]],
                   batch_size: int, on_error: Callable[[Entry, str], None]
                   ) -> Iterator[tuple[list[Entry], np.ndarray]]:
    """Group decoded images into batches of `batch_size`, reporting failures on the way."""
    entries: list[Entry] = []
    arrays: list[np.ndarray] = []
    for e, pixels, reason in stream:
        if pixels is None:
            on_error(e, reason or "unreadable")
            continue
        entries.append(e)
        arrays.append(pixels)
        if len(entries) == batch_size:
            yield entries, np.stack(arrays)
            entries, arrays = [], []
    if entries:
        yield entries, np.stack(arrays)


def prepare_worker(credentials: Any, threads: int | None) -> None:
    """First thing in an actor: the driver's credentials (if any), then TensorFlow's threads."""
    from .model import configure_threads

    if credentials is not None:
        credentials.restore()
    configure_threads(threads)


class ShardImages:
    """Read → decode → batch, ahead of the model: the one image path of extract and predict.

    Holds the decode thread pool and one fsspec filesystem per input protocol, reused
    across shards.
    """

    def __init__(self, storage_options: dict[str, Any], decode: DecodeOptions, batch_size: int,
                 decode_threads: int = 2):
        self.options = storage_options
        self.decode = decode
        self.batch_size = batch_size
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self._readers: dict[str, Storage] = {}

    def _reader(self, url: str) -> Callable[[str], bytes]:
        proto = url.split("://", 1)[0] if "://" in url else "file"
        if proto not in self._readers:
            self._readers[proto] = Storage(url, self.options)
        return self._readers[proto].read_bytes

    def batches(self, entries: tuple[Entry, ...], on_error: Callable[[Entry, str], None]
                ) -> Iterator[tuple[list[Entry], np.ndarray]]:
        """(entries, (n, S, S, 3) float32 RGB 0–255) batches; failures go to `on_error`."""
        if not entries:
            return iter(())
        stream = decode_stream(entries, self._reader(entries[0].url), self.decode, self.pool,
                               lookahead=2 * self.batch_size)
        return batched_pixels(stream, self.batch_size, on_error)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class Extractor:
    """Holds one VGG16 conv base; turns shards into committed Parquet part files."""

    def __init__(self, config: ExtractConfig):
        from .model import BatchRunner, build_conv_base

        prepare_worker(config.credentials, config.threads)
        self.config = config
        self.images = ShardImages(dict(config.input_options), config.decode_options,
                                  config.batch_size, config.decode_threads)
        self.out = Storage(config.output_url, dict(config.output_options))
        self._schemas: dict[tuple[str, ...], Any] = {}
        model = build_conv_base(config.weights, config.settings.image_size, config.settings.pooling,
                                config.settings.precision)
        self.run_model = BatchRunner(model, config.batch_size, xla=config.xla)
        self.np_dtype = np.dtype(config.settings.dtype)

    def schema(self, labels: tuple[str, ...]) -> Any:
        if labels not in self._schemas:
            self._schemas[labels] = feature_schema(DatasetMetadata(self.config.settings, list(labels)))
        return self._schemas[labels]

    def process_shard(self, shard: Shard, labels: tuple[str, ...] = (),
                      progress: ProgressFn | None = None) -> ShardResult:
        """Extract and commit one shard; `labels` is the whole job's label list (metadata)."""
        from .writer import ShardWriter

        t0 = time.perf_counter()
        infer = 0.0
        with ShardWriter(self.out, self.schema(tuple(labels)), shard.index) as writer:
            def on_error(e: Entry, reason: str) -> None:
                writer.add_error(e.url, reason)

            for entries, pixels in self.images.batches(shard.entries, on_error):
                t = time.perf_counter()
                feats = self.run_model(preprocess(pixels))
                infer += time.perf_counter() - t
                feats = feats.reshape(len(entries), -1).astype(self.np_dtype, copy=False)
                writer.write_batch([e.url for e in entries], [e.label for e in entries], feats)
                if progress:
                    progress(shard.index, writer.rows + len(writer.errors), len(writer.errors))
        total = time.perf_counter() - t0
        if progress:
            progress(shard.index, writer.rows + len(writer.errors), len(writer.errors))
        return ShardResult(shard.index, writer.rows, len(writer.errors),
                           {"total": total, "inference": infer})

    def close(self) -> None:
        self.images.close()
