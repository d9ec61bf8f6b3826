"""Training and evaluation instances: a prompt, its 20 candidate items and the answer's position.

Candidate sets of training instances are sampled here with a seeded generator (TA: the hidden item +
19 sampled; RPS: the teacher's top-10 + 10 sampled; stage 2: the target + 19 sampled), excluding the
user's history items. Validation and test instances of stage 2 use the dataset's stored candidate sets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delrec import layout
from delrec.artifacts import read_manifest
from delrec.data import Dataset
from delrec.data.dataset import Examples
from delrec.errors import DelrecError
from delrec.llm.templates import EncodedPrompt, PromptBuilder

TEACHER_NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser"}
TA_MIN_HISTORY = 5


@dataclass(frozen=True)
class Instance:
    prompt: EncodedPrompt
    candidates: np.ndarray  # (C,) item ids
    answer: int  # index of the right answer in ``candidates``


def teacher_name(teacher_dir: str | os.PathLike) -> str:
    """The teacher's display name (SASRec, GRU4Rec, Caser) from its folder."""
    manifest = read_manifest(teacher_dir, producer=layout.TRAIN_TEACHER)
    model = manifest.get("model")
    if model is None:
        config_path = Path(teacher_dir) / layout.CONFIG_JSON
        model = (
            json.loads(config_path.read_text()).get("teacher", {}).get("model")
            if config_path.is_file()
            else None
        )
    if model is None:
        raise DelrecError("the teacher's model name is missing", path=teacher_dir, field="model")
    return TEACHER_NAMES.get(str(model).lower(), str(model))


def sample_candidates(
    rng: np.random.Generator, keep: Sequence[int], exclude: set[int], num_items: int, count: int
) -> np.ndarray:
    """``keep`` plus items sampled outside ``exclude`` up to ``count``, shuffled.

    Falls back to sampling from excluded items (never from ``keep``) when too few are left.
    """
    keep = [int(i) for i in keep]
    taken = set(keep)
    pool_size = num_items - len(exclude | taken)
    need = count - len(keep)
    if num_items - len(taken) < need:
        raise DelrecError(f"{num_items} items cannot fill {count} distinct candidates")
    blocked = exclude | taken if pool_size >= need else taken
    chosen: list[int] = []
    while len(chosen) < need:
        for item in rng.integers(1, num_items + 1, size=2 * need + 8).tolist():
            if item not in blocked:
                blocked.add(item)
                chosen.append(item)
                if len(chosen) == need:
                    break
    out = np.array(keep + chosen, dtype=np.int64)
    rng.shuffle(out)
    return out


def _instance(prompt: EncodedPrompt, candidates: np.ndarray, answer_item: int) -> Instance:
    return Instance(prompt, candidates, int(np.flatnonzero(candidates == answer_item)[0]))


def ta_instance(
    builder: PromptBuilder,
    rng: np.random.Generator,
    history: np.ndarray,
    next_item: int,
    num_items: int,
    num_candidates: int = 20,
) -> Instance:
    """Temporal Analysis on ``history`` (at least 5 items): which item was the most recent one?"""
    history = history[-builder.history_items :]
    hidden = int(history[-1])
    cands = sample_candidates(
        rng, [hidden], set(history.tolist()) | {int(next_item)}, num_items, num_candidates
    )
    return _instance(builder.ta(history, cands, int(next_item)), cands, hidden)


def rps_instance(
    builder: PromptBuilder,
    rng: np.random.Generator,
    history: np.ndarray,
    teacher_top: np.ndarray,
    num_items: int,
    num_candidates: int = 20,
) -> Instance:
    """Recommendation Pattern Simulating: the teacher's top-1 given its ranks 2-10."""
    top = [int(i) for i in teacher_top]
    cands = sample_candidates(rng, top, set(history.tolist()), num_items, num_candidates)
    return _instance(builder.rps(history, cands, top), cands, top[0])


def stage2_instance(
    builder: PromptBuilder,
    history: np.ndarray,
    target: int,
    *,
    candidates: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    num_items: int = 0,
    num_candidates: int = 20,
    soft: bool = True,
) -> Instance:
    """The stage-2 prompt for history -> target; candidates given (stored sets) or sampled."""
    if candidates is None:
        candidates = sample_candidates(rng, [int(target)], set(history.tolist()), num_items, num_candidates)
    return _instance(builder.stage2(history, candidates, soft=soft), np.asarray(candidates), int(target))


def ta_rows(dataset: Dataset, split: str) -> np.ndarray:
    """Rows of ``split`` whose history is long enough for a TA instance."""
    return np.array(
        [i for i, h in enumerate(dataset.examples[split].histories) if len(h) >= TA_MIN_HISTORY],
        dtype=np.int64,
    )


def answers_of(builder: PromptBuilder, instances: Sequence[Instance]) -> list[list[tuple[int, ...]]]:
    return [[builder.answer(int(i)) for i in inst.candidates] for inst in instances]


def tail_rows(examples: Examples, last: int | None) -> np.ndarray:
    """Rows whose target is among its user's ``last`` training targets (None: every row).

    Test targets sit at the end of a user's sequence; training on prefixes near the end draws
    examples from the same part of the timeline.
    """
    rows = np.arange(len(examples))
    if last is None:
        return rows
    order = np.lexsort(([len(h) for h in examples.histories], examples.users))
    users = examples.users[order]
    # position from the end within each user's run of rows (0 = the user's latest target)
    ends = np.r_[np.flatnonzero(users[1:] != users[:-1]), len(users) - 1]
    end_of_row = ends[np.searchsorted(ends, np.arange(len(users)))]
    from_end = end_of_row - np.arange(len(users))
    return np.sort(order[from_end < last])
