"""Stage-2 training and candidate-scoring throughput: delrec's scoring path vs a plain transformers + peft
baseline doing the same work in the same run.

Both sides score the same stage-2 prompts (soft prompt spliced in) and the same 20 candidate titles per
example with the same model and adapter, and report examples/s:

- ours: ``delrec.llm.scoring`` -- the prompt runs once per example and its keys and values are shared by
  the 20 candidates (one packed sequence, block-diagonal mask); scoring batches prompts of similar length (length bucketing);
- baseline: plain transformers + peft as one would write it first -- every candidate is its own full
  sequence (prompt + title), the 20 sequences of an example form one padded batch, examples in dataset
  order (no bucketing), the same length-normalised title log-likelihood and cross-entropy.

The run first checks that both compute the same scores. Prints one JSON line per measurement and a
summary with the speed-ups. The baseline's training step is the memory-hungry one: 40 full sequences
under autograd for 2 examples took ~20 GB with SmolLM2 here (ours ~4.5 GB), so the defaults are one
training batch of 2. Example (about 3 minutes on 2 idle cores):

    .venv/bin/python benchmarks/llm_throughput.py --data /tmp/ml/data --backbone smollm2-135m
    .venv/bin/python benchmarks/llm_throughput.py --backbone tiny-llama      # synthetic data, seconds
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.finetune import FinetuneConfig, adapter_config
from delrec.llm.backbone import load_backbone
from delrec.llm.scoring import score_all
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import answers_of, stage2_instance
from delrec.llm.training import task_loss


def baseline_scores(backbone, soft, instance, builder, with_grad: bool) -> torch.Tensor:
    """Plain transformers: 20 full sequences (prompt + title), one padded forward, mean title log-prob."""
    model, device = backbone.model, backbone.device
    prompt = torch.tensor(instance.prompt.ids, device=device)
    answers = [torch.tensor(builder.answer(int(i)), device=device) for i in instance.candidates]
    width = len(prompt) + max(len(a) for a in answers)
    ids = torch.full((len(answers), width), backbone.pad_id, device=device)
    mask = torch.zeros_like(ids)
    for row, answer in enumerate(answers):
        ids[row, : len(prompt)] = prompt
        ids[row, len(prompt) : len(prompt) + len(answer)] = answer
        mask[row, : len(prompt) + len(answer)] = 1
    with torch.set_grad_enabled(with_grad), backbone.autocast_ctx():
        embeds = backbone.embed(ids)
        start = instance.prompt.soft_start
        embeds = torch.cat(
            [
                embeds[:, :start],
                soft.weight.to(embeds.dtype).expand(len(answers), -1, -1),
                embeds[:, start + soft.n_tokens :],
            ],
            dim=1,
        )
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, len(prompt) - 1 : -1].float()
        logp = F.log_softmax(logits, dim=-1).gather(2, ids[:, len(prompt) :, None])[..., 0]
        title_mask = mask[:, len(prompt) :].float()
        return (logp * title_mask).sum(1) / title_mask.sum(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="Dataset folder (default: a synthetic one built in a temp folder)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--soft-tokens", type=int, default=100)
    parser.add_argument("--history-items", type=int, default=10)
    parser.add_argument("--score-examples", type=int, default=24)
    parser.add_argument("--train-batches", type=int, default=1)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=2,
        help="training examples per step (the baseline needs ~20 GB for 2 with SmolLM2: 4 does not fit 24 GB)",
    )
    parser.add_argument("--score-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data_dir = args.data
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp()) / "synthetic"
        preprocess(PreprocessConfig(dataset="synthetic"), data_dir)
    dataset = load_dataset(data_dir)
    backbone = load_backbone(args.backbone, titles=dataset.titles, device="cpu", autocast=not args.no_bf16)
    soft = SoftPrompt.initialised(args.soft_tokens, backbone.input_embeddings, "vocab", seed=0)
    soft.weight.requires_grad_(False)
    from peft import get_peft_model

    from delrec.llm.templates import PromptBuilder

    builder = PromptBuilder(
        backbone,
        dataset.titles,
        domain=dataset.domain,
        teacher="SASRec",
        n_soft=args.soft_tokens,
        history_items=args.history_items,
    )
    peft_config = adapter_config(FinetuneConfig(steps=100, init_r=32, target_r=8), backbone)
    backbone.model = get_peft_model(backbone.model, peft_config)
    test = dataset.examples["test"]
    n = min(args.score_examples, len(test))
    instances = [
        stage2_instance(
            builder, test.histories[i], int(test.targets[i]), candidates=dataset.candidates["test"][i]
        )
        for i in range(n)
    ]
    env = {
        "backbone": backbone.name,
        "threads": args.threads,
        "bf16": backbone.autocast,
        "device": str(backbone.device),
    }
    prompt_tokens = float(np.mean([len(i.prompt.ids) for i in instances]))
    print(json.dumps({**env, "examples": n, "mean_prompt_tokens": prompt_tokens}))

    # Same work: both sides give the same scores (fp32 run: ~1e-5; bf16 autocast: ~1e-2).
    ours = score_all(
        backbone, soft, [i.prompt for i in instances[:2]], answers_of(builder, instances[:2]), batch_size=2
    )
    base = torch.stack(
        [baseline_scores(backbone, soft, inst, builder, False) for inst in instances[:2]]
    ).numpy()
    print(json.dumps({"check": "same scores", "max_abs_diff": float(np.abs(ours - base).max())}))

    backbone.model.eval()
    results = {}
    start = time.perf_counter()
    score_all(
        backbone,
        soft,
        [i.prompt for i in instances],
        answers_of(builder, instances),
        batch_size=args.score_batch_size,
    )
    results["scoring_ours"] = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for inst in instances:
        baseline_scores(backbone, soft, inst, builder, False)
    results["scoring_baseline"] = n / (time.perf_counter() - start)

    backbone.model.train()
    train = dataset.examples["train"]
    rng = np.random.default_rng(0)
    batches = [
        [
            stage2_instance(
                builder, train.histories[r], int(train.targets[r]), rng=rng, num_items=dataset.num_items
            )
            for r in rng.choice(len(train), size=args.batch_size)
        ]
        for _ in range(args.train_batches)
    ]
    params = [p for p in backbone.model.parameters() if p.requires_grad]
    start = time.perf_counter()
    for batch in batches:
        task_loss(backbone, soft, builder, batch, "candidates", "mean").backward()
    results["training_ours"] = args.train_batches * args.batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    for batch in batches:
        scores = torch.stack([baseline_scores(backbone, soft, inst, builder, True) for inst in batch])
        target = torch.tensor([inst.answer for inst in batch])
        F.cross_entropy(scores, target).backward()
    results["training_baseline"] = args.train_batches * args.batch_size / (time.perf_counter() - start)
    for p in params:
        p.grad = None
    for name, value in results.items():
        print(json.dumps({**env, "measure": name, "examples_per_s": round(value, 3)}))
    print(
        json.dumps(
            {
                "scoring_speedup": round(results["scoring_ours"] / results["scoring_baseline"], 2),
                "training_speedup": round(results["training_ours"] / results["training_baseline"], 2),
                "target": "scoring >= 2x",
            }
        )
    )


if __name__ == "__main__":
    main()
