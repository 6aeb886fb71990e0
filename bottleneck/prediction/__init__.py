"""The prediction job: images → the trained classifier's predictions."""

from .job import PredictOptions, PredictSummary, check_predict, run_predict
from .predictor import PredictConfig, Predictor

__all__ = ["PredictConfig", "PredictOptions", "PredictSummary", "Predictor", "check_predict",
           "run_predict"]
