"""Data: finding and checking labelled images, decoding them exactly, and feeding them to models."""

from .decode import ALPHA_BACKGROUND, DecodeError, load_rgb, probe
from .image_ref import ImageRef
from .scan import DataSplits, Sample, find_samples, load_splits
from .transforms import Preprocessing, eval_transform, train_transform

__all__ = ["ALPHA_BACKGROUND", "DataSplits", "DecodeError", "ImageRef", "Preprocessing", "Sample", "eval_transform",
           "find_samples", "load_rgb", "load_splits", "probe", "train_transform"]
