"""Container image names: the one place `make images`, the components and pipeline.py take them from."""

from __future__ import annotations

import os

from delrec import __version__

REGISTRY = os.environ.get("DELREC_IMAGE_REGISTRY", "ghcr.io/delrec")


def cpu_image(tag: str = __version__, registry: str = REGISTRY) -> str:
    """The CPU image (preprocess, train_teacher, evaluate)."""
    return f"{registry}/delrec-cpu:{tag}"


def gpu_image(tag: str = __version__, registry: str = REGISTRY) -> str:
    """The CUDA image (distill, finetune)."""
    return f"{registry}/delrec-gpu:{tag}"


if __name__ == "__main__":  # `python -m delrec.images` prints both, for the Makefile
    print(cpu_image(), gpu_image())
