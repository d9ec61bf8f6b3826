"""Data parallelism under torchrun (CPU, gloo): two processes train and score what one process does.

Each torchrun test starts ``python -m torch.distributed.run --nproc-per-node 2 -m delrec.cli ...`` on the
tiny models of conftest and compares with the same stage run in this process. Tolerance: the ranks'
shares are summed in another order than one process sums the batch, so losses and weights agree to
floating-point noise (fp32: 1e-5 here); validation figures, which rank candidates, agree exactly.
Dropout is 0 (``lora_dropout``; the distill stage runs its frozen LLM without dropout): with dropout
the ranks draw other masks than one process (see :mod:`delrec.distributed`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from delrec import distributed
from delrec.distill import DistillConfig, distill
from delrec.errors import DelrecError
from delrec.evaluate import EvaluateConfig, evaluate
from delrec.finetune import FinetuneConfig, finetune
from delrec.llm.backbone import load_backbone
from delrec.llm.sharding import shard_backbone
from delrec.llm.training import apply_sharding

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
TOLERANCE = 1e-5
TINY = {"backbone": "tiny-llama", "device": "cpu", "bf16": False}
# Batches of 4 shared by 2 ranks; odd validation and test counts, so the ranks' shares differ in size.
DISTILL = dict(
    TINY,
    history_items=6,
    soft_tokens=8,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    eval_every=2,
    eval_examples=7,
    checkpoint_every=2,
)
FINETUNE = dict(
    TINY,
    history_items=6,
    init_r=8,
    target_r=4,
    tinit=1,  # AdaLoRA reallocates ranks within the 4 steps
    tfinal=1,
    lora_dropout=0.0,
    lr=1e-2,
    steps=4,
    batch_size=4,
    warmup_steps=1,
    eval_every=2,
    eval_examples=7,
    checkpoint_every=2,
)
EVALUATE = dict(TINY, bootstrap_samples=20, max_examples=9)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` with this checkout's delrec, one torch thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), str(TESTS), env.get("PYTHONPATH")]))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def torchrun(entry: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2 <entry> <args>`` on this machine's CPU (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    return run([*command, "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *entry, *args])


def config_file(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def finetune_argv(synthetic_dir: Path, tiny_runs: Path, out: Path) -> list[str]:
    """``delrec.cli finetune`` on the synthetic data with the tiny runs' soft prompt (options follow)."""
    return [
        "finetune",
        "--data",
        str(synthetic_dir),
        "--distill",
        str(tiny_runs / "distill"),
        "--out",
        str(out),
    ]


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "history.json").read_text())


def assert_same_histories(one: list[dict], two: list[dict]) -> None:
    """Same steps and validation figures; losses, gradient norms and lr within the tolerance."""
    assert [r.keys() for r in one] == [r.keys() for r in two]
    for a, b in zip(one, two, strict=True):
        for key in a:
            if key.startswith("valid_") or key == "step":
                assert a[key] == b[key], (a, b)
            else:
                assert a[key] == pytest.approx(b[key], rel=TOLERANCE, abs=TOLERANCE), (key, a, b)


def assert_same_tensors(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=TOLERANCE, rtol=TOLERANCE, msg=key)


def assert_same_finetune(one: Path, two: Path) -> None:
    """Two finetune outputs agree: histories, a validated later step, adapter weights and AdaLoRA's rank
    allocation (it reads the summed gradients, so it pruned the same ranks)."""
    assert_same_histories(history(one), history(two))
    assert any("valid_hr1" in r for r in history(two)[1:])
    assert_same_tensors(
        load_file(one / "adapter" / "adapter_model.safetensors"),
        load_file(two / "adapter" / "adapter_model.safetensors"),
    )
    configs = [json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (one, two)]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"] and configs[0]["rank_pattern"]


def test_one_process_helpers_are_identities():
    assert not torch.distributed.is_initialized()
    assert distributed.init_from_env("cpu") == "cpu"  # no torchrun environment: nothing joined
    assert not torch.distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.shard_indices(5).tolist() == [0, 1, 2, 3, 4]
    rows = np.arange(6).reshape(3, 2)
    assert distributed.gather_rows(rows) is rows
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object([1, 2]) == [1, 2]
    tensor = torch.ones(3)
    distributed.sum_across_ranks([tensor])
    assert tensor.tolist() == [1.0, 1.0, 1.0]
    param = torch.nn.Parameter(torch.ones(2))
    distributed.sum_gradients([param])
    assert param.grad is None  # one process: gradients untouched, as before
    assert distributed.rank_seed(1234) == 1234
    distributed.barrier()


