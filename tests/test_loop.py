"""The shared resumable training loop: seeds, cadence, best state, resume."""

from __future__ import annotations

import pytest
import torch

from delrec.checkpoints import Checkpoints
from delrec.llm.optim import Lion, linear_warmup
from delrec.loop import TrainLoop, optimiser_state, restore_optimiser_state


def _make_loop(partial, steps=6, crash_at=None, scores=None):
    """A one-parameter regression trained with Lion; ``scores`` fakes the validation figure by step.

    ``partial``: the checkpoint folder, or a :class:`Checkpoints` (one mirrored to the object store)."""
    weight = torch.nn.Parameter(torch.zeros(3))
    params = {"w": weight}
    optimizer = Lion([weight], lr=0.1)
    scheduler = linear_warmup(optimizer, 2, steps)
    evaluated = []

    def step(index, rng):
        if crash_at is not None and index == crash_at:
            raise KeyboardInterrupt
        target = torch.as_tensor(rng.normal(size=3), dtype=torch.float32) + torch.randn(3) * 0.01
        loss = ((weight - target) ** 2).sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return {"loss": loss.item()}

    def evaluate():
        evaluated.append(len(evaluated))
        return {"acc": scores[len(evaluated) - 1] if scores else float(-weight.detach().abs().sum())}

    loop = TrainLoop(
        name="t",
        steps=steps,
        seed=3,
        stream=1,
        run_key={"config": "abc"},
        checkpoints=partial if isinstance(partial, Checkpoints) else Checkpoints(partial),
        step=step,
        state=lambda: optimiser_state(params, optimizer, scheduler),
        restore=lambda saved: restore_optimiser_state(saved, params, optimizer, scheduler),
        evaluate=evaluate,
        score=lambda r: r["acc"],
        snapshot=lambda: {"w": weight.detach().clone()},
        eval_every=2,
        checkpoint_every=2,
    )
    return loop, weight


def test_evaluates_at_step_zero_every_eval_every_and_at_the_end(tmp_path):
    loop, _ = _make_loop(tmp_path / "p", steps=5)
    history = loop.run().history
    assert [r["step"] for r in history if "acc" in r] == [0, 2, 4, 5]
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4, 5]


def test_ties_keep_the_later_state_and_step_zero_can_win(tmp_path):
    loop, _ = _make_loop(tmp_path / "a", steps=4, scores=[0.5, 0.5, 0.25])
    assert loop.run().best_step == 2  # tie of step 0 and step 2: the trained state
    loop, _ = _make_loop(tmp_path / "b", steps=4, scores=[0.75, 0.5, 0.25])
    result = loop.run()
    assert result.best_step == 0 and result.best_score == 0.75
    assert torch.equal(result.best_state["w"], torch.zeros(3))


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    whole, whole_weight = _make_loop(tmp_path / "whole", steps=6)
    expected = whole.run()
    killed, _ = _make_loop(tmp_path / "resumed", steps=6, crash_at=5)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert (tmp_path / "resumed" / "state.pt").is_file()
    # the checkpoint holds tensors and plain types only
    torch.load(tmp_path / "resumed" / "state.pt", weights_only=True)
    resumed, resumed_weight = _make_loop(tmp_path / "resumed", steps=6)
    result = resumed.run()
    assert result.resumed_from == 4
    assert torch.equal(resumed_weight, whole_weight)
    assert [r["loss"] for r in result.history[1:]] == [r["loss"] for r in expected.history[1:]]
    assert result.best_step == expected.best_step


def test_a_checkpoint_of_another_run_is_ignored(tmp_path):
    first, _ = _make_loop(tmp_path / "p", steps=6, crash_at=5)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    other, _ = _make_loop(tmp_path / "p", steps=6)
    other.run_key = {"config": "different"}
    assert other.run().resumed_from == 0


def test_a_stop_reason_ends_training_and_a_resumed_stopped_run_trains_no_more(tmp_path):
    # validation gets worse after step 2: with a patience of one evaluation the loop stops at step 4
    scores = [0.1, 0.5, 0.25, 0.2, 0.1]

    def patience(history, best_step):
        return "patience" if sum(1 for r in history if "acc" in r and r["step"] > best_step) >= 1 else None

    seen = []

    def kill_after_stop(step, record):
        seen.append(step)
        if step == 4:
            raise KeyboardInterrupt  # after the checkpoint of the step that stops training

    loop, _ = _make_loop(tmp_path / "p", steps=8, scores=scores)
    loop.stop, loop.after_step = patience, kill_after_stop
    with pytest.raises(KeyboardInterrupt):
        loop.run()
    assert seen == [1, 2, 3, 4]
    resumed, _ = _make_loop(tmp_path / "p", steps=8, scores=scores)
    resumed.stop = patience
    result = resumed.run()
    assert (result.resumed_from, result.stopped, result.best_step) == (4, "patience", 2)
    assert [r["step"] for r in result.history] == [0, 1, 2, 3, 4]


def test_without_reseeding_the_stage_keeps_its_own_random_stream(tmp_path):
    draws = {}
    for reseed in (True, False):
        torch.manual_seed(7)
        loop, _ = _make_loop(tmp_path / str(reseed), steps=2)
        loop.reseed, loop.evaluate = reseed, None
        inner = loop.step
        loop.step = lambda index, rng, inner=inner: {"draw": torch.rand(()).item(), **inner(index, rng)}
        draws[reseed] = [r["draw"] for r in loop.run().history]
    torch.manual_seed(7)
    expected = []
    for _ in range(2):  # each step draws once, then the regression's noise (randn(3))
        expected.append(torch.rand(()).item())
        torch.randn(3)
    assert draws[False] == expected  # torch's own stream, untouched by the loop
    assert draws[True] != draws[False]
