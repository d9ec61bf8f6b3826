"""The paper-scale DELRec recipe on one GPU: time per stage, MFU and the test metrics.

preprocess -> SASRec -> distill (100 soft tokens, 800 steps of 20 TA + 20 RPS instances) -> finetune
with the soft prompt (AdaLoRA 320 -> 8, 1,400 steps of 20) and without it (ablation) -> evaluate on
every test user (DELRec, ablation, untuned LLM with and without the soft prompt, teacher, popularity;
paired bootstrap intervals).

Needs only torch, transformers, peft, safetensors, pyarrow, pydantic (and what they pull in); reads the
backbone from a local folder (a transformers ``save_pretrained`` folder) so a machine without internet
can run it:

    python benchmarks/gpu_delrec.py --source /data/ml-100k --backbone /models/smollm2-135m --work /tmp/w

MFU counts 2 FLOPs per non-embedding parameter per token for a forward pass and 4 when a backward pass
through the activations follows (both stages train only a prompt or adapters, so no weight gradients of
the backbone: 2 forward + 2 backward), against ``--peak-tflops`` (H200 dense bf16: 989). It leaves out
attention scores and the logits of scored tokens and counts padded positions: on a tiny model's scoring
it comes to 0.93x torch's FlopCounterMode (counting the embedding too, as before, gave 1.15x).
On CPU with ``--backbone tiny-llama --dataset synthetic`` and tiny step counts it is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from delrec import layout
from delrec.artifacts import check_reusable
from delrec.config import parse_assignments
from delrec.data import PreprocessConfig, preprocess
from delrec.distill import DistillConfig, distill
from delrec.errors import DelrecError
from delrec.evaluate import EvaluateConfig, evaluate
from delrec.finetune import FinetuneConfig, finetune, recorded_inputs
from delrec.llm import backbone as backbone_module
from delrec.teachers import TeacherConfig, train_teacher


class TokenCounter:
    """Counts the tokens of every backbone pass, split by whether autograd records it."""

    def __init__(self) -> None:
        self.grad_tokens = 0
        self.nograd_tokens = 0
        self.params = 0

    def hook(self, module, args) -> None:
        # Every token a model pass processes is embedded first (the scorers embed prompts, shared
        # prefixes and answers themselves), so the embedding's input counts the tokens.
        tokens = int(args[0].numel())
        if torch.is_grad_enabled():
            self.grad_tokens += tokens
        else:
            self.nograd_tokens += tokens

    def flops(self) -> float:
        return self.params * (4.0 * self.grad_tokens + 2.0 * self.nograd_tokens)

    def reset(self) -> None:
        self.grad_tokens = self.nograd_tokens = 0


def instrument(counter: TokenCounter) -> None:
    """Hook the forward of every backbone the stages load (they call ``stage_backbone``)."""
    original = backbone_module.stage_backbone

    def counted(*args, **kwargs):
        backbone = original(*args, **kwargs)
        model = backbone.base_model()
        embeddings = model.get_input_embeddings()
        # The embedding is a lookup, not a matmul (tied: the logits' matmul, which the scorers run only
        # where a scored token is predicted).
        counter.params = sum(
            p.numel() for n, p in model.named_parameters() if "lora_" not in n and p is not embeddings.weight
        )
        embeddings.register_forward_pre_hook(counter.hook)
        return backbone

    backbone_module.stage_backbone = counted
    for module in ("delrec.distill", "delrec.finetune", "delrec.evaluate"):
        __import__(module, fromlist=["stage_backbone"]).stage_backbone = counted


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="ml-100k", help="dataset name (ml-100k, synthetic, ...)")
    parser.add_argument("--source", default=None, help="local raw dataset folder (ml-100k: u.data, u.item)")
    parser.add_argument(
        "--backbone", required=True, help="local model folder, or tiny-llama for a CPU smoke run"
    )
    parser.add_argument("--work", type=Path, required=True, help="output folder (finished stages are reused)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--soft-tokens", type=int, default=100)
    parser.add_argument("--distill-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=1400)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--init-r", type=int, default=320)
    parser.add_argument("--eval-examples", type=int, default=None, help="test users scored (default all)")
    parser.add_argument(
        "--valid-examples",
        type=int,
        default=200,
        help="validation users scored at each of 4 evaluation points",
    )
    parser.add_argument("--teacher-epochs", type=int, default=200)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.FIELD=VALUE",
        help="override a distill/finetune/evaluate field, e.g. finetune.lr=3e-4 finetune.adalora_init=lora",
    )
    args = parser.parse_args(argv)
    overrides: dict[str, dict] = {"distill": {}, "finetune": {}, "evaluate": {}}
    for key, value in parse_assignments(args.set).items():
        stage, _, field = key.partition(".")
        if stage not in overrides or not field:
            parser.error(f"--set {key}: expected distill.FIELD, finetune.FIELD or evaluate.FIELD")
        overrides[stage][field] = value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    counter = TokenCounter()
    instrument(counter)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data, teacher = work / "data", work / "teacher"
    small = args.distill_steps < 50  # a smoke run: evaluate and checkpoint every few steps
    llm = {"backbone": args.backbone, "device": args.device, "batch_size": args.batch_size}
    cadence = {"eval_every": max(1, args.distill_steps // 4), "checkpoint_every": 100}
    stages: dict[str, dict] = {}

    def run(name: str, out: Path, fn, *, producer: str, config: dict | None, inputs: dict) -> None:
        """Run and time a stage, or reuse its output from an earlier run (``check_reusable``; data and
        teacher, ``config`` None, may come from another run whatever their settings)."""
        if (out / "manifest.json").is_file():  # reused from an earlier run: nothing to time
            check_reusable(out, producer=producer, config=config, inputs=inputs)
            print(f"[{name}] reusing {out}")
            stages[name] = {"reused": True}
            return
        counter.reset()
        if args.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.time()
        fn()
        if args.device != "cpu" and torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.time() - start
        tflops = counter.flops() / max(seconds, 1e-9) / 1e12
        stages[name] = {
            "seconds": round(seconds, 1),
            "tflop": counter.flops() / 1e12,
            "tflops": round(tflops, 3),
            "mfu": tflops / args.peak_tflops,
        }
        print(f"[{name}] {seconds:.1f} s, {tflops:.2f} TFLOP/s, MFU {100 * tflops / args.peak_tflops:.1f}%")
        if args.json is not None:  # after every stage, so a run stopped at a deadline keeps its figures
            args.json.write_text(json.dumps({"stages": stages}, indent=1))

    run(
        "preprocess",
        data,
        lambda: preprocess(
            PreprocessConfig(dataset=args.dataset, source=args.source)
            if args.dataset != "synthetic"
            else PreprocessConfig(dataset="synthetic", synthetic_users=120, synthetic_items=60),
            data,
        ),
        producer=layout.PREPROCESS,
        config=None,
        inputs={},
    )
    teacher_config = TeacherConfig(model="sasrec", max_epochs=args.teacher_epochs, device=args.device)
    run(
        "teacher",
        teacher,
        lambda: train_teacher(data, teacher_config, teacher),
        producer=layout.TRAIN_TEACHER,
        config=None,
        inputs={"dataset": data},
    )
    distill_config = DistillConfig.from_dict(
        {
            **llm,
            **cadence,
            "soft_tokens": args.soft_tokens,
            "soft_init": "vocab",
            "steps": args.distill_steps,
            "warmup_steps": args.distill_steps // 2,
            "eval_examples": 8 if small else args.valid_examples,
            **overrides["distill"],
        }
    )
    run(
        "distill",
        work / "distill",
        lambda: distill(data, teacher, distill_config, work / "distill"),
        producer=layout.DISTILL,
        config=distill_config.model_dump(mode="json"),
        inputs={"dataset": data, "teacher": teacher},
    )
    finetune_config = FinetuneConfig.from_dict(
        {
            **llm,
            "checkpoint_every": 100,
            "eval_every": max(1, args.finetune_steps // 4),
            "steps": args.finetune_steps,
            "warmup_steps": args.finetune_steps * 4 // 7,
            "init_r": args.init_r,
            "target_r": min(8, args.init_r - 1),
            "eval_examples": 8 if small else args.valid_examples,
            **overrides["finetune"],
        }
    )
    run(
        "finetune",
        work / "delrec",
        lambda: finetune(data, finetune_config, work / "delrec", work / "distill", teacher_dir=teacher),
        producer=layout.FINETUNE,
        config=finetune_config.model_dump(mode="json"),
        inputs=recorded_inputs(finetune_config, data, work / "distill", teacher),
    )
    run(
        "ablation",
        work / "ablation",
        lambda: finetune(data, finetune_config, work / "ablation", teacher_dir=teacher),
        producer=layout.FINETUNE,
        config=finetune_config.model_dump(mode="json"),
        inputs=recorded_inputs(finetune_config, data, teacher_dir=teacher),
    )
    eval_config = EvaluateConfig.from_dict(
        {
            "backbone": args.backbone,
            "device": args.device,
            "batch_size": args.batch_size,
            "max_examples": args.eval_examples,
            "prompt_only": True,  # stage 1 alone, paired against the untuned LLM: cheap on a GPU
            **overrides["evaluate"],
        }
    )
    run(
        "evaluate",
        work / "evaluate",
        lambda: evaluate(
            data,
            teacher,
            eval_config,
            work / "evaluate",
            work / "delrec",
            work / "ablation",
            work / "distill",
        ),
        producer=layout.EVALUATE,
        config=eval_config.model_dump(mode="json"),
        inputs={
            "dataset": data,
            "teacher": teacher,
            "delrec": work / "delrec",
            "ablation": work / "ablation",
            "distill": work / "distill",
        },
    )
    figures = {
        "stages": stages,
        "total_seconds": round(sum(s.get("seconds", 0.0) for s in stages.values()), 1),  # timed stages
        "metrics": json.loads((work / "evaluate" / "metrics.json").read_text()).get("flat", {}),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else "cpu",
    }
    print(json.dumps(figures, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    try:
        main()
    except DelrecError as exc:
        sys.exit(f"error: {exc}")
