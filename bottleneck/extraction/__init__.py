"""The extraction job: images → VGG16 bottleneck features, one Parquet file per shard."""

from .extractor import ExtractConfig, Extractor
from .job import ExtractOptions, ExtractSummary, check_extract, run_extract

__all__ = ["ExtractConfig", "ExtractOptions", "ExtractSummary", "Extractor", "check_extract",
           "run_extract"]
