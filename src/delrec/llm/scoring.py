"""Scoring candidate titles as the answer to a prompt: the one code path for training and evaluation.

A candidate's score is the log-likelihood of its answer tokens (title, then eos) given the prompt,
length-normalised by default (``mean``; ``sum`` is the option), or the log-probability of its first
token only (``first``: the authors' scoring, kept for comparison; many ties).

The prompt is run once per example and shared by its candidates: for decoder-only models the
prompt and all candidate answers form one sequence with a block-diagonal causal mask (each answer
attends to the prompt's keys and values, computed once, and to itself); for encoder-decoder models the
encoder runs once and the decoder runs on each answer. :func:`score_naive` runs every
candidate with its full prompt instead; it is the reference the tests and the throughput benchmark
compare against. Both are differentiable (training uses them under autograd).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from delrec.llm.backbone import Backbone
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import EncodedPrompt

log = logging.getLogger(__name__)

Reduction = Literal["mean", "sum", "first"]


@dataclass
class PromptBatch:
    ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    soft_mask: torch.Tensor  # (B, T) bool: the soft prompt's slots
    lengths: torch.Tensor | None  # (B,)


def collate_prompts(
    prompts: Sequence[EncodedPrompt], pad_id: int, device: torch.device, left: bool
) -> PromptBatch:
    """Pad prompts to one length: on the left for decoder-only models (answers follow the last token)."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    soft = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        offset = width - len(prompt.ids) if left else 0
        ids[row, offset : offset + len(prompt.ids)] = torch.tensor(prompt.ids)
        mask[row, offset : offset + len(prompt.ids)] = 1
        if prompt.n_soft:
            start = offset + prompt.soft_start
            soft[row, start : start + prompt.n_soft] = True
    lengths = torch.tensor([len(p.ids) for p in prompts])
    return PromptBatch(ids.to(device), mask.to(device), soft.to(device), lengths.to(device))


