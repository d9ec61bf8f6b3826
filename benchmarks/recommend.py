"""Retrieve + rerank throughput: ``delrec recommend``'s path against a plain loop, in the same run.

Both sides take the same users, the same teacher retrieval (top K of the catalogue, the user's items
excluded) and the same fine-tuned DELRec (adapter + soft prompt), and rank the K candidates by the
length-normalised log-likelihood of their titles after the same prompt:

- ours: ``delrec.recommend`` -- prompts batched by length, the shared instruction + soft-prompt prefix run
  once from a KV cache, the K answers packed after each prompt (``delrec.llm.scoring``);
- plain: transformers as one writes it first -- for each user, each of the K candidates is its own forward
  pass over prompt + title, one after another.

The run checks that both give the same top N (scores within bf16 rounding), then prints users/s of each
and the ratio (target >= 5x). Model loading is left out of both timings. ``--json OUT`` writes the figures.

    PYTHONPATH=src .venv/bin/python benchmarks/recommend.py --data D --teacher T --delrec M --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from delrec.data import load_dataset
from delrec.evaluate import delrec_prompt_config, finetuned_backbone, load_finetuned_adapter
from delrec.llm.soft_prompt import SoftPrompt
from delrec.recommend import RecommendConfig, _Shard, known_sequences, teacher_retrieve
from delrec.teachers import load_teacher


def plain_title_logp(backbone, soft, prompt, answer: tuple[int, ...]) -> float:
    """One candidate, one forward: prompt + title, the title's mean token log-probability."""
    device = backbone.device
    ids = torch.tensor([list(prompt.ids) + list(answer)], device=device)
    with torch.no_grad(), backbone.autocast_ctx():
        embeds = backbone.embed(ids)
        if soft is not None and prompt.n_soft:
            start = prompt.soft_start
            embeds = torch.cat(
                [embeds[:, :start], soft.weight.to(embeds.dtype)[None], embeds[:, start + soft.n_tokens :]],
                dim=1,
            )
        logits = backbone.model(inputs_embeds=embeds).logits[0, len(prompt.ids) - 1 : -1].float()
    return float(F.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt.ids) :, None]).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="Dataset folder (delrec preprocess)")
    parser.add_argument("--teacher", required=True, help="teacher folder (delrec train-teacher)")
    parser.add_argument("--delrec", required=True, help="DELRec finetune folder (with soft prompt)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--users", type=int, default=64, help="users ours ranks")
    parser.add_argument("--plain-users", type=int, default=4, help="users the plain loop ranks")
    parser.add_argument("--retrieve-k", type=int, default=20)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dataset = load_dataset(args.data)
    sequences = known_sequences(dataset)
    users = np.array([u for u, seq in enumerate(sequences) if len(seq)][: args.users])
    config = RecommendConfig(
        backbone=args.backbone,
        device="cpu",
        bf16=not args.no_bf16,
        retrieve_k=args.retrieve_k,
        top_n=args.top_n,
        batch_size=args.batch_size,
    )
    prompt_config = delrec_prompt_config(args.delrec, args.data)
    teacher, teacher_config = load_teacher(args.teacher)
    teacher.eval()
    backbone = finetuned_backbone(
        args.backbone,
        Path(args.delrec),
        prompt_config,
        titles=dataset.titles,
        device="cpu",
        bf16=not args.no_bf16,
    )
    load_finetuned_adapter(backbone, Path(args.delrec))
    backbone.model.eval()
    soft = SoftPrompt.load(args.delrec, backbone.device)
    shard = _Shard(
        dataset,
        [str(u) for u in range(len(sequences))],
        config,
        (teacher, teacher_config.max_len),
        backbone,
        soft,
        prompt_config,
    )

    start = time.perf_counter()
    ours = shard.table(users, sequences).to_pydict()
    ours_seconds = time.perf_counter() - start

    plain_users = users[: args.plain_users]
    start = time.perf_counter()
    plain_top = []
    for user in plain_users:
        seq = sequences[user]
        cands = teacher_retrieve(teacher, teacher_config.max_len, [seq], args.retrieve_k)[0]
        prompt = shard.builder.stage2(seq, cands, soft=True)
        scores = [plain_title_logp(backbone, soft, prompt, shard.builder.answer(int(i))) for i in cands]
        plain_top.append([int(cands[j]) for j in np.argsort(-np.array(scores), kind="stable")[: args.top_n]])
    plain_seconds = time.perf_counter() - start

    ours_top = np.array(ours["item_id"]).reshape(len(users), args.top_n)[: len(plain_users)]
    item_index = {raw: i for i, raw in enumerate(dataset.raw_item_ids)}
    same = float(
        np.mean([[item_index[r] for r in row] == p for row, p in zip(ours_top, plain_top, strict=True)])
    )
    figures = {
        "backbone": backbone.name,
        "threads": args.threads,
        "bf16": backbone.autocast,
        "load_average_at_start": os.getloadavg()[0],
        "retrieve_k": args.retrieve_k,
        "users": int(len(users)),
        "plain_users": int(len(plain_users)),
        "same_top_n_fraction": same,
        "users_per_s": len(users) / ours_seconds,
        "plain_users_per_s": len(plain_users) / plain_seconds,
    }
    figures["ratio_vs_plain"] = figures["users_per_s"] / figures["plain_users_per_s"]
    print(json.dumps(figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
