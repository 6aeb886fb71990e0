"""Extract's per-shard work: the shard's images → conv base → one committed Parquet file.

`Extractor` knows nothing of Ray: tests call `process_shard` in-process, and the runner's
pool builds the same class inside each actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..images import DecodeOptions, ImageBatches, ShardImages, preprocess
from ..runner.output import ShardResult
from ..runner.planning import Entry, Shard
from ..schema import DatasetMetadata, FeatureSettings, feature_schema
from ..storage import Storage
from .writer import ShardWriter

ProgressFn = Any  # (shard index, images done, errors so far) -> None


@dataclass(frozen=True)
class ExtractConfig:
    """Everything an extractor needs; plain data, so Ray can ship it to actors."""

    settings: FeatureSettings
    weights: Any  # model.WeightsSpec
    output_url: str
    batch_size: int = 32
    threads: int | None = None  # TensorFlow intra-op threads; None: TensorFlow's default
    decode_threads: int = 2
    reader: Any = None  # inputs.samples.SampleReader of INPUT's kind; None: image files
    # Recorded conv-base outputs, (n, *feature shape), replayed in place of the conv base:
    # the pipeline-ceiling benchmark's stand-in (tools/bench_ceiling.py), never a user's.
    stand_in: Any = field(default=None, repr=False)
    # repr=False: storage options may hold secrets, and reprs end up in logs.
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    @property
    def decode_options(self) -> DecodeOptions:
        s = self.settings
        return DecodeOptions(s.image_size, s.interpolation, s.jpeg_draft)

    def images(self) -> ShardImages:
        """The shard's image stream: INPUT's reader and the decoder, on `decode_threads`."""
        return ShardImages(dict(self.storage_options), self.decode_options, self.batch_size,
                           self.decode_threads, self.reader)


class Extractor:
    """Holds one VGG16 conv base; turns shards into committed Parquet part files."""

    def __init__(self, config: ExtractConfig, images: ImageBatches | None = None):
        """`images`: where the decoded batches come from (decode workers); default: decoded
        here, `config.images()`."""
        from ..model import BatchRunner, build_conv_base, configure_threads

        configure_threads(config.threads)
        self.config = config
        self.images = images or config.images()
        self.out = Storage(config.output_url, dict(config.storage_options))
        self._schemas: dict[tuple[str, ...], Any] = {}
        s = config.settings
        if config.stand_in is not None:
            self.run_model: Any = Replay(config.stand_in)
        else:
            model = build_conv_base(config.weights, s.image_size, s.pooling, s.precision)
            self.run_model = BatchRunner(model, config.batch_size)
        self.np_dtype = np.dtype(s.dtype)
        self.first_batch: float | None = None  # seconds of the first model call
        self._reported = False

    def schema(self, labels: tuple[str, ...]) -> Any:
        if labels not in self._schemas:
            meta = DatasetMetadata(self.config.settings, list(labels), self.config.weights.url)
            self._schemas[labels] = feature_schema(meta)
        return self._schemas[labels]

    def process_shard(self, shard: Shard, progress: ProgressFn | None = None) -> ShardResult:
        """Extract and commit one shard. Its file's metadata names the labels of the shard's
        plan entries (the whole dataset's are known only once INPUT is listed: `_SUCCESS.json`;
        a tar's only once read: the footer's rows per label)."""
        t0 = time.perf_counter()
        infer = write = 0.0
        labels = tuple(sorted({e.label for e in shard.entries if e.label is not None}))
        with ShardWriter(self.out, self.schema(labels), shard.index) as writer:
            def on_error(e: Entry, reason: str) -> None:
                writer.add_error(e.url, reason)

            for entries, pixels in self.images.batches(shard.entries, on_error):
                t = time.perf_counter()
                feats = self.run_model(preprocess(pixels))
                infer += time.perf_counter() - t
                if self.first_batch is None:  # traces the graph: start-up, not throughput
                    self.first_batch = time.perf_counter() - t
                feats = feats.reshape(len(entries), -1).astype(self.np_dtype, copy=False)
                t = time.perf_counter()
                writer.write_batch([e.url for e in entries], [e.label for e in entries], feats)
                write += time.perf_counter() - t
                if progress:
                    progress(shard.index, writer.rows + len(writer.errors), len(writer.errors))
            t = time.perf_counter()
        write += time.perf_counter() - t  # the commit: footer, errors, upload or rename
        total = time.perf_counter() - t0
        seconds = {"total": total, "inference": infer, "write": write}
        if self.first_batch is not None and not self._reported:
            seconds["first_batch"], self._reported = self.first_batch, True
        return ShardResult(shard.index, writer.rows, len(writer.errors), seconds)

    def close(self) -> None:
        self.images.close()


class Replay:
    """A conv base of no cost: hands out recorded outputs in turn, as many as asked."""

    def __init__(self, recorded: np.ndarray):
        self.recorded = recorded
        self._next = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        idx = (self._next + np.arange(len(batch))) % len(self.recorded)
        self._next = int(idx[-1]) + 1 if len(idx) else self._next
        return self.recorded[idx]
