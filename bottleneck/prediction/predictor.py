"""Predict's per-shard work: the shard's images → classifier → a table of predictions.

Reading, decoding and error handling are the one image path (`images.ShardImages`), so a
file that extract reports as unreadable is reported here too. `Predictor` knows nothing of
Ray: the runner's pool builds it inside each actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..images import DecodeOptions, ImageBatches, ShardImages
from ..runner.output import COMPRESSION, ShardResult, write_errors
from ..runner.planning import Entry, Shard, part_name
from ..storage import Storage


@dataclass(frozen=True)
class PredictConfig:
    model_dir: str
    batch_size: int
    top_k: int
    decode: DecodeOptions
    staging_url: str | None = None  # where shards are committed; None: returned to the driver
    threads: int | None = None
    decode_threads: int = 2
    reader: Any = None  # inputs.samples.SampleReader of INPUT's kind; None: image files
    storage_options: tuple[tuple[str, Any], ...] = field(default=(), repr=False)

    def images(self) -> ShardImages:
        """The shard's image stream: INPUT's reader and the decoder, on `decode_threads`."""
        return ShardImages(dict(self.storage_options), self.decode, self.batch_size,
                           self.decode_threads, self.reader)


def prediction_schema(top_k: int) -> pa.Schema:
    fields = [("path", pa.string()), ("prediction", pa.string()), ("probability", pa.float32())]
    if top_k > 1:
        fields += [("top_k_labels", pa.list_(pa.string(), top_k)),
                   ("top_k_probabilities", pa.list_(pa.float32(), top_k))]
    return pa.schema(fields)


class Predictor:
    """Holds the classifier; turns a shard of images into a table of predictions."""

    def __init__(self, config: PredictConfig, images: ImageBatches | None = None):
        """`images`: where the decoded batches come from (decode workers); default: decoded
        here, `config.images()`."""
        from ..model import BatchRunner, configure_threads
        from ..training.head import load_stored_model, read_model_info

        configure_threads(config.threads)
        self.config = config
        options = dict(config.storage_options)
        store = Storage(config.model_dir, options)
        self.classes, _ = read_model_info(store)
        self.run_model = BatchRunner(load_stored_model(store, "classifier.keras"),
                                     config.batch_size)
        self.images = images or config.images()
        self.staged = Storage(config.staging_url, options) if config.staging_url else None

    def process_shard(self, shard: Shard, progress: Any = None) -> ShardResult:
        """Predict one shard; commit it to the staging folder, or return its table."""
        k = min(self.config.top_k, len(self.classes))
        cols: dict[str, list] = {n: [] for n in prediction_schema(k).names}
        errors: list[tuple[str, str]] = []

        def on_error(e: Entry, reason: str) -> None:
            errors.append((e.url, reason))

        for entries, pixels in self.images.batches(shard.entries, on_error):
            probs = self.run_model(pixels)
            order = np.argsort(-probs, axis=1)[:, :k]
            cols["path"] += [e.url for e in entries]
            cols["prediction"] += [self.classes[i] for i in order[:, 0]]
            cols["probability"] += [float(p[i]) for p, i in zip(probs, order[:, 0])]
            if k > 1:
                cols["top_k_labels"] += [[self.classes[i] for i in row] for row in order]
                cols["top_k_probabilities"] += [[float(p[i]) for i in row]
                                                for p, row in zip(probs, order)]
            if progress:
                progress(shard.index, len(cols["path"]) + len(errors), len(errors))
        table = pa.table(cols, schema=prediction_schema(k))
        result = ShardResult(shard.index, table.num_rows, len(errors), error_rows=errors)
        if self.staged is None:
            result.table = table
            return result
        write_errors(self.staged, shard.index, errors)  # first: a part file means done
        with self.staged.open_atomic(part_name(shard.index)) as f:
            pq.write_table(table, f, compression=COMPRESSION)
        return result
