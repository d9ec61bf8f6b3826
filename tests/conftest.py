"""Shared fixtures: a small synthetic dataset folder, tiny trained stages on it, and the path to
../shared/datasets."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import ModuleType

# No test may download anything: the Hugging Face libraries (imported later, where they read it) and
# delrec.llm.backbone.check_backbone stay off the hub, in every process the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch

from delrec.artifacts import file_sha256
from delrec.data import PreprocessConfig, load_dataset, preprocess

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"

# Several pytest workers or a busy machine: keep torch to one thread so timings stay sane.
torch.set_num_threads(1)


def ancestors(tasks: dict) -> dict[str, set[str]]:
    """Task -> every task it (transitively) waits for, from a compiled DAG's dependentTasks."""
    seen: dict[str, set[str]] = {}

    def up(name: str) -> set[str]:
        if name not in seen:
            direct = set(tasks[name].get("dependentTasks", []))
            seen[name] = direct.union(*(up(d) for d in direct))
        return seen[name]

    return {name: up(name) for name in tasks}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic Dataset folder (leave-one-out split)."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    preprocess(PreprocessConfig(dataset="synthetic", synthetic_users=120, synthetic_items=60), out)
    return out


@pytest.fixture(scope="session")
def synthetic(synthetic_dir):
    return load_dataset(synthetic_dir)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks/ is no package), to call its main()."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/datasets; skips the test where it is absent."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def tiny_runs(synthetic_dir, tmp_path_factory) -> Path:
    """teacher/, distill/, delrec/ and ablation/ trained on ``synthetic_dir`` with a tiny LLM, in seconds.

    Tests read these folders and write elsewhere: they are shared by every test module."""
    from delrec.distill import DistillConfig, distill
    from delrec.finetune import FinetuneConfig, finetune
    from delrec.teachers import TeacherConfig, train_teacher

    tiny = {"backbone": "tiny-llama", "device": "cpu", "bf16": False, "history_items": 6}
    root = tmp_path_factory.mktemp("runs")
    train_teacher(
        synthetic_dir,
        TeacherConfig(model="sasrec", hidden=16, inner=32, layers=1, max_epochs=2, device="cpu"),
        root / "teacher",
    )
    distill(
        synthetic_dir,
        root / "teacher",
        DistillConfig(**tiny, soft_tokens=8, steps=2, batch_size=2, eval_examples=4),
        root / "distill",
    )
    ft = FinetuneConfig(
        **tiny, init_r=8, target_r=4, steps=3, batch_size=2, warmup_steps=1, lr=1e-2, eval_examples=4
    )
    finetune(synthetic_dir, ft, root / "delrec", distill_dir=root / "distill")
    finetune(synthetic_dir, ft, root / "ablation")
    return root


def checkpoint_workspace(request, monkeypatch, workspace: str, task: str):
    """(checkpoint location, store) of a resume test: ``workspace`` "beside the output" gives (None, None);
    "object store, ..." a run prefix on the moto server (the module must import test_store's fixtures)."""
    if not workspace.startswith("object store"):
        return None, None
    from test_store import BUCKET

    monkeypatch.setenv("DELREC_S3_ENDPOINT", request.getfixturevalue("moto_endpoint"))
    monkeypatch.setenv("DELREC_S3_SECURE", "0")
    return f"s3://{BUCKET}/checkpoints/run-1/{task}", request.getfixturevalue("store")


def with_prompt_fields(folder, out, **fields):
    """A copy of a fine-tuned model folder with prompt.json fields changed (the manifest re-signed)."""
    shutil.copytree(folder, out)
    prompt = json.loads((out / "prompt.json").read_text())
    (out / "prompt.json").write_text(json.dumps({**prompt, **fields}))
    manifest = json.loads((out / "manifest.json").read_text())  # re-signed: past the integrity check
    size, sha = (out / "prompt.json").stat().st_size, file_sha256(out / "prompt.json")
    manifest["files"]["prompt.json"] = {"sha256": sha, "size": size}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def assert_backbone_as_built(folder: Path, name: str, titles) -> tuple:
    """``folder``'s saved backbone is bit-identical to ``build_tiny(name, titles)``: a stage that trains a
    soft prompt or adapters left the LLM's own weights alone. Returns (saved backbone, fresh model)."""
    from delrec.llm.backbone import build_tiny, load_backbone

    saved = load_backbone(str(folder / "backbone"), device="cpu", autocast=False)
    fresh, _ = build_tiny(name, titles)
    saved_state = saved.base_model().state_dict()
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved_state[key]), key
    return saved, fresh
