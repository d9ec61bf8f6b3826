"""The one resumable training loop of the training stages (teacher, distill, finetune).

A stage hands the loop its step and evaluation functions and a way to save and restore its trainable
state; the loop owns what every stage needs the same way: the run key that a checkpoint must match,
per-step seeds (a resumed run draws the same batches and dropout masks as an uninterrupted one), the
evaluation and checkpoint cadence, the best evaluated state, early stopping, the history and the
progress bar. The teacher's step is an epoch; it carries its own random state in its checkpoint
(``reseed=False``), which keeps its figures those of the epoch loop it replaced.

Under torchrun (:mod:`delrec.distributed`) every rank runs the loop in step: rank 0 reads the checkpoint
and hands its state to the others (so the ranks start equal, resumed or not, whatever world size wrote
the checkpoint), only rank 0 writes checkpoints, and the stage's ``step`` and ``evaluate`` return the
same records on every rank.

Checkpoints hold tensors and plain types only, so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from delrec import distributed
from delrec.checkpoints import Checkpoints

log = logging.getLogger(__name__)

Record = dict[str, float]
State = dict[str, Any]


@dataclass
class LoopResult:
    history: list[Record]
    best_step: int
    """the step whose evaluation scored best (ties go to the later step); 0 = the untrained state"""
    best_score: float
    best_state: State | None
    """``snapshot()`` taken at ``best_step`` (None when no evaluation ran)"""
    resumed_from: int = 0
    stopped: str = "steps"
    """why training ended: "steps" (all ran) or the reason ``stop`` gave"""


@dataclass
class TrainLoop:
    """Run ``step(step, rng)`` for ``steps`` steps, evaluating every ``eval_every`` and at the end.

    ``step`` performs one optimisation step and returns its record (losses, lr, ...); ``evaluate``
    returns validation figures; ``score`` picks the figure that decides the best state (None: no best
    tracking); ``state``/``restore`` save and load everything trainable (parameters, optimiser,
    scheduler); ``snapshot`` copies what is kept of the best state. ``stop(history, best_step)``, asked
    after each step (and on resuming), returns a reason to end early or None; ``after_step(step,
    record)`` runs once the step's checkpoint is saved (an exception there stops the run, which a later
    run resumes).
    """

    name: str
    steps: int
    seed: int
    stream: int
    """a number of this stage, so two stages with one seed draw different batches"""
    run_key: Mapping[str, str]
    checkpoints: Checkpoints
    step: Callable[[int, np.random.Generator], Record]
    state: Callable[[], State]
    restore: Callable[[State], None]
    evaluate: Callable[[], Record] | None = None
    score: Callable[[Record], float] | None = None
    snapshot: Callable[[], State] | None = None
    eval_every: int = 100
    checkpoint_every: int = 50
    postfix: tuple[str, ...] = ("loss",)
    stop: Callable[[list[Record], int], str | None] | None = None
    after_step: Callable[[int, Record], None] | None = None
    evaluate_first: bool = True
    """evaluate the untrained state as step 0"""
    reseed: bool = True
    """seed torch from (seed, stream, step) before each step; False: the stage keeps its own RNG state"""
    unit: str = "step"
    _best: dict[str, Any] = field(default_factory=dict, init=False)

    def _consider(self, step: int, record: Record) -> None:
        if self.score is None:
            return
        score = float(self.score(record))
        if not self._best or score >= self._best["score"]:
            snap = self.snapshot() if self.snapshot is not None else None
            self._best = {"step": step, "score": score, "state": snap}

    def run(self) -> LoopResult:
        history: list[Record] = []
        start = 0
        saved = distributed.broadcast_object(
            self.checkpoints.load(self.run_key) if distributed.is_main() else None
        )
        if saved is not None:
            self.restore(saved["stage"])
            start, history, self._best = int(saved["step"]), list(saved["history"]), dict(saved["best"])
            log.info("%s: resuming after %s %d of %d", self.name, self.unit, start, self.steps)
        else:
            if distributed.world_size() > 1:
                self.restore(distributed.broadcast_object(self.state()))  # every rank starts from rank 0's
            if self.evaluate is not None and self.evaluate_first:
                record = {"step": 0, **self.evaluate()}
                log.info("%s step 0: %s", self.name, _fmt(record))
                history.append(record)
                self._consider(0, record)
        stopped = self._stop_reason(history)
        progress = tqdm(
            range(start, self.steps),
            desc=self.name,
            initial=start,
            total=self.steps,
            unit=self.unit,
            mininterval=5,
            disable=not distributed.is_main() or stopped is not None,
        )
        for step in progress:
            if stopped is not None:
                break
            rng = np.random.default_rng([self.seed, self.stream, step])
            if self.reseed:
                torch.manual_seed(distributed.rank_seed(self.seed * 1_000_003 + self.stream * 7919 + step))
            record = {"step": step + 1, **self.step(step, rng)}
            done = step + 1
            if self.evaluate is not None and (done % self.eval_every == 0 or done == self.steps):
                record.update(self.evaluate())
                self._consider(done, record)
                log.info("%s %s %d: %s", self.name, self.unit, done, _fmt(record))
            progress.set_postfix({k: f"{record[k]:.3f}" for k in self.postfix if k in record})
            history.append(record)
            if done % self.checkpoint_every == 0 and done < self.steps and distributed.is_main():
                self.checkpoints.save(
                    {
                        "run_key": dict(self.run_key),
                        "step": done,
                        "stage": self.state(),
                        "history": history,
                        "best": self._best,
                    },
                )
            if self.after_step is not None:
                self.after_step(done, record)
            stopped = self._stop_reason(history)
        progress.close()
        if stopped is not None:
            log.info("%s stopped after %s %d: %s", self.name, self.unit, history[-1]["step"], stopped)
        best = self._best or {"step": self.steps, "score": float("nan"), "state": None}
        return LoopResult(
            history, int(best["step"]), float(best["score"]), best["state"], start, stopped or "steps"
        )

    def _stop_reason(self, history: list[Record]) -> str | None:
        if self.stop is None or not history:
            return None
        return self.stop(history, int(self._best.get("step", 0)))


def _fmt(record: Record) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")


def optimiser_state(
    params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler
) -> State:
    """The trainable parameters (detached CPU copies), optimiser and scheduler state."""
    return {
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def restore_optimiser_state(
    state: State, params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler
) -> None:
    with torch.no_grad():
        for name, value in state["params"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
