"""Container image names: the one place `make images`, the components and pipeline.py take them from.

KFP's cache key covers the image *string*, not what is inside it, so a pipeline compiled against a tag
that is rebuilt (``:0.1.0``) serves results computed by the old code. The tag here is therefore immutable
by construction: ``<version>-<hash of the image's build inputs>`` (the files the Dockerfiles copy, and
the Dockerfiles), computed from the checkout, so `make images` and ``pipeline.py compile`` agree, the
committed ``pipeline.yaml`` can name it, and an image rebuilt from changed sources gets a new name.
A registry digest (``name@sha256:...``) is immutable too: pass it as ``cpu_image``/``gpu_image``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from delrec import __version__

REGISTRY = os.environ.get("DELREC_IMAGE_REGISTRY", "ghcr.io/delrec")
# What the images are built from (docker/Dockerfile*, .dockerignore): any change is a new image.
BUILD_INPUTS = ("pyproject.toml", "README.md", "docker", "src")
CHECKOUT = Path(__file__).resolve().parents[2]
# name@sha256:<64 hex> or name:<tag>; the tag may not be one that is moved by design.
_DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
_TAGGED = re.compile(r"^[^@\s]+:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")
MUTABLE_TAGS = frozenset({"latest", __version__})


def _build_files(root: Path) -> list[Path]:
    files = []
    for name in BUILD_INPUTS:
        path = root / name
        candidates = sorted(path.rglob("*")) if path.is_dir() else [path]
        files += [
            p
            for p in candidates
            if p.is_file()
            and "__pycache__" not in p.parts
            and p.suffix != ".pyc"
            and not any(part.endswith(".egg-info") for part in p.parts)
        ]
    return files


def source_tag(root: str | os.PathLike = CHECKOUT) -> str:
    """``<version>-<12 hex>``: a hash of the image build inputs under ``root`` (a checkout).

    Outside a checkout (an installed package, inside a task) there is nothing to hash: ``$DELREC_IMAGE_TAG``
    if set, else the bare version (only the component's default ``base_image``; pipelines set the image).
    """
    root = Path(root)
    if not (root / "pyproject.toml").is_file() or not (root / "docker").is_dir():
        return os.environ.get("DELREC_IMAGE_TAG", __version__)
    digest = hashlib.sha256()
    for path in _build_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}-{digest.hexdigest()[:12]}"


def cpu_image(tag: str | None = None, registry: str = REGISTRY) -> str:
    """The CPU image (preprocess, train_teacher, publish)."""
    return f"{registry}/delrec-cpu:{tag or source_tag()}"


def gpu_image(tag: str | None = None, registry: str = REGISTRY) -> str:
    """The CUDA image (distill, finetune, evaluate)."""
    return f"{registry}/delrec-gpu:{tag or source_tag()}"


def immutable_reference(image: str) -> str | None:
    """Why ``image`` may name different contents over time (a cache hazard), or None when it may not:
    a digest, or a tag other than ``latest`` and the bare version."""
    if _DIGEST.match(image):
        return None
    tagged = _TAGGED.match(image.rsplit("/", 1)[-1] if "/" in image else image)
    if not tagged:
        return f"{image!r} has no tag or digest (it means :latest)"
    if tagged["tag"] in MUTABLE_TAGS:
        return f"{image!r} names a tag that is rebuilt in place ({tagged['tag']})"
    return None


if __name__ == "__main__":  # `python -m delrec.images` prints both, for the Makefile
    print(cpu_image(), gpu_image())
