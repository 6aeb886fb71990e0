"""Stream a Parquet feature dataset for training: settings checks, splits, shuffled batches.

Memory depends on the batch and shuffle-buffer sizes, never on the dataset: rows are read
one row group at a time (the extractor writes a row group per model batch), and at most
`shuffle_buffer` rows are held at once. No TensorFlow here (but in `read_feature_dataset`'s
"tf" form): `training/job.py` wraps these generators in tf.data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UsageError
from ..runner.planning import PART_RE
from ..schema import DatasetMetadata, FeatureSettings, read_metadata
from ..storage import Storage, with_retries

VALIDATION_BUCKETS = 10_000


class FeatureDataError(UsageError):
    """Features that cannot be trained on as asked: mixed settings, null or unknown labels…"""


def in_validation(key: str, fraction: float) -> bool:
    """Deterministic split: a hash of a row's path relative to the dataset's INPUT
    (`FeatureDataset.split_key`), so the same rows are held out every run, and wherever the
    images were copied to (a folder on disk, a bucket)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return (h % VALIDATION_BUCKETS) < fraction * VALIDATION_BUCKETS


@dataclass(frozen=True)
class RowGroupRef:
    path: str  # fsspec path of the part file
    index: int
    rows: int


class FeatureDataset:
    """One bottleneck feature dataset (a folder or bucket prefix of part-*.parquet files)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.store = Storage(url, storage_options)
        self.url = self.store.url
        names = [n for n in self.store.ls_names() if PART_RE.match(n)]
        if not names:
            raise FeatureDataError(f"no bottleneck features (part-*.parquet) in {self.url}")
        self.row_groups: list[RowGroupRef] = []
        self._footers: dict[str, pq.FileMetaData] = {}
        metas: list[tuple[str, DatasetMetadata]] = []
        for n in names:
            path = self.store.path(n)
            md = self._footer(path)
            self._footers[path] = md
            try:
                metas.append((n, read_metadata(md.schema.to_arrow_schema())))
            except ValueError as e:
                raise FeatureDataError(f"{self.store.to_url(path)}: {e}") from None
            self.row_groups += [RowGroupRef(path, i, md.row_group(i).num_rows)
                                for i in range(md.num_row_groups)]
        first_name, first = metas[0]
        for n, m in metas[1:]:
            diffs = m.settings.differences(first.settings)
            if diffs:
                raise FeatureDataError(
                    f"{self.url} mixes features made with different settings "
                    f"({n} vs {first_name}): " + "; ".join(diffs))
        self.metadata = first
        self.rows = sum(r.rows for r in self.row_groups)
        self.input_root = self._input_root()

    def _input_root(self) -> str | None:
        """The INPUT the features were made from, as the manifest records it."""
        from ..runner.manifest import read_manifest

        try:
            manifest = read_manifest(self.store)
        except UsageError:
            return None
        return manifest.input_url.rstrip("/") if manifest else None

    def split_key(self, path: str) -> str:
        """What the validation split hashes: `path` relative to INPUT when it lies there."""
        root = self.input_root
        if root and path.startswith(root + "/"):
            return path[len(root) + 1:]
        return path

    @property
    def settings(self) -> FeatureSettings:
        return self.metadata.settings

    def _footer(self, path: str) -> pq.FileMetaData:
        def read() -> pq.FileMetaData:
            with self.store.fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata
        return with_retries(read)

    def read_row_group(self, ref: RowGroupRef, columns: list[str]) -> pa.Table:
        """One row group, reusing the footer read when the dataset was opened."""
        def read() -> pa.Table:
            with self.store.fs.open(ref.path, "rb") as f:
                pf = pq.ParquetFile(f, metadata=self._footers[ref.path])
                return pf.read_row_group(ref.index, columns=columns)
        return with_retries(read)

    def check_compatible(self, other: "FeatureDataset", what: str = "validation") -> None:
        diffs = other.settings.differences(self.settings)
        if diffs:
            raise FeatureDataError(
                f"{what} features {other.url} were made with other settings than the training "
                f"features {self.url}: " + "; ".join(diffs))

    def iter_labels(self, fraction: float = 0.0, want_validation: bool = False
                    ) -> Iterator[tuple[str, str | None]]:
        """(path, label) of every row of one side of the split, reading only those columns."""
        for ref in self.row_groups:
            t = self.read_row_group(ref, ["path", "label"])
            for p, lab in zip(t.column("path").to_pylist(), t.column("label").to_pylist()):
                if in_validation(self.split_key(p), fraction) == want_validation:
                    yield p, lab

    def batches(self, classes: list[str], batch_size: int, fraction: float = 0.0,
                want_validation: bool = False, shuffle_buffer: int = 0, seed: int = 0,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features (n, *shape) float32, class indices (n,)) batches of one side of the split.

        With `shuffle_buffer` > 0, row groups are visited in a seeded random order and rows
        are drawn at random from a buffer of at most that many rows.
        """
        index = {c: i for i, c in enumerate(classes)}
        shape = self.settings.shape
        rng = np.random.default_rng(seed)
        order = list(self.row_groups)
        if shuffle_buffer:
            rng.shuffle(order)
        buf_x: list[np.ndarray] = []
        buf_y: list[np.ndarray] = []
        held = 0

        def drain(keep: int, final: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            """Emit whole batches until about `keep` rows are left; at the end, everything
            (so a pass yields exactly ceil(rows / batch_size) batches)."""
            nonlocal buf_x, buf_y, held
            x, y = np.concatenate(buf_x), np.concatenate(buf_y)
            if shuffle_buffer:
                perm = rng.permutation(len(x))
                x, y = x[perm], y[perm]
            n_emit = len(x) if final else max(len(x) - keep, 0) // batch_size * batch_size
            for s in range(0, n_emit, batch_size):
                yield x[s:min(s + batch_size, n_emit)], y[s:min(s + batch_size, n_emit)]
            buf_x, buf_y = [x[n_emit:]], [y[n_emit:]]
            held = len(x) - n_emit

        for ref in order:
            t = self.read_row_group(ref, ["path", "label", "features"])
            paths = t.column("path").to_pylist()
            labels = t.column("label").to_pylist()
            mask = np.fromiter((in_validation(self.split_key(p), fraction) == want_validation
                                for p in paths),
                               bool, len(paths))
            if not mask.any():
                continue
            feats = _features_matrix(t.column("features"))[mask].reshape(-1, *shape)
            try:
                y = np.array([index[lab] for lab, m in zip(labels, mask) if m], dtype=np.int32)
            except KeyError as e:
                raise FeatureDataError(
                    f"label {e.args[0]!r} in {ref.path} is not among the training classes "
                    f"{classes}") from None
            buf_x.append(feats)
            buf_y.append(y)
            held += len(y)
            if held >= max(shuffle_buffer, batch_size):
                yield from drain(keep=shuffle_buffer // 2)
        if held:
            yield from drain(keep=0, final=True)


def _features_matrix(col: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_list column → (n, size) float32 without a Python loop."""
    arr = col.combine_chunks()
    size = arr.type.list_size
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, size)


AS = ("numpy", "arrow", "tf")


def read_feature_dataset(url: str, columns: list[str] | None = None, as_: str = "numpy",
                         storage_options: dict | None = None) -> object:
    """A feature dataset's `columns` (default path, label, features) as a pyarrow Table
    ("arrow"), a dict of NumPy arrays with features shaped (rows, *shape) ("numpy"), or a
    tf.data.Dataset of one-row dicts streamed row group by row group ("tf").
    Raises UsageError (FeatureDataError) for an unknown `as_` or a folder with no features."""
    if as_ not in AS:
        raise FeatureDataError(f"as_ must be one of {', '.join(AS)}, not {as_!r}")
    ds = FeatureDataset(url, storage_options)
    columns = list(columns or ["path", "label", "features"])
    unknown = sorted(set(columns) - {"path", "label", "features"})
    if unknown:
        raise FeatureDataError(f"unknown column(s) {', '.join(unknown)}: a feature dataset has "
                               "path, label and features")
    if as_ == "tf":
        return _tf_rows(ds, columns)
    table = pa.concat_tables([ds.read_row_group(r, columns) for r in ds.row_groups])
    if as_ == "arrow":
        return table
    return {c: _features_matrix(table.column(c)).reshape(-1, *ds.settings.shape)
            if c == "features" else np.asarray(table.column(c).to_pylist(), dtype=object)
            for c in columns}


def _tf_rows(ds: FeatureDataset, columns: list[str]) -> object:
    from ..tflog import quiet_tensorflow

    tf = quiet_tensorflow()

    shape = ds.settings.shape

    def rows() -> Iterator[dict]:
        for ref in ds.row_groups:
            t = ds.read_row_group(ref, columns)
            cols = {c: (_features_matrix(t.column(c)).reshape(-1, *shape) if c == "features"
                        else [("" if v is None else v) for v in t.column(c).to_pylist()])
                    for c in columns}
            for i in range(t.num_rows):
                yield {c: cols[c][i] for c in columns}

    spec = {c: tf.TensorSpec(shape, tf.float32) if c == "features" else
            tf.TensorSpec((), tf.string) for c in columns}
    return tf.data.Dataset.from_generator(rows, output_signature=spec)
