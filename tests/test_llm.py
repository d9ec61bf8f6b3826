"""Backbones, soft prompt, templates and candidate scoring, with tiny random models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from delrec.errors import DelrecError
from delrec.llm.backbone import SENTINEL, build_tiny, load_backbone, store_bf16_weights
from delrec.llm.optim import Lion, linear_warmup
from delrec.llm.scoring import score_all, score_candidates, score_naive
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import rps_instance, sample_candidates, stage2_instance, ta_instance
from delrec.llm.templates import SOFT_MARKER, PromptBuilder, PromptSettings

N_SOFT = 6


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-t5"])
def setup(request, synthetic):
    backbone = load_backbone(request.param, titles=synthetic.titles, device="cpu", autocast=False)
    soft = SoftPrompt.initialised(N_SOFT, backbone.input_embeddings, "normal", seed=1)
    builder = PromptBuilder(
        backbone,
        synthetic.titles,
        domain="games",
        teacher="GRU4Rec",
        n_soft=N_SOFT,
        settings=PromptSettings(history_items=6),
    )
    return backbone, soft, builder


def test_tiny_backbone_is_deterministic_and_survives_save(synthetic, tmp_path):
    first, _ = build_tiny("tiny-llama", synthetic.titles)
    second, _ = build_tiny("tiny-llama", synthetic.titles)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    backbone = load_backbone("tiny-llama", titles=synthetic.titles, device="cpu", autocast=False)
    backbone.save(tmp_path / "bb")
    reloaded = load_backbone(str(tmp_path / "bb"), device="cpu", autocast=False)
    assert reloaded.name == "tiny-llama"
    assert reloaded.fingerprint() == backbone.fingerprint()
    text = "Candidates: " + synthetic.titles[3]
    assert reloaded.tokenizer.encode(text) == backbone.tokenizer.encode(text)


def test_tiny_backbone_needs_titles():
    with pytest.raises(DelrecError, match="titles"):
        load_backbone("tiny-llama", device="cpu")


def test_soft_tokens_land_exactly_at_the_marker(setup, synthetic):
    backbone, soft, builder = setup
    history, candidates = synthetic.examples["test"].histories[0], synthetic.candidates["test"][0]
    text = builder.stage2_text(history[-6:], candidates, soft=True, limit=80)
    head = text.split(SOFT_MARKER)[0].rstrip()
    prompt = builder.stage2(history, candidates)
    assert prompt.soft_start == len(backbone.tokenizer.encode(head, add_special_tokens=False))
    assert prompt.n_soft == N_SOFT
    ids = torch.tensor([prompt.ids])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, prompt.soft_start : prompt.soft_start + N_SOFT] = True
    embeds = backbone.embed(ids)
    spliced = soft.splice(embeds, mask)
    assert torch.equal(spliced[0, prompt.soft_start : prompt.soft_start + N_SOFT], soft.weight)
    assert torch.equal(spliced[0, : prompt.soft_start], embeds[0, : prompt.soft_start])
    assert torch.equal(spliced[0, prompt.soft_start + N_SOFT :], embeds[0, prompt.soft_start + N_SOFT :])
    # The tokens on both sides of the slot are the text around the marker.
    tail = backbone.tokenizer.decode(prompt.ids[prompt.soft_start + N_SOFT :], skip_special_tokens=False)
    assert tail.startswith(". History:")


def test_cached_scoring_equals_naive_scoring(setup, synthetic):
    backbone, soft, builder = setup
    rng = np.random.default_rng(0)
    test = synthetic.examples["test"]
    # Prompts of different lengths (padding) with and without soft prompt, TA / RPS / stage 2 wording.
    instances = [
        stage2_instance(
            builder, test.histories[i], int(test.targets[i]), candidates=synthetic.candidates["test"][i]
        )
        for i in range(3)
    ]
    instances.append(ta_instance(builder, rng, test.histories[5], 7, synthetic.num_items))
    top = np.array([i for i in range(1, 40) if i not in set(test.histories[6].tolist())][:10])
    instances.append(rps_instance(builder, rng, test.histories[6], top, synthetic.num_items))
    prompts = [inst.prompt for inst in instances]
    answers = [[builder.answer(int(i)) for i in inst.candidates] for inst in instances]
    for reduction, count in (("mean", 5), ("sum", 2), ("first", 2)):
        cached = score_candidates(
            backbone, soft, prompts, answers, reduction=reduction, skip=builder.answer_skip
        )
        naive = score_naive(
            backbone, soft, prompts[:count], answers[:count], reduction=reduction, skip=builder.answer_skip
        )
        assert cached.shape == (5, 20)
        torch.testing.assert_close(cached[:count], naive, atol=1e-4, rtol=0)
    plain = [builder.stage2(test.histories[i], synthetic.candidates["test"][i], soft=False) for i in range(3)]
    batched = score_all(backbone, None, plain, answers[:3], batch_size=2, skip=builder.answer_skip)
    naive = score_naive(backbone, None, plain, answers[:3], skip=builder.answer_skip)
    np.testing.assert_allclose(batched, naive.detach().numpy(), atol=1e-4)


def test_gradients_through_the_cache_equal_naive_gradients(setup, synthetic):
    backbone, soft, builder = setup
    test = synthetic.examples["test"]
    inst = stage2_instance(
        builder, test.histories[0], int(test.targets[0]), candidates=synthetic.candidates["test"][0]
    )
    answers = [[builder.answer(int(i)) for i in inst.candidates]]
    scores = score_candidates(backbone, soft, [inst.prompt], answers, skip=builder.answer_skip)
    (grad,) = torch.autograd.grad(scores.log_softmax(1)[0, inst.answer], soft.weight)
    assert grad.abs().sum() > 0
    # The gradient through the shared prompt is the one of the naive computation.
    naive = score_naive(backbone, soft, [inst.prompt], answers, skip=builder.answer_skip)
    (naive_grad,) = torch.autograd.grad(naive.log_softmax(1)[0, inst.answer], soft.weight)
    torch.testing.assert_close(grad, naive_grad, atol=1e-5, rtol=1e-3)


def test_templates_use_domain_teacher_and_cut_history(setup, synthetic):
    backbone, _, builder = setup
    history = np.arange(1, 16)
    text = builder.stage2_text(history, np.arange(20, 40), soft=True, limit=80)
    assert "GRU4Rec's pattern is: [SOFT]" in text and "the user will play" in text
    prompt = builder.stage2(history, np.arange(20, 40))
    decoded = backbone.tokenizer.decode(prompt.ids)
    assert synthetic.titles[10] in decoded and synthetic.titles[9] + "," not in decoded  # last 6 of 15
    plain = builder.stage2_text(history, np.arange(20, 40), soft=False, limit=80)
    assert SOFT_MARKER not in plain and "GRU4Rec" not in plain
    rps = builder.rps_text(history, np.arange(20, 40), np.arange(40, 50), limit=80)
    assert synthetic.titles[41] in rps and synthetic.titles[49] in rps
    if backbone.is_encoder_decoder:
        assert SENTINEL in rps and builder.answer(3)[0] == backbone.tokenizer.convert_tokens_to_ids(SENTINEL)
    else:
        assert rps.endswith("might be:") and builder.answer(3)[-1] == backbone.eos_id


def test_prompt_length_is_bounded(setup, synthetic):
    backbone, soft, _ = setup
    builder = PromptBuilder(
        backbone,
        synthetic.titles,
        domain="movies",
        teacher="SASRec",
        n_soft=N_SOFT,
        settings=PromptSettings(max_prompt_tokens=150),
    )
    prompt = builder.stage2(np.arange(1, 11), np.arange(20, 40))
    assert len(prompt.ids) <= 150


def test_an_answer_is_the_candidate_as_the_prompt_lists_it(setup):
    backbone, _, _ = setup
    titles = ["", "A short one", "A very long product title that goes on and on past the cut"]
    kw = dict(domain="beauty", teacher="SASRec", n_soft=0, max_answer_tokens=100)
    cut = PromptBuilder(
        backbone, titles, settings=PromptSettings(max_title_chars=24, max_answer_chars=24), **kw
    )
    # a model saved before answers were cut
    whole = PromptBuilder(backbone, titles, settings=PromptSettings(max_title_chars=24), **kw)
    text = cut.stage2_text([1], [1, 2], soft=False, limit=24)
    listed = text.split("Candidates: A short one, ")[1].split(". The next")[0]
    assert listed == "A very long product tit…"
    decode = backbone.tokenizer.decode
    body = slice(cut.answer_skip, -1)
    assert decode(cut.answer(2)[body]).strip() == listed
    assert decode(whole.answer(2)[body]).strip() == titles[2]
    assert cut.answer(1) == whole.answer(1)  # a title within the cut is scored whole


def test_title_years_can_be_left_out_of_prompts_and_answers(setup):
    backbone, _, _ = setup
    titles = ["", "Toy Story (1995)", "Seven (Se7en) (1995)", "(1995)"]
    kw = dict(domain="movies", teacher="SASRec", n_soft=0)
    short = PromptBuilder(backbone, titles, settings=PromptSettings(title_years=False), **kw)
    text = short.stage2_text([1], [2, 3], soft=False, limit=80)
    assert "History: Toy Story. Candidates: Seven (Se7en), (1995)." in text
    body = slice(short.answer_skip, -1)
    assert backbone.tokenizer.decode(short.answer(1)[body]).strip() == "Toy Story"
    kept = PromptBuilder(backbone, titles, **kw)
    assert backbone.tokenizer.decode(kept.answer(1)[body]).strip() == "Toy Story (1995)"


def test_served_prompts_are_the_prompts_the_model_was_trained_on(setup, synthetic):
    """evaluate and recommend rebuild a model's prompts from its prompt.json: every prompt setting a
    stage trains with comes back, and a prompt.json from before a setting existed gets its default."""
    from delrec.evaluate import stage2_builder
    from delrec.finetune import FinetuneConfig
    from delrec.llm.training import stage_prompt_builder

    backbone, _, _ = setup
    titles = ["", *(f"{t} (1995)" for t in synthetic.titles[1:])]
    dataset = SimpleNamespace(titles=titles, domain="movies")
    config = FinetuneConfig(history_items=4, max_prompt_tokens=120, max_title_chars=12, title_years=False)
    assert all(v != getattr(PromptSettings(), k) for k, v in config.prompt_settings().as_json().items())
    stored = json.loads(json.dumps({"teacher": "SASRec", **config.prompt_settings().as_json()}))
    trained = stage_prompt_builder(config, backbone, dataset, "SASRec", N_SOFT)
    served = stage2_builder(backbone, dataset, SimpleNamespace(n_tokens=N_SOFT), stored)
    history, candidates = np.arange(1, 9), np.arange(20, 40)
    assert served.titles == trained.titles == synthetic.titles  # the year is gone on both sides
    assert served.stage2(history, candidates) == trained.stage2(history, candidates)
    assert [served.answer(i) for i in candidates] == [trained.answer(i) for i in candidates]
    old_model = stage2_builder(backbone, dataset, None, {"teacher": "SASRec"})
    assert (old_model.history_items, old_model.max_title_chars, old_model.titles) == (10, 80, titles)


def test_candidate_sampling_excludes_history_and_is_seeded():
    history = set(range(1, 30))
    a = sample_candidates(np.random.default_rng(3), [40], history, 100, 20)
    b = sample_candidates(np.random.default_rng(3), [40], history, 100, 20)
    assert np.array_equal(a, b) and 40 in a and len(set(a.tolist())) == 20
    assert not set(a.tolist()) & history
    with pytest.raises(DelrecError, match="10 items cannot fill 20 distinct candidates"):
        sample_candidates(np.random.default_rng(0), [1], set(), 10, 20)


def test_soft_prompt_init_and_save(tmp_path):
    emb = torch.nn.Embedding(50, 8)
    vocab = SoftPrompt.initialised(4, emb, "vocab", seed=0)
    assert all(any(torch.equal(row, e) for e in emb.weight) for row in vocab.weight)
    normal = SoftPrompt.initialised(4, emb, "normal", seed=0)
    normal.save(tmp_path, init="normal")
    assert torch.equal(SoftPrompt.load(tmp_path).weight, normal.weight)


def test_lion_moves_by_sign_and_warmup_is_linear():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([param], lr=0.1)
    sched = linear_warmup(opt, warmup_steps=4, total_steps=8)
    assert sched.get_last_lr()[0] == pytest.approx(0.025)
    param.grad = torch.tensor([2.0, -0.5, 0.0])
    opt.step()
    torch.testing.assert_close(param.detach(), torch.tensor([-0.025, 0.025, 0.0]))


def test_bf16_weight_storage_is_lossless_and_keeps_the_embedding(synthetic):
    model, _ = build_tiny("tiny-llama", synthetic.titles)
    exact = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        exact.copy_(exact.to(torch.bfloat16).float())
    for param in model.parameters():
        param.requires_grad_(False)
    assert store_bf16_weights(model) == 1  # only the weight bf16 holds exactly
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_the_log_says_why_a_cpu_runs_the_llm_in_fp32(synthetic, monkeypatch, caplog, capability):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with caplog.at_level("INFO", logger="delrec.llm.backbone"):
        backbone = load_backbone("tiny-llama", titles=synthetic.titles, device="cpu", autocast=True)
    assert backbone.autocast == (capability == "AVX512")
    explained = [r.getMessage() for r in caplog.records if "no AVX-512" in r.getMessage()]
    if capability == "AVX2":
        assert explained == [
            "this CPU has no AVX-512 (torch's capability: AVX2): no bf16 matmul units, so the LLM runs in "
            "fp32, about half as fast as on a CPU with AVX-512 bf16"
        ]
    else:
        assert explained == []
