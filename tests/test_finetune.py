"""Stage 2: only adapter weights change, the soft prompt stays identical; AdaLoRA and LoRA; resumable."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_backbone_as_built, checkpoint_workspace
from safetensors.torch import load_file
from test_store import moto_endpoint, store  # noqa: F401 (fixtures)

import delrec.finetune as finetune_module
from delrec import layout
from delrec.artifacts import check_reusable
from delrec.distill import DistillConfig, distill
from delrec.errors import DelrecError
from delrec.finetune import FinetuneConfig, finetune, orthogonal_regulariser, recorded_inputs
from delrec.llm.backbone import load_backbone
from delrec.teachers import TeacherConfig, train_teacher


def tiny_finetune_config(**overrides) -> FinetuneConfig:
    base = dict(
        backbone="tiny-llama",
        device="cpu",
        bf16=False,
        history_items=6,
        init_r=12,
        target_r=4,
        steps=6,
        batch_size=3,
        warmup_steps=1,
        lr=1e-2,
        eval_every=3,
        eval_examples=8,
        checkpoint_every=2,
    )
    return FinetuneConfig(**{**base, **overrides})


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-t5"])
def distill_dir(request, synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"distill-{request.param}")
    teacher = root / "teacher"
    train_teacher(
        synthetic_dir,
        TeacherConfig(model="sasrec", hidden=16, inner=32, layers=1, max_epochs=1, device="cpu"),
        teacher,
    )
    out = root / "distill"
    config = DistillConfig(
        backbone=request.param,
        device="cpu",
        bf16=False,
        soft_tokens=8,
        history_items=6,
        steps=2,
        batch_size=2,
        eval_examples=4,
    )
    distill(synthetic_dir, teacher, config, out)
    return out


@pytest.mark.parametrize("adapter", ["adalora", "lora"])
def test_only_adapter_weights_change(synthetic_dir, synthetic, distill_dir, tmp_path, adapter):
    name = json.loads((distill_dir / "prompt.json").read_text())["backbone"]
    out = tmp_path / "delrec"
    metrics = finetune(
        synthetic_dir, tiny_finetune_config(backbone=name, adapter=adapter), out, distill_dir=distill_dir
    )
    assert "valid_hr1" in metrics
    # Base weights bit-identical to the distilled-on backbone; soft prompt copied unchanged.
    saved, _ = assert_backbone_as_built(out, name, synthetic.titles)
    assert torch.equal(
        load_file(out / "soft_prompt.safetensors")["weight"],
        load_file(distill_dir / "soft_prompt.safetensors")["weight"],
    )
    # The adapter trained: AdaLoRA's singular values (initialised to 0) or LoRA's B (initialised to 0) moved.
    adapter_weights = load_file(out / "adapter" / "adapter_model.safetensors")
    moved = [k for k, v in adapter_weights.items() if ("lora_E" in k or "lora_B" in k) and v.abs().sum() > 0]
    assert moved, sorted(adapter_weights)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("ADALORA" if adapter == "adalora" else "LORA")
    assert set(config["target_modules"]) == ({"q", "v"} if name == "tiny-t5" else {"q_proj", "v_proj"})
    prompt = json.loads((out / "prompt.json").read_text())
    assert prompt["soft_tokens"] == 8 and prompt["backbone_fingerprint"] == saved.fingerprint()
    assert prompt["max_answer_chars"] == prompt["max_title_chars"]  # evaluate scores the answers trained on
    assert prompt["title_years"] is True


def test_finetune_warns_when_it_spells_titles_unlike_the_distillation(
    synthetic_dir, distill_dir, tmp_path, caplog
):
    name = json.loads((distill_dir / "prompt.json").read_text())["backbone"]
    assert json.loads((distill_dir / "prompt.json").read_text())["title_years"] is True
    config = tiny_finetune_config(backbone=name, steps=1, title_years=False)
    with caplog.at_level(logging.WARNING, logger="delrec.finetune"):
        finetune(synthetic_dir, config, tmp_path / "ft", distill_dir=distill_dir)
    assert "title_years is False here but True in the soft prompt's distillation" in caplog.text
    assert json.loads((tmp_path / "ft" / "prompt.json").read_text())["title_years"] is False


def test_adalora_reallocates_ranks(synthetic_dir, tmp_path, monkeypatch):
    calls = []
    from peft.tuners.adalora.model import AdaLoraModel

    original = AdaLoraModel.update_and_allocate

    def spy(self, step):
        calls.append(step)
        return original(self, step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", spy)
    ft = tiny_finetune_config(steps=10, tinit=2, tfinal=3)
    finetune(synthetic_dir, ft, tmp_path / "ablation")
    assert calls == list(range(10))
    config = json.loads((tmp_path / "ablation" / "adapter" / "adapter_config.json").read_text())
    # After tfinal the budget is target_r ranks per adapted module on average: of each module's init_r
    # ranks, as many as that in total are kept and the rest masked.
    pattern = config["rank_pattern"]
    assert pattern and all(len(keep) == ft.init_r for keep in pattern.values())
    kept = sum(sum(keep) for keep in pattern.values())
    assert ft.target_r < ft.init_r and kept == ft.target_r * len(pattern)  # some ranks are masked


def test_ablation_has_no_soft_prompt_and_same_base(synthetic_dir, synthetic, tmp_path):
    out = tmp_path / "ablation"
    finetune(synthetic_dir, tiny_finetune_config(steps=2, objective="likelihood"), out)
    assert not (out / "soft_prompt.safetensors").exists()
    prompt = json.loads((out / "prompt.json").read_text())
    assert prompt["soft_tokens"] == 0 and prompt["teacher"] == ""
    # The same base weights DELRec's fine-tuning starts from: the backbone as built, bit for bit.
    saved, _ = assert_backbone_as_built(out, "tiny-llama", synthetic.titles)
    assert prompt["backbone_fingerprint"] == saved.fingerprint()


def test_orthogonal_regulariser_is_zero_for_orthonormal_factors():
    module = torch.nn.Module()
    module.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.eye(3, 5))})
    module.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.eye(4, 3))})
    assert float(orthogonal_regulariser(module).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        module.lora_A["default"].mul_(2)
    assert float(orthogonal_regulariser(module).detach()) == pytest.approx(
        3 * 3**0.5 / 2, rel=1e-5
    )  # ||4I - I||_F / 2


def test_adalora_needs_room_for_its_schedule(synthetic_dir, tmp_path):
    with pytest.raises(DelrecError, match="tinit"):
        finetune(synthetic_dir, tiny_finetune_config(steps=4, tinit=3, tfinal=2), tmp_path / "x")


@pytest.mark.parametrize(
    ("workspace", "adapter"),
    [("beside the output", "lora"), ("object store, fresh pod", "lora"), ("beside the output", "adalora")],
)
def test_resumes_after_a_crash(synthetic_dir, tmp_path, monkeypatch, request, caplog, workspace, adapter):
    """Locally the rerun resumes from ``<out>.partial``; in a pipeline the retried pod has a fresh disk
    and resumes from the run's prefix in the object store. AdaLoRA resumes its rank allocator's scores
    too (the crash falls between tinit and the final pruning)."""
    config = tiny_finetune_config(steps=4, adapter=adapter, eval_every=10, tinit=1, tfinal=1)
    straight = tmp_path / "straight"
    finetune(synthetic_dir, config, straight)
    calls = {"n": 0}
    real = finetune_module.rank_share_loss

    def crash_on_fourth_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    checkpoint, prefix_store = checkpoint_workspace(request, monkeypatch, workspace, "finetune")
    monkeypatch.setattr(finetune_module, "rank_share_loss", crash_on_fourth_step)
    resumed = tmp_path / "pod1" / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        finetune(synthetic_dir, config, resumed, checkpoint=checkpoint)
    assert (tmp_path / "pod1" / "resumed.partial" / "state.pt").is_file()
    if prefix_store is not None:
        assert prefix_store.list(checkpoint) == ["state.pt"]
        shutil.rmtree(tmp_path / "pod1")  # the pod's disk is gone with it
        resumed = tmp_path / "pod2" / "resumed"
    monkeypatch.setattr(finetune_module, "rank_share_loss", real)
    with caplog.at_level("INFO", logger="delrec.artifacts"):
        finetune(synthetic_dir, config, resumed, checkpoint=checkpoint)
    assert "resuming from" in caplog.text  # not started again at step 1
    losses = [
        [h["loss"] for h in json.loads((d / "history.json").read_text())[1:]] for d in (straight, resumed)
    ]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6) and len(losses[0]) == 4
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert not resumed.with_name("resumed.partial").exists()
    if prefix_store is not None:
        assert prefix_store.list(checkpoint) == []


def test_a_pruned_adalora_adapter_reloads_exactly(synthetic, tmp_path):
    """After rank pruning the saved adapter is resized; evaluate's reload must score exactly the same, and
    saving warns of nothing (peft takes a module pruned to rank 0 for an ungathered FSDP shard)."""
    from peft import get_peft_model
    from peft.utils.warning import PeftWarning

    from delrec.adapter_io import save_adapter
    from delrec.evaluate import load_finetuned_adapter
    from delrec.finetune import adapter_config
    from delrec.llm.scoring import score_all
    from delrec.llm.templates import PromptBuilder, PromptSettings

    backbone = load_backbone("tiny-llama", titles=synthetic.titles, device="cpu", autocast=False)
    model = get_peft_model(
        backbone.model, adapter_config(tiny_finetune_config(steps=10, tinit=2, tfinal=3), backbone)
    )
    backbone.model = model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 500, (2, 30), generator=torch.Generator().manual_seed(0))
    for step in range(10):
        (model(input_ids=ids).logits.logsumexp(-1).mean() + orthogonal_regulariser(model)).backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    assert min(sum(r) for r in model.peft_config["default"].rank_pattern.values()) < 12  # ranks were pruned
    model.eval()
    builder = PromptBuilder(
        backbone,
        synthetic.titles,
        domain="movies",
        teacher="",
        n_soft=0,
        settings=PromptSettings(history_items=5),
    )
    test, cands = synthetic.examples["test"], synthetic.candidates["test"]
    prompts = [builder.stage2(test.histories[i], cands[i], soft=False) for i in range(3)]
    answers = [[builder.answer(int(c)) for c in cands[i]] for i in range(3)]
    before = score_all(backbone, None, prompts, answers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PeftWarning)
        save_adapter(model, tmp_path / "adapter")
    reloaded = load_backbone("tiny-llama", titles=synthetic.titles, device="cpu", autocast=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecation, as peft wraps the model
        load_finetuned_adapter(reloaded, tmp_path)
    assert abs(score_all(reloaded, None, prompts, answers) - before).max() < 1e-5


def test_train_tail_keeps_each_users_latest_training_targets(synthetic):
    from delrec.llm.tasks import tail_rows

    train = synthetic.examples["train"]
    assert len(tail_rows(train, None)) == len(train)
    rows = tail_rows(train, 2)
    for user in np.unique(train.users):
        lengths = sorted(len(train.histories[r]) for r in np.flatnonzero(train.users == user))
        kept = sorted(len(train.histories[r]) for r in rows if train.users[r] == user)
        assert kept == lengths[-2:]


@pytest.mark.parametrize("init", ["orthogonal", "lora"])
def test_adalora_inits_leave_the_base_model_unchanged_at_step_zero(synthetic, init):
    """orthogonal: P's rows and Q's columns orthonormal, E = 0; lora: P orthonormal, E = 1, Q = 0 (and Q
    gets a gradient at once, as LoRA's B does)."""
    from peft import get_peft_model

    from delrec.finetune import adapter_config, init_adalora
    from delrec.llm.backbone import stage_backbone

    backbone = stage_backbone("tiny-llama", None, titles=synthetic.titles, device="cpu", autocast=False)
    backbone.model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = backbone.model(input_ids=ids).logits
    peft_model = get_peft_model(backbone.model, adapter_config(tiny_finetune_config(), backbone))
    init_adalora(peft_model, init)
    params = dict(peft_model.named_parameters())
    factors = {n: p for n, p in params.items() if "lora_A" in n or ("lora_B" in n and init == "orthogonal")}
    assert factors
    for name, p in factors.items():
        gram = p @ p.T if "lora_A" in name else p.T @ p  # P's rows, Q's columns orthonormal
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5), name
    singular = [p for n, p in params.items() if "lora_E" in n]
    assert singular and all(bool((p == (1.0 if init == "lora" else 0.0)).all()) for p in singular)
    if init == "lora":
        assert all(bool((p == 0).all()) for n, p in params.items() if "lora_B" in n)
        peft_model.train()
        peft_model(input_ids=ids).logits.square().mean().backward()
        assert all(p.grad.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)
    peft_model.eval()
    assert torch.allclose(peft_model(input_ids=ids).logits, before, atol=1e-6)  # no change yet