def collate_answers(
    answers: Sequence[Sequence[Sequence[int]]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B x C lists of token ids) -> right-padded (B*C, A) ids and mask, and C."""
    counts = {len(row) for row in answers}
    if len(counts) != 1:
        raise ValueError(f"every example needs the same number of candidates, got {sorted(counts)}")
    flat = [a for row in answers for a in row]
    width = max(len(a) for a in flat)
    ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(flat), width), dtype=torch.long)
    for i, answer in enumerate(flat):
        ids[i, : len(answer)] = torch.tensor(answer)
        mask[i, : len(answer)] = 1
    return ids.to(device), mask.to(device), counts.pop()


def prompt_embeddings(backbone: Backbone, soft_prompt: SoftPrompt | None, batch: PromptBatch) -> torch.Tensor:
    embeds = backbone.embed(batch.ids)
    if soft_prompt is not None:
        return soft_prompt.splice(embeds, batch.soft_mask)
    if bool(batch.soft_mask.any()):
        raise ValueError("prompts have soft-prompt slots but no soft prompt was given")
    return embeds


def _reduce(token_logp: torch.Tensor, mask: torch.Tensor, skip: int, reduction: Reduction) -> torch.Tensor:
    """token_logp, mask: (N, A) -> (N,) scores over the answer tokens from index ``skip`` on."""
    token_logp, mask = token_logp[:, skip:], mask[:, skip:].to(token_logp.dtype)
    if reduction == "first":
        return token_logp[:, 0]
    total = (token_logp * mask).sum(dim=1)
    return total / mask.sum(dim=1) if reduction == "mean" else total


def score_candidates(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    reduction: Reduction = "mean",
    skip: int = 0,
) -> torch.Tensor:
    """Scores (B, C) of every example's C answers, the prompt run once per example (differentiable).

    ``skip``: leading answer tokens that are given, not scored (T5's sentinel).
    """
    if backbone.is_encoder_decoder:
        return _score_encoder_decoder(backbone, soft_prompt, prompts, answers, skip, reduction)
    return _score_decoder_only(backbone, soft_prompt, prompts, answers, skip, reduction, None)


def _score_encoder_decoder(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    skip: int,
    reduction: Reduction,
) -> torch.Tensor:
    """The encoder runs once per example; the decoder on each (right-padded) answer."""
    model, device = backbone.base_model(), backbone.device
    batch = collate_prompts(prompts, backbone.pad_id, device, left=False)
    ans_ids, ans_mask, n_cand = collate_answers(answers, backbone.pad_id, device)
    with backbone.autocast_ctx():
        embeds = prompt_embeddings(backbone, soft_prompt, batch)
        encoded = model.get_encoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask)
        hidden = encoded.last_hidden_state.repeat_interleave(n_cand, dim=0)
        start = torch.full_like(ans_ids[:, :1], model.config.decoder_start_token_id)
        out = model(
            encoder_outputs=(hidden,),
            attention_mask=batch.attention_mask.repeat_interleave(n_cand, dim=0),
            decoder_input_ids=torch.cat([start, ans_ids[:, :-1]], dim=1),
            decoder_attention_mask=torch.cat([torch.ones_like(start), ans_mask[:, :-1]], dim=1),
        )
        logp = F.log_softmax(out.logits.float(), dim=-1).gather(2, ans_ids[:, :, None])[..., 0]
        return _reduce(logp, ans_mask, skip, reduction).view(-1, n_cand)


def _score_decoder_only(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    skip: int,
    reduction: Reduction,
    prefix: Prefix | None,
) -> torch.Tensor:
    """Packed scoring; without a given ``prefix`` the batch's shared prefix is run once for the batch.

    Not on a sharded backbone under autograd (training): FSDP gathers a layer's weights for each call's
    backward from hooks on that call's output, and frees them after; the prefix call's keys and values
    get gradients through the cache, from the later call, and a last layer's prefix output gets none, so
    its backward would find the weights freed. There every prompt is run whole, in one decoder call
    (the same scores; more compute). Without gradients (validation, evaluate) the prefix is shared.
    """
    with backbone.autocast_ctx():
        share = not (backbone.sharded and torch.is_grad_enabled())
        if prefix is None and len(prompts) > 1 and share:
            length = shared_prefix_length(prompts)
            prefix = compute_prefix(backbone, soft_prompt, prompts[0], length) if length else None
        return _score_packed(backbone, soft_prompt, prompts, answers, skip, reduction, prefix)


@dataclass
class Prefix:
    """Keys and values of a prompt prefix shared by every prompt of a batch (or of a whole scoring run).

    Every stage-2 (and distill) prompt starts with the same instruction and soft prompt: its keys and
    values are computed once, with batch size 1, and read by every example, instead of once per example.
    """

    ids: tuple[int, ...]
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (1, kv heads, length, head dim)

    @property
    def length(self) -> int:
        return len(self.ids)


def shared_prefix_length(prompts: Sequence[EncodedPrompt]) -> int:
    """Tokens every prompt starts with, short of each prompt's last token (whose output predicts the
    answers' first tokens), not cutting a soft-prompt slot in two."""
    first = prompts[0].ids
    length = min(len(p.ids) for p in prompts) - 1
    for prompt in prompts[1:]:
        ids = prompt.ids
        same = 0
        while same < length and ids[same] == first[same]:
            same += 1
        length = same
    for prompt in prompts:
        if prompt.n_soft and prompt.soft_start < length:
            slot = (prompt.soft_start, prompt.n_soft)
            # A slot inside the prefix must be the same slot in every prompt (the ids alone cannot tell).
            if prompt.soft_start + prompt.n_soft > length or any(
                (p.soft_start, p.n_soft) != slot for p in prompts
            ):
                length = min(length, prompt.soft_start)
    return max(length, 0)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer stack under the language-model head (LlamaModel, GPT2Model, ...)."""
    return getattr(model, model.base_model_prefix)


def _cache_kwargs(decoder: torch.nn.Module, cache: object | None) -> dict:
    """The decoder's KV-cache arguments. transformers renamed ``past_key_values`` to ``cache`` (by 5.24),
    and a name the forward does not declare is swallowed by its ``**kwargs``: pass the declared one."""
    params = inspect.signature(decoder.forward).parameters
    return {("cache" if "cache" in params else "past_key_values"): cache, "use_cache": cache is not None}


def compute_prefix(
    backbone: Backbone, soft_prompt: SoftPrompt | None, prompt: EncodedPrompt, length: int
) -> Prefix:
    """Run the first ``length`` tokens of ``prompt`` once and keep every layer's keys and values."""
    from transformers import DynamicCache

    device = backbone.device
    ids = torch.tensor([prompt.ids[:length]], device=device)
    soft = torch.zeros_like(ids, dtype=torch.bool)
    if prompt.n_soft and prompt.soft_start < length:
        soft[0, prompt.soft_start : prompt.soft_start + prompt.n_soft] = True
    with backbone.autocast_ctx():
        embeds = prompt_embeddings(backbone, soft_prompt, PromptBatch(ids, torch.ones_like(ids), soft, None))
        cache = DynamicCache()
        decoder = _decoder(backbone.base_model())
        decoder(
            inputs_embeds=embeds,
            position_ids=torch.arange(length, device=device)[None],
            **_cache_kwargs(decoder, cache),
        )
    if len(cache.layers) != decoder.config.num_hidden_layers:
        raise RuntimeError(
            f"the decoder filled {len(cache.layers)} cache layers, expected {decoder.config.num_hidden_layers}"
        )
    return Prefix(tuple(prompt.ids[:length]), [(layer.keys, layer.values) for layer in cache.layers])


def _mask_dtype(backbone: Backbone) -> torch.dtype:
    if backbone.autocast:
        return torch.bfloat16
    return next(backbone.base_model().parameters()).dtype


def _score_packed(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    skip: int,
    reduction: Reduction,
    prefix: Prefix | None,
) -> torch.Tensor:
    """Decoder-only scoring: each example's prompt and its candidates' answers in one sequence.

    Row ``b`` holds the prompt (after the shared ``prefix``, whose keys and values come from the cache)
    followed by every candidate's fed answer tokens back to back (ragged: no padding between answers; rows
    are padded at their end only). An answer block attends to the prefix, the prompt and its own earlier
    tokens (a block-diagonal causal mask, additive: 0 or -inf, so eager attention masks too), with
    positions continuing from the prompt's end. Logits are computed only where a scored token is
    predicted: the prompt's last position (every candidate's first token) and the fed answer tokens.
    """
    model, device = backbone.base_model(), backbone.device
    n_ex, n_cand = len(prompts), len(answers[0])
    if any(len(row) != n_cand for row in answers):
        raise ValueError(
            f"every example needs the same number of candidates, got {sorted({len(r) for r in answers})}"
        )
    start = prefix.length if prefix is not None else 0
    first_only = reduction == "first"
    rows, block_ids, pos_rows, soft_rows = [], [], [], []
    # Scored targets: (row, column of the predicting token, target id, candidate, index in the answer).
    t_row, t_col, t_tok, t_owner = [], [], [], []
    for b, (prompt, cands) in enumerate(zip(prompts, answers, strict=True)):
        if tuple(prompt.ids[:start]) != (prefix.ids if prefix is not None else ()):
            raise ValueError("prompt does not start with the cached prefix")
        rest = list(prompt.ids[start:])
        seq, blocks = rest[:], [-1] * len(rest)
        pos = list(range(start, len(prompt.ids)))
        soft = [False] * len(rest)
        if prompt.n_soft and prompt.soft_start >= start:
            for k in range(prompt.soft_start - start, prompt.soft_start - start + prompt.n_soft):
                soft[k] = True
        last = len(rest) - 1
        for c, answer in enumerate(cands):
            fed = answer[:skip] if first_only else answer[:-1]
            offset = len(seq)
            seq += fed
            blocks += [c] * len(fed)
            pos += range(len(prompt.ids), len(prompt.ids) + len(fed))
            soft += [False] * len(fed)
            targets = range(skip, skip + 1) if first_only else range(skip, len(answer))
            for j in targets:
                t_row.append(b)
                t_col.append(last if j == 0 else offset + j - 1)
                t_tok.append(answer[j])
                t_owner.append(b * n_cand + c)
        rows.append(seq)
        block_ids.append(blocks)
        pos_rows.append(pos)
        soft_rows.append(soft)
    width = max(len(r) for r in rows)
    pad = backbone.pad_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    block = torch.tensor([r + [-2] * (width - len(r)) for r in block_ids], device=device)
    positions = torch.tensor([r + [0] * (width - len(r)) for r in pos_rows], device=device)
    soft_mask = torch.tensor([r + [False] * (width - len(r)) for r in soft_rows], device=device)
    index = torch.arange(width, device=device)
    # Keys a query may read: earlier-or-same tokens of the prompt (block -1) or of its own answer block;
    # padding (block -2) reads only itself so that no row is all -inf.
    allowed = (index[None, None, :] <= index[None, :, None]) & (
        (block[:, None, :] == -1) | (block[:, None, :] == block[:, :, None])
    )
    allowed &= block[:, None, :] != -2
    allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
    if prefix is not None:
        allowed = torch.cat([allowed.new_ones(n_ex, width, start), allowed], dim=2)
    mask = torch.zeros(allowed.shape, dtype=_mask_dtype(backbone), device=device)
    mask = mask.masked_fill(~allowed, float("-inf"))[:, None]
    cache = None
    if prefix is not None:
        from transformers import DynamicCache

        cache = DynamicCache(
            ddp_cache_data=[(k.expand(n_ex, -1, -1, -1), v.expand(n_ex, -1, -1, -1)) for k, v in prefix.kv]
        )
    embeds = prompt_embeddings(backbone, soft_prompt, PromptBatch(ids, torch.ones_like(ids), soft_mask, None))
    decoder = _decoder(model)
    hidden = decoder(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **_cache_kwargs(decoder, cache)
    ).last_hidden_state
    # Each predicting position once (the prompt's last one predicts every candidate's first token).
    where = torch.tensor(t_row, device=device) * width + torch.tensor(t_col, device=device)
    unique, inverse = torch.unique(where, return_inverse=True)
    logits = model.get_output_embeddings()(hidden.reshape(n_ex * width, -1)[unique])
    logp = torch.log_softmax(logits.float(), dim=-1)[inverse, torch.tensor(t_tok, device=device)]
    owner = torch.tensor(t_owner, device=device)
    total = logp.new_zeros(n_ex * n_cand).index_add(0, owner, logp)
    if reduction == "mean":
        total = total / logp.new_zeros(n_ex * n_cand).index_add(0, owner, torch.ones_like(logp))
    return total.view(n_ex, n_cand)


def score_naive(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    reduction: Reduction = "mean",
    skip: int = 0,
) -> torch.Tensor:
    """The reference: one forward per candidate over the full prompt + answer (no cache sharing)."""
    model, device = backbone.base_model(), backbone.device
    rows = []
    with backbone.autocast_ctx():
        for prompt, cands in zip(prompts, answers, strict=True):
            scores = []
            for answer in cands:
                ans = torch.tensor([answer], device=device)
                batch = collate_prompts([prompt], backbone.pad_id, device, left=True)
                embeds = prompt_embeddings(backbone, soft_prompt, batch)
                if backbone.is_encoder_decoder:
                    start = torch.full_like(ans[:, :1], model.config.decoder_start_token_id)
                    logits = model(
                        inputs_embeds=embeds,
                        attention_mask=batch.attention_mask,
                        decoder_input_ids=torch.cat([start, ans[:, :-1]], dim=1),
                    ).logits
                else:
                    full = torch.cat([embeds, backbone.embed(ans)], dim=1)
                    logits = model(inputs_embeds=full).logits[:, len(prompt.ids) - 1 : -1]
                logp = F.log_softmax(logits.float(), dim=-1).gather(2, ans[:, :, None])[..., 0]
                scores.append(_reduce(logp, torch.ones_like(ans), skip, reduction))
            rows.append(torch.cat(scores))
    return torch.stack(rows)


def score_all(
    backbone: Backbone,
    soft_prompt: SoftPrompt | None,
    prompts: Sequence[EncodedPrompt],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    batch_size: int = 8,
    reduction: Reduction = "mean",
    skip: int = 0,
    desc: str = "scoring",
) -> np.ndarray:
    """Scores (N, C) for many examples without gradients; batches hold prompts of similar length."""
    order = np.argsort([len(p.ids) for p in prompts], kind="stable")
    out = np.zeros((len(prompts), len(answers[0]) if len(answers) else 0), dtype=np.float32)
    model = backbone.base_model()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            prefix = None
            if len(prompts) and not backbone.is_encoder_decoder:
                # The prefix every prompt shares is run once for the whole run, not once per batch.
                length = shared_prefix_length(prompts)
                if length:
                    with backbone.autocast_ctx():
                        prefix = compute_prefix(backbone, soft_prompt, prompts[0], length)
            for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, mininterval=5):
                idx = order[start : start + batch_size]
                batch_prompts, batch_answers = [prompts[i] for i in idx], [answers[i] for i in idx]
                if backbone.is_encoder_decoder:
                    scores = score_candidates(
                        backbone, soft_prompt, batch_prompts, batch_answers, reduction=reduction, skip=skip
                    )
                else:
                    scores = _score_decoder_only(
                        backbone, soft_prompt, batch_prompts, batch_answers, skip, reduction, prefix
                    )
                out[idx] = scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out
