"""Datasets: download, parse, clean, split and the on-disk Dataset artifact."""

from delrec.data.dataset import Dataset, load_dataset
from delrec.data.preprocess import PreprocessConfig, preprocess

__all__ = ["Dataset", "PreprocessConfig", "load_dataset", "preprocess"]
