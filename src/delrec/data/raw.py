"""The parsed, not yet cleaned form every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RawData:
    """Interactions as parallel arrays of raw ids, plus raw item id -> title."""

    users: np.ndarray  # raw user ids (object/str)
    items: np.ndarray  # raw item ids (object/str)
    timestamps: np.ndarray  # int64; ties keep file order
    titles: dict[str, str]
    domain: str  # movies | games | products
    source: str  # what was read, for messages and stats
    dropped: dict[str, int] = field(default_factory=dict)  # counts the reader already dropped
    groups: dict[str, str] | None = None
    """raw user id -> train | valid | test, for formats that come split by user (``--split given``)"""

    def __post_init__(self) -> None:
        if not len(self.users) == len(self.items) == len(self.timestamps):
            raise ValueError("users, items and timestamps must have the same length")
