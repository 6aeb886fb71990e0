"""The training job: the dense head over streamed features, evaluation, and export."""

from .features import FeatureDataError, FeatureDataset
from .head import HeadConfig
from .job import TrainOptions, check_train, dumps, evaluate, format_metrics, run_train, train_head

__all__ = ["FeatureDataError", "FeatureDataset", "HeadConfig", "TrainOptions", "check_train",
           "dumps", "evaluate", "format_metrics", "run_train", "train_head"]