@pytest.mark.parametrize("n, world", [(7, 2), (4, 4), (3, 4), (20, 3)])
def test_shards_cover_every_index_once_in_rank_order(monkeypatch, n, world):
    shards = []
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shards.append(distributed.shard_indices(n).tolist())
    assert sum(shards, []) == list(range(n))  # gather_rows concatenates in rank order
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_gather_rows_leaves_out_empty_shares_of_another_width(monkeypatch):
    parts = [np.ones((2, 5)), np.zeros((1, 5)), np.zeros((0, 0))]  # rank 2 had nothing to score
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "gather_objects", lambda local: parts)
    assert distributed.gather_rows(parts[0]).tolist() == [[1.0] * 5, [1.0] * 5, [0.0] * 5]


def test_rank_seeds_are_independent_and_rank_zero_keeps_one_process_seed(monkeypatch):
    seeds = []
    for rank in range(4):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        seeds.append([distributed.rank_seed(step) for step in range(50)])
    assert seeds[0] == list(range(50))
    flat = sum(seeds, [])
    assert len(set(flat)) == len(flat) and all(0 <= s < 2**63 for s in flat)


def test_fsdp_in_one_process_is_replicate(caplog):
    config = FinetuneConfig(**FINETUNE, sharding="fsdp")
    backbone = load_backbone("tiny-llama", titles=["a title"], device="cpu", autocast=False)
    with caplog.at_level("INFO", logger="delrec.llm.sharding"):
        apply_sharding(config, backbone)
    assert "held whole (as replicate)" in caplog.text
    assert not any(isinstance(p, DTensor) for p in backbone.model.parameters())


def test_sharding_is_left_out_of_the_run_key():
    replicate, fsdp = FinetuneConfig(**FINETUNE), FinetuneConfig(**FINETUNE, sharding="fsdp")
    assert replicate.run_hash() == fsdp.run_hash() == replicate.hash() != fsdp.hash()
    assert FinetuneConfig(**FINETUNE | {"lr": 0.5}).run_hash() != replicate.run_hash()


def test_fsdp_refuses_encoder_decoder_backbones(monkeypatch):
    backbone = load_backbone("tiny-t5", titles=["a title"], device="cpu", autocast=False)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(DelrecError, match="decoder-only"):
        shard_backbone(backbone)


def test_config_file_then_options_then_set(tmp_path):
    from delrec.cli import build_parser
    from delrec.llm.cli import _config

    path = config_file(tmp_path, "cfg", {**FINETUNE, "steps": 7, "lr": 0.5})
    argv = ["finetune", "--data", "d", "--out", "o", "--preset", "demo", "--config", path, "--lr", "0.25"]
    args = build_parser().parse_args([*argv, "--set", "batch_size=6"])
    config = _config(FinetuneConfig, "finetune", args)
    assert (config.steps, config.lr, config.batch_size) == (7, 0.25, 6)
    (tmp_path / "bad.json").write_text("[1, 2]")
    args = build_parser().parse_args(
        ["finetune", "--data", "d", "--out", "o", "--config", str(tmp_path / "bad.json")]
    )
    with pytest.raises(DelrecError, match="mapping"):
        _config(FinetuneConfig, "finetune", args)


@pytest.mark.parametrize("stage", ["distill", "finetune"])
def test_a_training_cli_takes_its_checkpoint_location(stage, monkeypatch):
    # What torchrun and a TrainJob start on every rank: the stage's CLI, resuming from --checkpoint or the
    # pipeline's workspace.
    from delrec.cli import build_parser
    from delrec.llm.cli import _checkpoint

    common = [stage, "--data", "d", "--out", "o", "--teacher", "t"]
    args = build_parser().parse_args([*common, "--checkpoint", "s3://b/ck"])
    assert _checkpoint(args) == "s3://b/ck"
    monkeypatch.delenv("DELREC_CHECKPOINT_ROOT", raising=False)
    assert _checkpoint(build_parser().parse_args(common)) is None