def test_teacher_kd_needs_the_teacher_folder(synthetic_dir, tmp_path):
    with pytest.raises(
        DelrecError, match=r"teacher_kd 0.5 needs the teacher folder \(delrec finetune --teacher"
    ) as err:
        finetune(synthetic_dir, tiny_finetune_config(teacher_kd=0.5), tmp_path / "ft")
    assert err.value.field == "teacher_kd"
    assert not (tmp_path / "ft").exists()


def test_teacher_kd_with_the_likelihood_objective_is_refused_before_anything_runs():
    with pytest.raises(DelrecError, match="teacher_kd > 0 distils scores over the candidates"):
        FinetuneConfig.from_dict({"teacher_kd": 0.5, "objective": "likelihood"}, source="finetune config")


def test_teacher_probabilities_are_its_full_ranking_scores_on_the_candidates(synthetic, tiny_runs):
    """The scores stage 2 distils are those the teacher ranks the catalogue with (evaluate's), restricted
    to each example's candidates: same histories, padding and item weights."""
    from delrec.teachers import CandidateTeacher, load_teacher
    from delrec.teachers.train import PastItems, split_scores

    model, config = load_teacher(tiny_runs / "teacher")
    full = np.concatenate(
        [
            s.numpy()
            for _, s in split_scores(
                model, synthetic, "valid", config.model_copy(update={"bf16": False}), PastItems(synthetic)
            )
        ]
    )
    candidates = synthetic.candidates["valid"]
    expected = torch.softmax(torch.from_numpy(np.take_along_axis(full, candidates, axis=1)) / 2.0, dim=-1)
    teacher = CandidateTeacher(tiny_runs / "teacher")
    got = teacher.probabilities(list(synthetic.examples["valid"].histories), candidates, temperature=2.0)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
    assert got.shape == candidates.shape and np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_the_training_prior_is_added_to_the_candidates_scores_in_the_loss(
    synthetic_dir, synthetic, tiny_runs, tmp_path, monkeypatch
):
    """With popularity_prior_train w, each training example's loss is the cross-entropy of the candidates'
    scores plus w x their log counts; validation HR@1 during training ranks with that prior too, and
    the weight fitted after training still fits the LLM's own scores."""
    import torch.nn.functional as F

    from delrec.llm.scoring import score_candidates
    from delrec.llm.tasks import answers_of
    from delrec.metrics import target_ranks
    from delrec.popularity import fit_prior_weight, log_counts, with_prior

    seen = []
    real_loss = finetune_module.rank_share_loss

    def loss(backbone, soft, builder, batch, objective, reduction, targets=None, offsets=None):
        scores = score_candidates(
            backbone,
            soft,
            [i.prompt for i in batch],
            answers_of(builder, batch),
            reduction=reduction,
            skip=builder.answer_skip,
        )
        answers = torch.tensor([i.answer for i in batch])
        value = real_loss(backbone, soft, builder, batch, objective, reduction, targets, offsets)
        seen.append((batch, offsets, value.item(), F.cross_entropy(scores + offsets, answers).item()))
        return value

    validated = []
    real_scores = finetune_module.instance_scores

    def scores(backbone, soft, builder, instances, **kwargs):
        out = real_scores(backbone, soft, builder, instances, **kwargs)
        validated.append((instances, out))
        return out

    monkeypatch.setattr(finetune_module, "rank_share_loss", loss)
    monkeypatch.setattr(finetune_module, "instance_scores", scores)
    config = tiny_finetune_config(
        steps=2, eval_every=2, lora_dropout=0.0, popularity_prior=True, popularity_prior_train=2.0
    )
    finetune(synthetic_dir, config, tmp_path / "ft", distill_dir=tiny_runs / "distill")
    logc = log_counts(synthetic)
    instances, final_scores = validated[-1]
    candidates = np.stack([i.candidates for i in instances])
    answers = np.array([i.answer for i in instances])
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    as_trained = target_ranks(with_prior(final_scores, candidates, logc, 2.0), answers)
    assert metrics["valid_hr1"] == float((as_trained == 0).mean())
    assert metrics["popularity_weight"] == pytest.approx(
        fit_prior_weight(final_scores, candidates, answers, logc), abs=1e-6
    )
    assert len(seen) == 2
    for batch, offsets, value, expected in seen:
        candidates = np.stack([i.candidates for i in batch])
        np.testing.assert_allclose(offsets.numpy(), 2.0 * logc[candidates], rtol=1e-6)
        assert value == pytest.approx(expected, rel=1e-4)
        assert offsets.std() > 0  # the prior separates these candidates

    with pytest.raises(ValueError, match="needs popularity_prior"):
        tiny_finetune_config(popularity_prior_train=1.0)


