"""A synthetic dataset with readable titles and a learnable sequential pattern, for tests and the demo.

Items belong to themes (genres). Each theme orders its items in a chain; a user mostly walks that
chain (item k is usually followed by item k+1 of the same theme), sometimes jumps to a random item of
the theme, and now and then switches theme. A sequential model can learn the chain; the titles say
which theme an item belongs to, so an LLM can also use them.
"""

from __future__ import annotations

import numpy as np

from delrec.data.raw import RawData
from delrec.errors import DelrecError

THEMES = {
    "space": ("Star", "Orbit", "Galaxy", "Comet", "Nebula", "Rocket", "Moon", "Planet"),
    "crime": ("Heist", "Alibi", "Detective", "Mob", "Verdict", "Witness", "Alley", "Vault"),
    "romance": ("Kiss", "Wedding", "Letter", "Summer", "Heart", "Promise", "Dance", "Rose"),
    "western": ("Saloon", "Outlaw", "Canyon", "Sheriff", "Frontier", "Rodeo", "Mustang", "Gold"),
    "horror": ("Ghost", "Crypt", "Shadow", "Curse", "Blood", "Manor", "Howl", "Grave"),
    "comedy": ("Picnic", "Prank", "Banana", "Holiday", "Roommate", "Party", "Pickle", "Cousin"),
    "war": ("Battalion", "Trench", "Siege", "Convoy", "Submarine", "Flag", "Front", "Medal"),
    "fantasy": ("Dragon", "Wizard", "Castle", "Elf", "Sword", "Quest", "Crown", "Forest"),
}
ADJECTIVES = ("Silent", "Last", "Golden", "Broken", "Secret", "Wild", "Lost", "Crimson", "Hidden", "Final")


def synthetic_raw(
    num_users: int = 200,
    num_items: int = 120,
    num_themes: int = 6,
    min_len: int = 8,
    max_len: int = 30,
    follow_prob: float = 0.8,
    switch_prob: float = 0.05,
    seed: int = 0,
) -> RawData:
    """Generate users' time-ordered interactions with a strong next-item pattern."""
    if not 1 <= num_themes <= len(THEMES):
        raise DelrecError(f"must be between 1 and {len(THEMES)}, got {num_themes}", field="synthetic_themes")
    if num_items < num_themes * 2:
        raise DelrecError(
            f"must be at least twice synthetic_themes ({2 * num_themes}), got {num_items}",
            field="synthetic_items",
        )
    rng = np.random.default_rng(seed)
    themes = list(THEMES)[:num_themes]
    theme_of = np.arange(num_items) % num_themes
    members = [np.flatnonzero(theme_of == t) for t in range(num_themes)]
    titles = []
    for item in range(num_items):
        nouns = THEMES[themes[theme_of[item]]]
        k = item // num_themes
        titles.append(
            f"{ADJECTIVES[k % len(ADJECTIVES)]} {nouns[(k // len(ADJECTIVES)) % len(nouns)]} {k + 1}"
        )
    users, items, times = [], [], []
    for user in range(num_users):
        length = int(rng.integers(min_len, max_len + 1))
        theme = int(rng.integers(num_themes))
        pos = int(rng.integers(len(members[theme])))
        seen: set[int] = set()
        for step in range(length):
            if rng.random() < switch_prob:
                theme = int(rng.integers(num_themes))
                pos = int(rng.integers(len(members[theme])))
            elif step and rng.random() < follow_prob:
                pos = (pos + 1) % len(members[theme])
            elif step:
                pos = int(rng.integers(len(members[theme])))
            item = int(members[theme][pos])
            if item in seen:  # users do not repeat items: walk on to the next unseen one
                for shift in range(1, num_items + 1):
                    cand = int(members[theme][(pos + shift) % len(members[theme])])
                    if cand not in seen:
                        pos, item = (pos + shift) % len(members[theme]), cand
                        break
                else:
                    break
            if item in seen:
                break
            seen.add(item)
            users.append(f"u{user}")
            items.append(f"i{item}")
            times.append(step)
    return RawData(
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(times, dtype=np.int64),
        titles={f"i{i}": t for i, t in enumerate(titles)},
        domain="movies",
        source="synthetic",
    )
