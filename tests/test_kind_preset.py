"""The presets a kind cluster runs (kind, demo) fit one ~8 GB kind node next to KFP: every task's requests,
and the largest set of tasks the compiled graph lets run at once, read from the compiled YAML."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ancestors

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402
from delrec import images  # noqa: E402
from delrec.config import STAGES, load_preset  # noqa: E402

GI = 2**30
# A kind node as Docker Desktop / Podman machine give it: 8 GB, 4 cores. KFP standalone, its SeaweedFS and the
# Kubernetes control plane request about 2.5 GiB and 1.2 cores; keep that much and a margin for the driver
# pods KFP starts beside each task.
NODE_MEMORY, NODE_CPU = 8 * GI, 4.0
KFP_MEMORY, KFP_CPU = 3 * GI, 1.5


def quantity(text: str) -> float:
    """A Kubernetes quantity ("3Gi", "512Mi", "500m", "2") as a number of bytes or cores."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def task_requests(path: Path) -> tuple[dict[str, tuple[float, float]], dict[str, set[str]]]:
    """Root-DAG task -> (memory, cpu) requested (a condition group: the sum of its tasks), and each task's
    ancestors."""
    spec = next(yaml.safe_load_all(path.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    components = spec["components"]

    def requests(component: str) -> tuple[float, float]:
        comp = components[component]
        if "dag" in comp:  # dsl.If group: its tasks run one after another or together; count them all
            inner = [requests(t["componentRef"]["name"]) for t in comp["dag"]["tasks"].values()]
            return sum(m for m, _ in inner), sum(c for _, c in inner)
        res = executors[comp["executorLabel"]]["container"]["resources"]
        return quantity(res["resourceMemoryRequest"]), quantity(res["resourceCpuRequest"])

    tasks = spec["root"]["dag"]["tasks"]
    return {n: requests(t["componentRef"]["name"]) for n, t in tasks.items()}, ancestors(tasks)


def largest_concurrent(reqs: dict[str, tuple[float, float]], up: dict[str, set[str]], axis: int) -> float:
    """The most memory (axis 0) or cores (axis 1) of tasks that may run at once: no one waits for another."""
    best = 0.0
    names = list(reqs)
    for r in range(1, len(names) + 1):
        for group in itertools.combinations(names, r):
            if all(a not in up[b] and b not in up[a] for a, b in itertools.combinations(group, 2)):
                best = max(best, sum(reqs[n][axis] for n in group))
    return best


@pytest.mark.parametrize("preset", ["kind", "demo"])
def test_preset_fits_an_8gb_kind_node_beside_kfp(tmp_path, preset):
    options = pipeline.pipeline_arguments(preset)[0]
    reqs, up = task_requests(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    assert {"preprocess", "distill", "finetune", "finetune-2", "evaluate"} <= set(reqs)
    for name, (memory, cpu) in reqs.items():
        assert memory <= NODE_MEMORY - KFP_MEMORY and cpu <= NODE_CPU - KFP_CPU, (name, memory / GI, cpu)
    assert largest_concurrent(reqs, up, 0) <= NODE_MEMORY - KFP_MEMORY
    assert largest_concurrent(reqs, up, 1) <= NODE_CPU - KFP_CPU


def test_ml_100k_preset_does_not_fit_a_kind_node(tmp_path):
    """The check above can fail: the GPU-cluster preset asks for 32 GiB per LLM task."""
    reqs, up = task_requests(
        pipeline.compile_pipeline(tmp_path / "p.yaml", pipeline.pipeline_arguments("ml-100k")[0])
    )
    assert largest_concurrent(reqs, up, 0) > NODE_MEMORY - KFP_MEMORY


def test_largest_concurrent_set_counts_the_ablation_beside_distill():
    reqs = {"prep": (1.0, 1), "distill": (3.0, 1), "tune": (3.0, 1), "ablation": (3.0, 1), "eval": (2.0, 1)}
    up = {"prep": set(), "distill": {"prep"}, "tune": {"prep", "distill"}, "ablation": {"prep"}}
    up["eval"] = {"prep", "distill", "tune", "ablation"}
    assert largest_concurrent(reqs, up, 0) == 6.0
    up["ablation"] = {"prep", "distill", "tune"}  # serialised, as with a ReadWriteOnce cache
    assert largest_concurrent(reqs, up, 0) == 3.0


def test_kind_preset_trains_what_ml_100k_trains():
    """Only the Kubernetes settings differ: a kind run reproduces the ml-100k results."""
    kind, ml100k = load_preset("kind"), load_preset("ml-100k")
    assert {s: kind.get(s) for s in STAGES} == {s: ml100k.get(s) for s in STAGES}


def test_kind_preset_runs_the_llm_stages_on_the_cpu_image_without_gpus():
    options, arguments = pipeline.pipeline_arguments("kind")
    assert options.gpus == 0
    assert options.gpu_image == options.cpu_image == images.cpu_image() == arguments["gpu_image"]


def test_gpus_zero_keeps_a_gpu_image_that_is_named(tmp_path):
    named = images.gpu_image()
    options = pipeline.pipeline_arguments("demo", None, ["gpus=0", f"gpu_image={named}"])[0]
    assert options.gpu_image == named
    assert pipeline.pipeline_arguments("demo")[0].gpu_image == named  # gpus: 1