def test_teacher_kd_mixes_the_answer_with_the_teachers_softmax(
    synthetic_dir, synthetic, tiny_runs, tmp_path, monkeypatch
):
    """Each training example's target: (1 - w) on the right answer + w x the teacher's softmax over the
    example's candidates after the example's history; the teacher joins the manifest's inputs."""
    from delrec.teachers import CandidateTeacher

    asked, seen = [], []
    real_probabilities = CandidateTeacher.probabilities
    real_loss = finetune_module.rank_share_loss

    def probabilities(self, histories, candidates, temperature=1.0):
        out = real_probabilities(self, histories, candidates, temperature)
        asked.append((histories, candidates, temperature, out))
        return out

    def loss(backbone, soft, builder, batch, objective, reduction, targets=None, offsets=None):
        seen.append((batch, targets))
        return real_loss(backbone, soft, builder, batch, objective, reduction, targets, offsets)

    monkeypatch.setattr(CandidateTeacher, "probabilities", probabilities)
    monkeypatch.setattr(finetune_module, "rank_share_loss", loss)
    config = tiny_finetune_config(steps=2, teacher_kd=0.25, teacher_kd_temperature=0.5)
    out = tmp_path / "kd"
    finetune(synthetic_dir, config, out, distill_dir=tiny_runs / "distill", teacher_dir=tiny_runs / "teacher")
    train = synthetic.examples["train"]
    examples = {(tuple(h.tolist()), int(t)) for h, t in zip(train.histories, train.targets, strict=True)}
    assert len(asked) == len(seen) == 2
    for (histories, candidates, temperature, teacher), (batch, targets) in zip(asked, seen, strict=True):
        assert temperature == 0.5
        answers = np.zeros(candidates.shape, dtype=np.float32)
        for i, instance in enumerate(batch):
            assert np.array_equal(candidates[i], instance.candidates)
            answers[i, instance.answer] = 1.0
            target_item = int(instance.candidates[instance.answer])
            assert (tuple(histories[i].tolist()), target_item) in examples  # its own training row
        np.testing.assert_allclose(targets.numpy(), 0.75 * answers + 0.25 * teacher, atol=1e-6)
    assert "teacher" in json.loads((out / "manifest.json").read_text())["inputs"]
    plain = tmp_path / "plain"
    plain_config = tiny_finetune_config(steps=1)
    finetune(
        synthetic_dir,
        plain_config,
        plain,
        distill_dir=tiny_runs / "distill",
        teacher_dir=tiny_runs / "teacher",
    )
    assert "teacher" not in json.loads((plain / "manifest.json").read_text())["inputs"]  # teacher_kd 0
    # recorded_inputs says what each run records, so a caller can tell whether an output may be reused
    for folder, used in ((out, config), (plain, plain_config)):
        inputs = recorded_inputs(used, synthetic_dir, tiny_runs / "distill", tiny_runs / "teacher")
        check_reusable(folder, producer=layout.FINETUNE, config=used.model_dump(mode="json"), inputs=inputs)


def test_restored_rank_scores_sit_on_their_parameters_device():
    # A checkpoint loads onto the CPU; on a GPU the allocator's scores must follow their parameters
    # (peft mixes them in update_ipt). "meta" stands in for the GPU here.
    from peft import AdaLoraConfig, get_peft_model

    from delrec.llm.backbone import load_backbone

    model = load_backbone("tiny-llama", titles=["a title"], device="cpu", autocast=False).base_model()
    peft_model = get_peft_model(
        model,
        AdaLoraConfig(init_r=4, target_r=2, target_modules=["q_proj"], total_step=10, tinit=1, tfinal=1),
    )
    names = [n for n, _ in peft_model.base_model.model.named_parameters() if "lora_" in n]
    state = {key: {n: torch.ones(1) for n in names} for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")} | {
        "rank_pattern": {"x": [True]}
    }
    peft_model.to("meta")
    finetune_module._restore_allocator(peft_model, state)
    allocator = peft_model.base_model.rankallocator
    for scores in (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc):
        assert sorted(scores) == sorted(names) and {v.device.type for v in scores.values()} == {"meta"}
