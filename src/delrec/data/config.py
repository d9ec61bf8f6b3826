"""The preprocess stage's config (its own module: the source resolution and the stage both read it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from delrec.config import StageConfig


class PreprocessConfig(StageConfig):
    """Config of the preprocess stage."""

    dataset: str = "synthetic"
    """ml-100k | ml-1m | beauty | home-kitchen | steam | steam-llara | generic | synthetic"""
    source: str | None = None
    """local path, http(s)/file URL or s3:// URI; None: the dataset's default download (cached)"""
    format: str | None = None
    """movielens | recbole | amazon-json | steam | sequences | llara | generic | synthetic; None: the dataset's"""
    domain: Literal["movies", "games", "products"] | None = None
    """what the items are (sets the prompt verb); None: the dataset's (generic: products)"""
    split: Literal["loo", "user", "given"] | None = None
    """loo: each user's last item is test, the one before valid; user: 80/10/10 of users, a held-out
    user's last item is its target; given: the source's own split of users (format llara), where valid
    and test users' histories also train (their targets never do); None: given for a source split by
    user, else loo"""
    seed: int = Field(42, ge=0)
    num_candidates: int = Field(20, ge=2)
    max_history: int = Field(50, ge=1)
    """examples keep this many most recent history items (a held-out user's example under the user split
    keeps all: the items rankings and recommendations leave out)"""
    kcore: int | None = Field(None, ge=0)
    """k-core filter on users and items; None: the dataset's default (5 for Amazon and Steam, else off)"""
    min_user_interactions: int = Field(3, ge=3)
    """users with fewer interactions (after filtering) are dropped: they give no test example"""
    synthetic_users: int = Field(200, ge=1)
    synthetic_items: int = Field(120, ge=2)
    synthetic_themes: int = Field(6, ge=1, le=8)

    @model_validator(mode="after")
    def _synthetic_reads_no_source(self) -> PreprocessConfig:
        # Else a run on --data/--source with the synthetic dataset trains on generated data while its
        # manifest names the user's files.
        if self.source and (self.format or self.dataset) == "synthetic":
            raise ValueError(
                f"source {self.source!r} given, but the synthetic dataset is generated and reads none: "
                "name the dataset (dataset: ml-100k, generic, ...) or drop the source"
            )
        return self
