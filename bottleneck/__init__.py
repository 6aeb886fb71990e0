"""bottleneck: VGG16 bottleneck features from image buckets on Ray, and a classifier on them."""

import warnings

# pandas looks for the unrelated PyPI package "Bottleneck" under the same import name, finds
# this one, and warns that its version is too old; it then does without, which is right.
warnings.filterwarnings("ignore", message=r"Pandas requires version .* of 'bottleneck'")

__version__ = "0.1.0"
# The pip name. PyPI's unrelated "Bottleneck" installs the same import name; the console
# script checks this marker to tell the two apart.
__distribution__ = "vgg-bottleneck"

from .api import (  # noqa: E402 - after the filter, which must be in place first
    TrainResult,
    evaluate,
    extract,
    load_classifier,
    predict,
    read_features,
    train,
)
from .errors import UsageError  # noqa: E402

__all__ = ["TrainResult", "UsageError", "evaluate", "extract", "load_classifier", "predict",
           "read_features", "train"]
