"""Stage 1: only the soft prompt trains; resumable; GradNorm-like weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_backbone_as_built, checkpoint_workspace
from safetensors.torch import load_file
from test_store import moto_endpoint, store  # noqa: F401 (fixtures)

import delrec.distill as distill_module
from delrec.distill import DistillConfig, distill, gradnorm_weights
from delrec.errors import DelrecError
from delrec.llm.backbone import build_tiny
from delrec.llm.soft_prompt import SoftPrompt
from delrec.teachers import TeacherConfig, train_teacher

TINY_TEACHER = TeacherConfig(
    model="gru4rec", hidden=16, rnn_hidden=16, max_epochs=2, max_len=20, device="cpu"
)


def tiny_distill_config(**overrides) -> DistillConfig:
    base = dict(
        backbone="tiny-llama",
        device="cpu",
        bf16=False,
        soft_tokens=8,
        history_items=6,
        steps=4,
        batch_size=3,
        warmup_steps=1,
        eval_every=2,
        eval_examples=8,
        checkpoint_every=2,
    )
    return DistillConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def teacher_dir(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "gru4rec"
    train_teacher(synthetic_dir, TINY_TEACHER, out)
    return out


def test_gradnorm_weights():
    weights = gradnorm_weights([torch.full((4,), 1.0), torch.full((4,), 4.0)], alpha=0.5)
    assert sum(weights) == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(2.0)  # (4 / 1) ** 0.5
    assert gradnorm_weights([torch.ones(2), torch.full((2,), 9.0)], alpha=0.0) == [0.5, 0.5]


@pytest.mark.parametrize("backbone", ["tiny-llama", "tiny-t5"])
def test_only_the_soft_prompt_changes(synthetic_dir, synthetic, teacher_dir, tmp_path, backbone):
    out = tmp_path / "distill"
    metrics = distill(synthetic_dir, teacher_dir, tiny_distill_config(backbone=backbone, eval_every=1), out)
    assert {"valid_ta_acc", "valid_rps_acc", "best_valid_acc"} <= set(metrics)
    # The saved backbone is bit-identical to a freshly built one: the LLM did not train.
    saved, fresh = assert_backbone_as_built(out, backbone, synthetic.titles)
    # The best soft prompt is kept: the untrained one exactly when step 0 won, a trained one otherwise.
    initial = SoftPrompt.initialised(8, fresh.get_input_embeddings(), "normal", seed=42).weight
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 5 and all("loss_ta" in h and "loss_rps" in h for h in history[1:])
    final_best = load_file(out / "soft_prompt.safetensors")["weight"]
    assert final_best.shape == (8, saved.hidden_size)
    assert torch.equal(final_best, initial) == (metrics["best_step"] == 0)
    prompt = json.loads((out / "prompt.json").read_text())
    assert prompt["teacher"] == "GRU4Rec" and prompt["backbone_fingerprint"] == saved.fingerprint()


@pytest.mark.parametrize("workspace", ["beside the output", "object store, fresh pod"])
def test_resumes_after_a_crash(synthetic_dir, teacher_dir, tmp_path, monkeypatch, request, caplog, workspace):
    """Locally the rerun resumes from ``<out>.partial``; in a pipeline the retried pod has a fresh disk
    and resumes from the run's prefix in the object store."""
    config = tiny_distill_config(steps=4, eval_every=4)
    straight = tmp_path / "straight"
    distill(synthetic_dir, teacher_dir, config, straight)

    calls = {"n": 0}
    real = distill_module.gradnorm_weights

    def crash_on_third_step(grads, alpha):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed")
        return real(grads, alpha)

    checkpoint, prefix_store = checkpoint_workspace(request, monkeypatch, workspace, "distill")
    resumed = tmp_path / "pod1" / "resumed"
    monkeypatch.setattr(distill_module, "gradnorm_weights", crash_on_third_step)
    with pytest.raises(RuntimeError, match="killed"):
        distill(synthetic_dir, teacher_dir, config, resumed, checkpoint=checkpoint)
    assert not resumed.exists() and (tmp_path / "pod1" / "resumed.partial" / "state.pt").is_file()
    if prefix_store is not None:
        assert prefix_store.list(checkpoint) == ["state.pt"]
        shutil.rmtree(tmp_path / "pod1")  # the pod's disk is gone with it
        resumed = tmp_path / "pod2" / "resumed"
    monkeypatch.setattr(distill_module, "gradnorm_weights", real)
    with caplog.at_level("INFO", logger="delrec.artifacts"):
        distill(synthetic_dir, teacher_dir, config, resumed, checkpoint=checkpoint)
    assert "resuming from" in caplog.text  # not started again at step 1
    assert not resumed.with_name("resumed.partial").exists()
    if prefix_store is not None:
        assert prefix_store.list(checkpoint) == []
    # Same losses at every step (steps 3-4 depend on the restored soft prompt and Lion state).
    losses = [
        [(h["loss_ta"], h["loss_rps"]) for h in json.loads((d / "history.json").read_text())[1:]]
        for d in (straight, resumed)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a = load_file(straight / "soft_prompt.safetensors")["weight"]
    b = load_file(resumed / "soft_prompt.safetensors")["weight"]
    assert torch.equal(a, b)


def test_refuses_a_teacher_of_another_dataset(synthetic_dir, tmp_path, tmp_path_factory):
    from delrec.data import PreprocessConfig, preprocess

    other = tmp_path / "other"
    preprocess(PreprocessConfig(dataset="synthetic", synthetic_users=80, synthetic_items=50, seed=1), other)
    teacher = tmp_path / "teacher"
    train_teacher(other, TINY_TEACHER, teacher)
    with pytest.raises(DelrecError, match="dataset"):
        distill(synthetic_dir, teacher, tiny_distill_config(), tmp_path / "out")


def _untrained_prompt(synthetic) -> torch.Tensor:
    """The soft prompt distill starts from (tiny_distill_config: 8 tokens, normal init, seed 42)."""
    fresh, _ = build_tiny("tiny-llama", synthetic.titles)
    return SoftPrompt.initialised(8, fresh.get_input_embeddings(), "normal", seed=42).weight.detach()


def _record_last_trained_prompt(monkeypatch) -> dict:
    """{"weight": the soft prompt as training left it}, read just before distill puts the best one back."""
    last = {}
    keep_best = distill_module._keep_best

    def recording(result, soft):
        last["weight"] = soft.weight.detach().clone()
        keep_best(result, soft)

    monkeypatch.setattr(distill_module, "_keep_best", recording)
    return last


def _fake_validation(monkeypatch, perfect):
    """instance_ranks answers every validation instance right (rank 0) or wrong (rank 5): one value of
    ``perfect`` per call (TA, then RPS, at each evaluation)."""
    original = distill_module.instance_ranks

    def fake_ranks(*args, **kwargs):
        ranks = original(*args, **kwargs)
        return ranks * 0 if next(perfect) else ranks * 0 + 5

    monkeypatch.setattr(distill_module, "instance_ranks", fake_ranks)


def test_a_tie_with_the_untrained_prompt_keeps_the_trained_one(
    synthetic_dir, synthetic, teacher_dir, tmp_path, caplog, monkeypatch
):
    # lr ~ 0 leaves every accuracy as it was at step 0: the tie goes to the trained (later) prompt.
    config = tiny_distill_config(lr=1e-12, steps=2, eval_every=100)
    with caplog.at_level("WARNING"):
        metrics = distill(synthetic_dir, teacher_dir, config, tmp_path / "d")
    assert "NO LEARNING" not in caplog.text
    assert metrics["best_step"] == 2  # unchanged accuracy: the tie goes to the trained prompt
    assert metrics["valid_acc_step0"] == pytest.approx(metrics["best_valid_acc"])
    # lr 1e-12 leaves the weights bit-identical too; to see which prompt is saved, train for real and
    # make both evaluations score the same.
    _fake_validation(monkeypatch, iter([False] * 4))
    last = _record_last_trained_prompt(monkeypatch)
    metrics = distill(
        synthetic_dir, teacher_dir, tiny_distill_config(steps=2, eval_every=100), tmp_path / "e"
    )
    assert metrics["best_step"] == 2 and metrics["valid_acc_step0"] == metrics["best_valid_acc"]
    saved = load_file(tmp_path / "e" / "soft_prompt.safetensors")["weight"]
    assert not torch.equal(last["weight"], _untrained_prompt(synthetic))  # training moved the prompt
    assert torch.equal(saved, last["weight"])


def test_step_zero_winning_warns_and_keeps_the_untrained_prompt(
    synthetic_dir, synthetic, teacher_dir, tmp_path, caplog, monkeypatch
):
    _fake_validation(monkeypatch, iter([True, False, False, False]))  # step 0 perfect, step 2 worse
    last = _record_last_trained_prompt(monkeypatch)
    with caplog.at_level("WARNING"):
        metrics = distill(
            synthetic_dir, teacher_dir, tiny_distill_config(steps=2, eval_every=100), tmp_path / "d"
        )
    assert metrics["best_step"] == 0
    assert "NO LEARNING" in caplog.text
    saved = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert saved["best_step"] == 0
    # The saved prompt is the untrained one, not the one training ended with.
    initial = _untrained_prompt(synthetic)
    assert not torch.equal(last["weight"], initial)
    assert torch.equal(load_file(tmp_path / "d" / "soft_prompt.safetensors")["weight"], initial)
