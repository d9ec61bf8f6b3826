"""Pieces shared by the two training stages: the task loss, accuracy, and resumable checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from delrec.llm.backbone import Backbone
from delrec.llm.scoring import Reduction, score_all, score_candidates
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import Instance, answers_of
from delrec.llm.templates import PromptBuilder
from delrec.metrics import target_ranks

log = logging.getLogger(__name__)

Objective = Literal["candidates", "likelihood"]


def task_loss(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    builder: PromptBuilder,
    instances: Sequence[Instance],
    objective: Objective,
    reduction: Reduction,
) -> torch.Tensor:
    """``candidates``: cross-entropy over the candidates' scores; ``likelihood``: the answer's NLL."""
    prompts = [inst.prompt for inst in instances]
    if objective == "likelihood":
        answers = [[builder.answer(int(inst.candidates[inst.answer]))] for inst in instances]
        scores = score_candidates(
            backbone, soft_prompt, prompts, answers, reduction=reduction, skip=builder.answer_skip
        )
        return -scores[:, 0].mean()
    scores = score_candidates(
        backbone,
        soft_prompt,
        prompts,
        answers_of(builder, instances),
        reduction=reduction,
        skip=builder.answer_skip,
    )
    target = torch.tensor([inst.answer for inst in instances], device=scores.device)
    return F.cross_entropy(scores, target)


def instance_ranks(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    builder: PromptBuilder,
    instances: Sequence[Instance],
    *,
    reduction: Reduction,
    batch_size: int,
    desc: str,
) -> np.ndarray:
    """0-based rank of each instance's answer among its candidates (ties count against it)."""
    scores = score_all(
        backbone,
        soft_prompt,
        [inst.prompt for inst in instances],
        answers_of(builder, instances),
        batch_size=batch_size,
        reduction=reduction,
        skip=builder.answer_skip,
        desc=desc,
    )
    return target_ranks(scores, np.array([inst.answer for inst in instances]))
