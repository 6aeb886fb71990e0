"""The output contract: feature settings, the Arrow schema of shards and errors, and metadata.

Other parts (training, prediction) and other tools (pandas, DuckDB, Spark) rely on it.
Pure pyarrow: no TensorFlow, no Ray.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from .images import PREPROCESSING

METADATA_KEY = b"bottleneck"
FORMAT_VERSION = 1
MODEL_NAME = "vgg16 (keras.applications, include_top=False)"
POOLINGS = ("none", "avg", "max")
DTYPES = ("float32", "float16")

ERRORS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string())])


def feature_shape(image_size: int, pooling: str) -> tuple[int, ...]:
    """VGG16 without its top: five 2×2 poolings, 512 channels; pooled features are 512 values."""
    if pooling != "none":
        return (512,)
    side = image_size
    for _ in range(5):
        side //= 2
    return (side, side, 512)


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that decides what a feature vector means. Mixing two settings is an error."""

    weights: str  # "imagenet", "random:<seed>", or "sha256:<hex>" of a weights file
    image_size: int = 224
    interpolation: str = "bilinear"
    pooling: str = "none"
    dtype: str = "float32"
    jpeg_draft: bool = False
    precision: str = "float32"  # Keras dtype policy of the conv base
    model: str = MODEL_NAME
    preprocessing: str = PREPROCESSING

    @property
    def shape(self) -> tuple[int, ...]:
        return feature_shape(self.image_size, self.pooling)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureSettings":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def differences(self, other: "FeatureSettings") -> list[str]:
        """Human-readable list of what differs, e.g. ["image_size: 224 != 64"]."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in a if a[k] != b[k]]


@dataclass
class DatasetMetadata:
    settings: FeatureSettings
    # The labels of this file's shard. The dataset's whole class list, with counts, is in
    # OUTPUT's _SUCCESS.json and _plan/_listed.json (known only once INPUT is listed).
    labels: list[str] = field(default_factory=list)
    # Where a weights file was read from (settings.weights holds its sha256), so that
    # `train` finds it again for the exported classifier.
    weights_url: str | None = None

    def to_json(self) -> bytes:
        d = {
            "format_version": FORMAT_VERSION,
            "settings": self.settings.to_dict(),
            "feature_shape": list(self.settings.shape),
            "labels": self.labels,
        }
        if self.weights_url:
            d["weights_url"] = self.weights_url
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "DatasetMetadata":
        d = json.loads(raw)
        return cls(settings=FeatureSettings.from_dict(d["settings"]), labels=list(d["labels"]),
                   weights_url=d.get("weights_url"))


def arrow_dtype(dtype: str) -> pa.DataType:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    return pa.float32() if dtype == "float32" else pa.float16()


def feature_schema(meta: DatasetMetadata) -> pa.Schema:
    s = meta.settings
    return pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.string()),
            ("features", pa.list_(arrow_dtype(s.dtype), s.size)),
        ],
        metadata={METADATA_KEY: meta.to_json()},
    )


def read_metadata(schema: pa.Schema) -> DatasetMetadata:
    """The bottleneck metadata of a Parquet schema; ValueError if it has none."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError("not a bottleneck feature dataset (no 'bottleneck' schema metadata)")
    return DatasetMetadata.from_json(raw)
