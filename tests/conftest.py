"""Shared fixtures: a small synthetic dataset folder and the path to ../shared/datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from delrec.data import PreprocessConfig, load_dataset, preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# Several pytest workers or a busy machine: keep torch to one thread so timings stay sane.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic Dataset folder (leave-one-out split)."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    preprocess(PreprocessConfig(dataset="synthetic", synthetic_users=120, synthetic_items=60), out)
    return out


@pytest.fixture(scope="session")
def synthetic(synthetic_dir):
    return load_dataset(synthetic_dir)


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/datasets; skips the test where it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path