@pytest.fixture(scope="module")
def one_process_finetune(synthetic_dir, tiny_runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "finetune"
    finetune(synthetic_dir, FinetuneConfig(**FINETUNE), out, distill_dir=tiny_runs / "distill")
    return out


@pytest.fixture(scope="module")
def one_process_distill(synthetic_dir, tiny_runs, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("one") / "distill"
    return out, distill(synthetic_dir, tiny_runs / "teacher", DistillConfig(**DISTILL), out)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_distill_under_two_processes_matches_one(
    synthetic_dir, tiny_runs, one_process_distill, tmp_path, sharding
):
    (one, metrics), two = one_process_distill, tmp_path / "two"
    args = [
        "distill",
        "--data",
        str(synthetic_dir),
        "--teacher",
        str(tiny_runs / "teacher"),
        "--out",
        str(two),
    ]
    # 7 validation examples in batches of 3: rank 0 scores 4 (2 batches), rank 1 3 (1 batch). Under FSDP each
    # decoder call is a collective, so the shares are padded to the same number of calls.
    config = config_file(tmp_path, "d", DISTILL | {"sharding": sharding, "eval_batch_size": 3})
    done = torchrun(["-m", "delrec.cli"], [*args, "--config", config])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2 (gloo)" in done.stderr  # one process group, not two runs side by side
    assert ("sharding: fsdp over 2 ranks" in done.stderr) == (sharding == "fsdp")
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # by rank 0 only
    assert printed[0]["best_valid_acc"] == pytest.approx(metrics["best_valid_acc"], abs=1e-4)
    assert_same_histories(history(one), history(two))
    assert_same_tensors(
        load_file(one / "soft_prompt.safetensors"), load_file(two / "soft_prompt.safetensors")
    )
    # The tiny backbone is saved whole, as one process saves it (saved before the layers are sharded).
    assert_same_tensors(
        load_file(one / "backbone" / "model.safetensors"), load_file(two / "backbone" / "model.safetensors")
    )
    assert not two.with_name("two.partial").exists()


@pytest.mark.slow
def test_finetune_component_with_two_ranks_matches_one_process(
    synthetic_dir, tiny_runs, one_process_finetune, tmp_path, monkeypatch, capfd
):
    """The whole in-pod path: the KFP component hands 2 ranks to delrec.launch, which runs torchrun on
    ``delrec.cli finetune --config``; the adapter equals one process's."""
    from kfp.dsl import Dataset, Metrics, Model

    import components

    two = tmp_path / "two"
    monkeypatch.setenv("DELREC_NPROC_PER_NODE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])))
    artifact = lambda cls, path: cls(name=Path(path).name, uri=str(path), metadata={})  # noqa: E731
    components.finetune.python_func(
        config=FINETUNE,
        dataset=artifact(Dataset, synthetic_dir),
        soft_prompt=artifact(Model, tiny_runs / "distill"),
        model=artifact(Model, two),
        metrics=artifact(Metrics, tmp_path / "metrics"),
    )
    # torchrun streams both ranks' output, stderr included, into the task's log (stdout).
    assert "rank 0 of 2 (gloo)" in capfd.readouterr().out  # one process group, not two runs side by side
    assert_same_finetune(one_process_finetune, two)


@pytest.mark.slow
def test_fsdp_finetune_with_two_ranks_matches_one_process(
    synthetic_dir, tiny_runs, one_process_finetune, tmp_path
):
    """``sharding: fsdp``: each rank holds half of the decoder layers' weights; the adapter, its AdaLoRA
    rank pattern and the validation figures equal one process's (the saved adapter is the same file)."""
    two = tmp_path / "two"
    args = finetune_argv(synthetic_dir, tiny_runs, two)
    config = config_file(tmp_path, "f", FINETUNE | {"sharding": "fsdp"})
    done = torchrun(["-m", "delrec.cli"], [*args, "--config", config])
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 logs what it holds: the sharded layers' half plus the whole embeddings (tied output head).
    held = re.search(
        r"sharding: fsdp over 2 ranks: this rank holds ([\d.]+) MB of the backbone's ([\d.]+) MB", done.stderr
    )
    assert held is not None, done.stderr[-3000:]
    assert float(held[1]) < 0.75 * float(held[2])
    assert_same_finetune(one_process_finetune, two)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_two_process_run_killed_after_a_checkpoint_resumes_as_one(
    synthetic_dir, tiny_runs, one_process_finetune, tmp_path, sharding
):
    """A checkpoint holds no trace of the world size or the sharding (the adapters are whole either
    way): a 2-rank run killed after a checkpoint resumes in one process, with replicate."""
    out = tmp_path / "resumed"
    args = finetune_argv(synthetic_dir, tiny_runs, out)
    killed_config = config_file(tmp_path, "killed", FINETUNE | {"sharding": sharding})
    # Both ranks fail inside step 3, after rank 0 wrote the checkpoint of step 2.
    killed = torchrun([str(TESTS / "failing_cli.py"), "2"], [*args, "--config", killed_config])
    assert killed.returncode != 0 and "killed in step 3" in killed.stderr, killed.stderr[-3000:]
    assert not out.exists() and (tmp_path / "resumed.partial" / "state.pt").is_file()
    resumed = run(
        [sys.executable, "-m", "delrec.cli", *args, "--config", config_file(tmp_path, "f", FINETUNE)]
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr  # steps 3-4 only, in one process
    assert_same_histories(history(one_process_finetune), history(out))
    assert_same_tensors(
        load_file(one_process_finetune / "adapter" / "adapter_model.safetensors"),
        load_file(out / "adapter" / "adapter_model.safetensors"),
    )
    assert not (tmp_path / "resumed.partial").exists()


@pytest.mark.slow
def test_evaluate_under_two_processes_writes_the_metrics_of_one(synthetic_dir, tiny_runs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    inputs = {"delrec_dir": tiny_runs / "delrec", "ablation_dir": tiny_runs / "ablation"}
    evaluate(synthetic_dir, tiny_runs / "teacher", EvaluateConfig(**EVALUATE), one, **inputs)
    args = ["evaluate", "--data", str(synthetic_dir), "--teacher", str(tiny_runs / "teacher")]
    args += [
        "--delrec",
        str(tiny_runs / "delrec"),
        "--ablation",
        str(tiny_runs / "ablation"),
        "--out",
        str(two),
    ]
    done = torchrun(["-m", "delrec.cli"], [*args, "--config", config_file(tmp_path, "e", EVALUATE)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2 (gloo)" in done.stderr  # one process group, not two runs side by side
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (one, two)]
    assert metrics[0]["flat"] == metrics[1]["flat"] and metrics[0]["catalogue"] == metrics[1]["catalogue"]
    assert metrics[1]["meta"]["examples"] == 9
    import pyarrow.parquet as pq

    assert pq.read_table(one / "ranks.parquet").equals(pq.read_table(two / "ranks.parquet"))


@pytest.mark.slow
def test_recommend_under_two_processes_writes_the_files_of_one(synthetic_dir, tiny_runs, tmp_path):
    """Each rank writes every other shard; rank 0 assembles the same shards one process writes."""
    import pyarrow.parquet as pq

    from delrec import layout
    from delrec.recommend import RecommendConfig, recommend

    one, two = tmp_path / "one", tmp_path / "two"
    config = dict(TINY, retrieve_k=8, top_n=5, shard_users=37)
    recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", RecommendConfig(**config), one)
    args = ["recommend", "--data", str(synthetic_dir), "--teacher", str(tiny_runs / "teacher")]
    args += ["--delrec", str(tiny_runs / "delrec"), "--out", str(two)]
    done = torchrun(["-m", "delrec.cli"], [*args, "--config", config_file(tmp_path, "r", config)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0 of 2 (gloo)" in done.stderr  # one process group, not two runs side by side
    files = [sorted((d / layout.RECOMMENDATIONS).glob("part-*.parquet")) for d in (one, two)]
    assert [f.name for f in files[0]] == [f.name for f in files[1]] and len(files[0]) >= 3
    for a, b in zip(*files, strict=True):
        first, second = pq.read_table(a).to_pydict(), pq.read_table(b).to_pydict()
        # Scores to the tolerance (the processes run other thread counts), the rest exactly.
        np.testing.assert_allclose(
            first.pop("llm_score"), second.pop("llm_score"), rtol=TOLERANCE, atol=TOLERANCE
        )
        assert first == second, a.name
    assert not two.with_name("two.partial").exists()
