"""Readers: each turns one raw dataset format into RawData, with errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from delrec.data.raw import RawData
from delrec.errors import DelrecError

# dataset name -> (format, domain)
DATASETS = {
    "ml-100k": ("movielens", "movies"),
    "ml-1m": ("movielens", "movies"),
    "synthetic": ("synthetic", "movies"),
}


def read_movielens(path: Path) -> RawData:
    """MovieLens-100K folder (u.data + u.item, latin-1)."""
    data, item = path / "u.data", path / "u.item"
    for f in (data, item):
        if not f.is_file():
            raise DelrecError("missing file (expected a MovieLens folder with u.data and u.item)", path=f)
    users, items, times = [], [], []
    with open(data, encoding="latin-1") as handle:
        for lineno, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 4:
                raise DelrecError(f"expected 4 tab-separated fields, got {len(parts)}", path=f"{data}:{lineno}")
            users.append(parts[0])
            items.append(parts[1])
            times.append(int(parts[3]))
    titles = {}
    with open(item, encoding="latin-1") as handle:
        for line in handle:
            parts = line.split("|")
            titles[parts[0]] = parts[1]
    return RawData(
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(times, dtype=np.int64),
        titles=titles,
        domain="movies",
        source=str(path),
    )


def read_raw(config) -> RawData:
    """Dispatch on the configured dataset/format."""
    from delrec.data.synthetic import synthetic_raw

    if config.dataset not in DATASETS:
        raise DelrecError(f"unknown dataset {config.dataset!r}; known: {', '.join(sorted(DATASETS))}")
    fmt = config.format or DATASETS[config.dataset][0]
    if fmt == "synthetic":
        return synthetic_raw(
            num_users=config.synthetic_users,
            num_items=config.synthetic_items,
            num_themes=config.synthetic_themes,
            seed=config.seed,
        )
    if fmt == "movielens":
        return read_movielens(Path(config.source))
    raise DelrecError(f"unknown format {fmt!r}")
