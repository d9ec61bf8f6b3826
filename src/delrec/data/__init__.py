"""Datasets: download, parse, clean, split and the on-disk Dataset artifact."""

from delrec.data.config import PreprocessConfig
from delrec.data.dataset import Dataset, load_dataset
from delrec.data.preprocess import preprocess

__all__ = ["Dataset", "PreprocessConfig", "load_dataset", "preprocess"]
