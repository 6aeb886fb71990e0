"""bottleneck: VGG16 bottleneck features from image buckets on Ray, and a classifier on them."""

__version__ = "0.1.0"
