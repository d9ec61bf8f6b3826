"""Stage-2 training and candidate-scoring throughput: delrec's scoring path against a plain transformers +
peft loop doing the same work in the same run (and, optionally, against an older delrec scoring module).

Both sides score the same stage-2 prompts (soft prompt spliced in) and the same 20 candidate titles per
example with the same model and adapter:

- ours: ``delrec.llm.scoring`` -- the prompt runs once per example, the instruction + soft-prompt prefix
  every prompt shares once per batch (training) or once per run (scoring, from a KV cache), and the 20
  answers are packed after the prompt at their exact lengths (block-diagonal additive mask); logits only
  where a scored token is predicted;
- plain: transformers + peft as one writes it first -- every candidate is its own full sequence (prompt +
  title), one padded batch of 20 per example, the same length-normalised title log-likelihood and
  cross-entropy; its training step accumulates the batch's gradient one example at a time (20 full
  sequences of ~600 tokens under autograd per example; a whole batch of 80 does not fit 24 GB).

The run first checks that ours and plain give the same scores, then measures examples/s in ``--rounds``
rounds that each time ours and plain back to back (a rate is its side's best round; a ratio is the median
of the rounds' ratios, so the machine's drift between rounds cancels), counts the
floating-point operations of one of our training steps and scoring batches (torch's FlopCounterMode) and
measures the CPU's matmul peak in the dtype the model computes in (bf16 under autocast, else fp32) at the
same thread count. Prints JSON lines; ``--json OUT`` writes the summary. With ``--old-scoring FILE``
(e.g. ``git show main~1:src/delrec/llm/scoring.py > /tmp/old.py``) the older scoring module is measured in
the same run too, in the same paired rounds. ``--profile`` prints torch.profiler tables.

    PYTHONPATH=src .venv/bin/delrec preprocess --dataset ml-100k --source ../shared/datasets/ml-100k --out /tmp/ml
    PYTHONPATH=src .venv/bin/python benchmarks/llm_throughput.py --data /tmp/ml --threads 2 --json out.json
    PYTHONPATH=src .venv/bin/python benchmarks/llm_throughput.py --backbone tiny-llama   # synthetic, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.finetune import FinetuneConfig, adapter_config
from delrec.llm.backbone import load_backbone
from delrec.llm.scoring import score_all
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.tasks import answers_of, stage2_instance
from delrec.llm.templates import PromptBuilder, PromptSettings
from delrec.llm.training import task_loss


def plain_scores(backbone, soft, instance, builder, with_grad: bool) -> torch.Tensor:
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


def matmul_peak_tflops(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """Best matmul rate (TFLOP/s) of a large square product in ``dtype`` at the current thread count.

    The dtype the model computes in: bf16 under autocast, fp32 otherwise (a CPU without AVX-512 bf16 has
    no bf16 matmul units; emulated, a 4096-square bf16 product took minutes there).
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # oneDNN's first call selects and prepares the kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_rates(ours, n_ours: int, plain, n_plain: int, rounds: int) -> tuple[float, float, float]:
    """Examples/s of ours and of plain (each its best round: the least disturbed) and the ratio ours / plain,
    the median of the rounds' ratios. Each round times ours and plain back to back, so that the machine's
    drift (its speed moved 24% between two runs a minute apart) touches both sides of a ratio alike."""
    ours_rates, plain_rates = [], []
    for _ in range(rounds):
        ours_rates.append(n_ours / seconds(ours))
        plain_rates.append(n_plain / seconds(plain))
    ratios = [o / p for o, p in zip(ours_rates, plain_rates, strict=True)]
    return max(ours_rates), max(plain_rates), float(np.median(ratios))


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("old_scoring", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="Dataset folder (default: a synthetic one built in a temp folder)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--soft-tokens", type=int, default=32, help="the CPU preset's (configs/ml-100k.yaml)")
    parser.add_argument("--history-items", type=int, default=10)
    parser.add_argument(
        "--title-years",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep MovieLens's (YYYY) in titles (the issue's baseline did; the ml-100k preset drops it)",
    )
    parser.add_argument("--score-examples", type=int, default=16)
    parser.add_argument("--score-batch-size", type=int, default=4)
    parser.add_argument("--plain-examples", type=int, default=2, help="examples the plain loop scores")
    parser.add_argument(
        "--plain-train-examples", type=int, default=1, help="examples of the batch the plain loop trains on"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="training examples per step (the preset's)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds; each runs ours and plain back to back (rates: the best round; ratios: the median)",
    )
    parser.add_argument("--init-r", type=int, default=64, help="AdaLoRA's initial rank (the preset's)")
    parser.add_argument(
        "--adapter-layers", type=int, default=None, help="adapt only the top N layers (default: all)"
    )
    parser.add_argument("--old-scoring", help="an older delrec scoring.py to measure in the same run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of our steps")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data_dir = args.data
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp()) / "synthetic"
        preprocess(PreprocessConfig(dataset="synthetic"), data_dir)
    dataset = load_dataset(data_dir)
    backbone = load_backbone(args.backbone, titles=dataset.titles, device="cpu", autocast=not args.no_bf16)
    soft = SoftPrompt.initialised(args.soft_tokens, backbone.input_embeddings, "vocab", seed=0)
    soft.weight.requires_grad_(False)  # stage 2: the soft prompt is frozen
    from peft import get_peft_model

    builder = PromptBuilder(
        backbone,
        dataset.titles,
        domain=dataset.domain,
        teacher="SASRec",
        n_soft=args.soft_tokens,
        settings=PromptSettings(history_items=args.history_items, title_years=args.title_years),
    )
    peft_config = adapter_config(FinetuneConfig(steps=100, init_r=args.init_r, target_r=8), backbone)
    n_layers = backbone.base_model().config.num_hidden_layers
    if args.adapter_layers is not None:
        peft_config.layers_to_transform = list(range(n_layers - args.adapter_layers, n_layers))
    backbone.model = get_peft_model(backbone.model, peft_config)
    test = dataset.examples["test"]
    n = min(args.score_examples, len(test))
    instances = [
        stage2_instance(
            builder, test.histories[i], int(test.targets[i]), candidates=dataset.candidates["test"][i]
        )
        for i in range(n)
    ]
    prompts, answers = [i.prompt for i in instances], answers_of(builder, instances)
    env = {
        "backbone": backbone.name,
        "threads": args.threads,
        "bf16": backbone.autocast,
        "soft_tokens": args.soft_tokens,
        "adapter_layers": args.adapter_layers or n_layers,
        "load_average_at_start": os.getloadavg()[0],
        "mean_prompt_tokens": float(np.mean([len(p.ids) for p in prompts])),
        "mean_answer_tokens": float(np.mean([len(a) for row in answers for a in row])),
    }
    print(json.dumps(env))

    backbone.model.eval()
    ours = score_all(backbone, soft, prompts[:2], answers[:2], batch_size=2)
    plain = torch.stack(
        [plain_scores(backbone, soft, inst, builder, False) for inst in instances[:2]]
    ).numpy()
    # bf16 autocast: the two sides round differently (~1e-2); fp32 (--no-bf16): ~1e-5.
    check = {"check": "same scores as plain", "max_abs_diff": float(np.abs(ours - plain).max())}
    print(json.dumps(check))

    results: dict[str, float] = {}

    def score_ours():
        score_all(backbone, soft, prompts, answers, batch_size=args.score_batch_size)

    m = min(args.plain_examples, n)
    (
        results["scoring_examples_per_s"],
        results["plain_scoring_examples_per_s"],
        results["scoring_ratio_vs_plain"],
    ) = paired_rates(
        score_ours,
        n,
        lambda: [plain_scores(backbone, soft, inst, builder, False) for inst in instances[:m]],
        m,
        args.rounds,
    )
    k = min(args.score_batch_size, n)
    score_flops = (
        count_flops(lambda: score_all(backbone, soft, prompts[:k], answers[:k], batch_size=k)) * n / k
    )

    backbone.model.train()
    train = dataset.examples["train"]
    rng = np.random.default_rng(0)
    batch = [
        stage2_instance(
            builder, train.histories[r], int(train.targets[r]), rng=rng, num_items=dataset.num_items
        )
        for r in rng.choice(len(train), size=args.batch_size)
    ]
    params = [p for p in backbone.model.parameters() if p.requires_grad]

    def step_ours():
        task_loss(backbone, soft, builder, batch, "candidates", "mean").backward()

    def step_plain():
        target = torch.tensor([inst.answer for inst in batch])
        for k, inst in enumerate(batch[: args.plain_train_examples]):
            scores = plain_scores(backbone, soft, inst, builder, True)[None]
            (F.cross_entropy(scores, target[k : k + 1]) / len(batch)).backward()

    (
        results["training_examples_per_s"],
        results["plain_training_examples_per_s"],
        results["training_ratio_vs_plain"],
    ) = paired_rates(
        step_ours, len(batch), step_plain, min(args.plain_train_examples, len(batch)), args.rounds
    )
    train_flops = count_flops(step_ours)
    if args.old_scoring:
        old = load_module(args.old_scoring)

        def step_old():
            scores = old.score_candidates(
                backbone, soft, [i.prompt for i in batch], answers_of(builder, batch)
            )
            F.cross_entropy(scores, torch.tensor([inst.answer for inst in batch])).backward()

        # Paired rounds, as against plain: ours is timed again beside the old module in each round.
        _, results["old_training_examples_per_s"], results["training_ratio_vs_old"] = paired_rates(
            step_ours, len(batch), step_old, len(batch), args.rounds
        )
        backbone.model.eval()
        _, results["old_scoring_examples_per_s"], results["scoring_ratio_vs_old"] = paired_rates(
            score_ours,
            n,
            lambda: old.score_all(backbone, soft, prompts, answers, batch_size=args.score_batch_size),
            n,
            args.rounds,
        )
        backbone.model.train()
    for p in params:
        p.grad = None

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name, fn in (("training step", step_ours), ("scoring", score_ours)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"== profile: {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        for p in params:
            p.grad = None

    peak_dtype = torch.bfloat16 if backbone.autocast else torch.float32
    peak = matmul_peak_tflops(peak_dtype)
    train_tflops = train_flops * results["training_examples_per_s"] / len(batch) / 1e12
    summary = {
        **results,
        "title_years": args.title_years,
        "rounds": args.rounds,
        "achieved_tflops": train_tflops,
        "scoring_achieved_tflops": score_flops * results["scoring_examples_per_s"] / n / 1e12,
        "matmul_peak_tflops": peak,
        "matmul_peak_dtype": str(peak_dtype).removeprefix("torch."),
        "training_fraction_of_peak": train_tflops / peak,
        "training_gflop_per_example": train_flops / len(batch) / 1e9,
        "scoring_gflop_per_example": score_flops / n / 1e9,
        **check,
        **env,
        "load_average_at_end": os.getloadavg()[0],
    }
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
