"""Which datasets delrec knows and where a dataset's raw files come from.

The registry (:data:`DATASETS`: each name's default format, domain, k-core and download) and the
source resolution (:func:`read_raw`: a local path, a cached URL download or an ``s3://`` prefix, read
with the format's reader) live here, apart from the readers (``formats``) and the stage
(``preprocess``), so that neither of those imports the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from delrec.data.config import PreprocessConfig
from delrec.data.download import local_source, redact_url
from delrec.data.formats import FORMATS, read_path
from delrec.data.raw import RawData
from delrec.errors import DelrecError


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset name means: its default format, domain, k-core and download."""

    format: str
    domain: str  # movies | games | products
    kcore: int = 0  # default k-core filter (0: off)
    url: str | None = None  # default source
    checksums: Mapping[str, str] = field(default_factory=dict)  # sha256 of files inside the download


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
DATASETS: dict[str, DatasetInfo] = {
    "ml-100k": DatasetInfo(
        "movielens",
        "movies",
        url=f"{GROUPLENS}/ml-100k.zip",
        # The zip's own hash is not recorded here; these are the files GroupLens ships inside it.
        checksums={
            "u.data": "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
            "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
        },
    ),
    "ml-1m": DatasetInfo("movielens", "movies", url=f"{GROUPLENS}/ml-1m.zip"),
    "beauty": DatasetInfo("recbole", "products", kcore=5),
    "home-kitchen": DatasetInfo("recbole", "products", kcore=5),
    # Raw Steam reviews are very sparse; SASRec's preprocessing keeps users and items with 5+.
    "steam": DatasetInfo("steam", "games", kcore=5),
    # LLaRA's Steam windows: already filtered and split by user; its data ships as pandas pickles, which
    # delrec never unpickles, so there is no default download (pass the converted .jsonl folder).
    "steam-llara": DatasetInfo("llara", "games"),
    "generic": DatasetInfo("generic", "products"),
    "synthetic": DatasetInfo("synthetic", "movies"),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DelrecError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}", field="dataset")
    return DATASETS[name]


def resolve_format(config: PreprocessConfig) -> str:
    """The format to read: ``config.format`` or the dataset's default; raises on unknown names."""
    info = dataset_info(config.dataset)
    fmt = config.format or info.format
    if fmt not in FORMATS and fmt != "synthetic":
        raise DelrecError(
            f"unknown format {fmt!r}; known: {', '.join([*FORMATS, 'synthetic'])}", field="format"
        )
    return fmt


def read_raw(config: PreprocessConfig, *, cache: Path | None = None) -> RawData:
    """Read the configured dataset, fetching its source first if it is a URL or s3:// URI.

    ``raw.source`` is the source with any credentials (``user:password@``, presigned query strings)
    redacted: it goes into stats, manifests and pipeline metadata.
    """
    from delrec.data.synthetic import synthetic_raw

    info = dataset_info(config.dataset)
    fmt = resolve_format(config)
    if fmt == "synthetic":
        raw = synthetic_raw(
            num_users=config.synthetic_users,
            num_items=config.synthetic_items,
            num_themes=config.synthetic_themes,
            seed=config.seed,
        )
    else:
        source = config.source or info.url
        if source is None:
            raise DelrecError(
                f"dataset {config.dataset!r} has no default download: pass --source", field="source"
            )
        # A download (from any URL) named after a known release must be that release; local copies
        # are taken as they are, so a path works offline and edited copies stay usable.
        with local_source(source, cache=cache, checksums=info.checksums) as path:
            raw = read_path(FORMATS[fmt], path)
        raw.source = redact_url(source)
    raw.domain = config.domain or info.domain
    return raw
