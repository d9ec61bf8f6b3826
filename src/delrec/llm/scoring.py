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
    lengths: torch.Tensor  # (B,)


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


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


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
    model, device = backbone.base_model(), backbone.device
    enc_dec = backbone.is_encoder_decoder
    batch = collate_prompts(prompts, backbone.pad_id, device, left=not enc_dec)
    ans_ids, ans_mask, n_cand = collate_answers(answers, backbone.pad_id, device)
    with backbone.autocast_ctx():
        embeds = prompt_embeddings(backbone, soft_prompt, batch)
        if enc_dec:
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
        if reduction == "first" or ans_ids.shape[1] == 1:
            out = model(
                inputs_embeds=embeds,
                attention_mask=batch.attention_mask,
                position_ids=_positions(batch.attention_mask),
                logits_to_keep=1,
            )
            first = F.log_softmax(out.logits[:, -1].float(), dim=-1).repeat_interleave(n_cand, dim=0)
            return _reduce(first.gather(1, ans_ids[:, :1]), ans_mask[:, :1], 0, reduction).view(-1, n_cand)
        return _score_packed(backbone, embeds, batch, ans_ids, ans_mask, n_cand, skip, reduction)


def _score_packed(
    backbone: Backbone,
    prompt_embeds: torch.Tensor,
    batch: PromptBatch,
    ans_ids: torch.Tensor,
    ans_mask: torch.Tensor,
    n_cand: int,
    skip: int,
    reduction: Reduction,
) -> torch.Tensor:
    """Decoder-only scoring: each example's prompt and its candidates' answers in one sequence.

    The answer blocks follow the prompt; a block attends to the prompt and to its own earlier tokens only
    (a block-diagonal causal mask, with positions continuing from the prompt's end), so the prompt's keys
    and values are computed once and shared by every candidate without being copied per candidate, the
    copy that makes a per-candidate KV cache cost gigabytes under autograd.
    """
    model, device = backbone.base_model(), backbone.device
    n_ex, prompt_len = batch.ids.shape
    width = ans_ids.shape[1] - 1  # an answer's last token is only predicted, never fed
    answers = ans_ids.view(n_ex, n_cand, -1)
    fed = answers[:, :, :-1].reshape(n_ex, n_cand * width)
    embeds = torch.cat([prompt_embeds, backbone.embed(fed)], dim=1)
    total = prompt_len + n_cand * width
    positions = torch.cat(
        [
            _positions(batch.attention_mask),
            batch.lengths[:, None] + torch.arange(width, device=device).repeat(n_cand)[None],
        ],
        dim=1,
    )
    block = torch.cat(
        [
            torch.full((prompt_len,), -1, device=device),
            torch.arange(n_cand, device=device).repeat_interleave(width),
        ]
    )
    index = torch.arange(total, device=device)
    allowed = (index[None, :] <= index[:, None]) & (
        (block[None, :] == -1) | (block[None, :] == block[:, None])
    )
    real = torch.cat(
        [batch.attention_mask.bool(), ans_mask.view(n_ex, n_cand, -1)[:, :, :-1].reshape(n_ex, -1).bool()], 1
    )
    # Every position also sees itself, so no row (a padding slot) is fully masked.
    mask = (allowed[None] & real[:, None, :]) | torch.eye(total, dtype=torch.bool, device=device)[None]
    keep = torch.cat(
        [torch.tensor([prompt_len - 1], device=device), torch.arange(prompt_len, total, device=device)]
    )
    logits = model(
        inputs_embeds=embeds, attention_mask=mask[:, None], position_ids=positions, logits_to_keep=keep
    ).logits
    logp = F.log_softmax(logits.float(), dim=-1)
    # The prompt's last position predicts every candidate's first token; block c position j its token j+1.
    first = logp[:, 0].repeat_interleave(n_cand, dim=0).gather(1, ans_ids[:, :1])
    rest = logp[:, 1:].reshape(n_ex, n_cand, width, -1).gather(3, answers[:, :, 1:, None])[..., 0]
    token_logp = torch.cat([first, rest.reshape(n_ex * n_cand, width)], dim=1)
    return _reduce(token_logp, ans_mask, skip, reduction).view(-1, n_cand)


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
            for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, mininterval=5):
                idx = order[start : start + batch_size]
                scores = score_candidates(
                    backbone,
                    soft_prompt,
                    [prompts[i] for i in idx],
                    [answers[i] for i in idx],
                    reduction=reduction,
                    skip=skip,
                )
                out[idx] = scores.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out
