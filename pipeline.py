"""The DELRec Kubeflow pipeline: graph and command line.

    preprocess -> train_teacher -> distill -> finetune (with the soft prompt) --+
              \\-> finetune (ablation: no soft prompt) ----------------------+--> evaluate -> [publish]

Commands:
    python pipeline.py compile [--out FILE] [--preset NAME]
    python pipeline.py run [--preset NAME] [--data PATH] [--no-cache] [param=value ...]  (kfp.local, here)
    python pipeline.py submit --host URL [--experiment NAME] [--pipeline-root s3://...] [param=value ...]
    python pipeline.py schedule --host URL --cron "0 0 3 * * *" [param=value ...]

Each stage's config travels as a dict parameter (the preset's section plus overrides), so KFP's cache
key changes whenever a config or an input changes. ``param=value`` overrides take ``section.field=value``
(``teacher.max_epochs=5``), a pipeline parameter (``publish_to=s3://models``), ``teacher=gru4rec``, or a
field name shared by stage configs (``seed=7``, ``backbone=...`` set it in every stage that has it).
Values are parsed as YAML. The preset's ``pipeline:`` section holds the Kubernetes settings
(images, GPU scheduling, resources, retries, timeouts, secrets, publishing); ``gpus=N`` (or
``pipeline.gpus=N``) is baked into the compiled spec, as the KFP driver drops an int placeholder.

``run`` reuses, as a cluster does, the outputs of every task whose key is unchanged: component and its
code, image, stage config, the input artifacts (with their ``content_fingerprint``), the source's
fingerprint, and locally the delrec library's sources (a cluster's image tag). Changing one stage's
config re-runs that stage and everything downstream. The cache lies in ROOT/.kfp_cache (``make
clean`` removes it); ``--no-cache`` runs every task. Publish is never served from a cache.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

import argparse
import hashlib
import importlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Markdown
from kfp.local import cache as kfp_cache
from kfp.local.cache import LocalCache
from pydantic import Field, field_validator, model_validator

import delrec
from components import distill, evaluate, finetune, preprocess, publish, train_teacher
from delrec import images
from delrec.config import STAGES, StageConfig, load_preset
from delrec.errors import DelrecError
from delrec.store import QualityGate, is_s3_uri, local_fingerprint

REPO = Path(__file__).resolve().parent
PIPELINE_NAME = "delrec"
COMPILED = REPO / "pipeline.yaml"
DEFAULT_PRESET = "ml-100k"
# Where each stage's config class lives (validated before anything runs).
CONFIG_CLASSES = {
    "preprocess": ("delrec.data", "PreprocessConfig"),
    "teacher": ("delrec.teachers", "TeacherConfig"),
    "distill": ("delrec.distill", "DistillConfig"),
    "finetune": ("delrec.finetune", "FinetuneConfig"),
    "evaluate": ("delrec.evaluate", "EvaluateConfig"),
}

# Run parameters whose defaults come from the preset's pipeline: section.
OPTION_RUN_PARAMS = (
    "cpu_image", "gpu_image", "s3_secret", "publish_to", "gate",
)  # fmt: skip
# Options that are baked into the compiled spec (no run parameter), settable as ``name=value`` too: KFP's
# driver fills pod-spec placeholders with a parameter's *string* value, so an int GPU count would be lost.
COMPILE_TIME_OPTIONS = ("gpus",)
# What delrec.store reads besides the credentials: the keys of the s3_config_map ConfigMap, set as these
# environment variables of every task.
S3_SETTINGS_ENV = ("DELREC_S3_ENDPOINT", "DELREC_S3_SECURE", "DELREC_S3_REGION")

log = logging.getLogger("pipeline")


class Resources(StageConfig):
    """Kubernetes requests (and optional limits) of one task."""

    cpu: str = "1"
    memory: str = "4Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None


def _default_resources() -> dict[str, Resources]:
    return {
        "preprocess": Resources(cpu="1", memory="4Gi"),
        "teacher": Resources(cpu="4", memory="8Gi"),
        "distill": Resources(cpu="4", memory="32Gi"),
        "finetune": Resources(cpu="4", memory="32Gi"),
        "evaluate": Resources(cpu="4", memory="16Gi"),
        "publish": Resources(cpu="500m", memory="1Gi"),
    }


class PipelineOptions(StageConfig):
    """The preset's ``pipeline:`` section: how the graph is scheduled and where things go."""

    cpu_image: str = Field(default_factory=images.cpu_image)
    """image of preprocess, teacher and publish (a run parameter too)"""
    gpu_image: str = Field(default_factory=images.gpu_image)
    """image of distill, finetune and evaluate, the stages that load the LLM (a run parameter too)"""
    accelerator: str = "nvidia.com/gpu"

    @field_validator("cpu_image", "gpu_image")
    @classmethod
    def _immutable(cls, image: str) -> str:
        # KFP's cache key holds the image string: a tag rebuilt in place serves stale results.
        if problem := images.immutable_reference(image):
            raise ValueError(f"{problem}; use the tag `make images` builds or a digest (name@sha256:...)")
        return image

    gpus: int = Field(1, ge=0)
    """GPUs per GPU task, baked into the compiled spec; 0: the GPU stages run as CPU tasks, on the CPU image
    unless gpu_image is given"""

    @model_validator(mode="before")
    @classmethod
    def _cpu_image_without_gpus(cls, data: Any) -> Any:
        # Without a GPU the ~6 GB CUDA image buys nothing, and a kind cluster holds only the CPU image.
        if isinstance(data, dict) and data.get("gpus") == 0 and "gpu_image" not in data:
            data = {**data, "gpu_image": data.get("cpu_image") or images.cpu_image()}
        return data

    gpu_toleration: str = "nvidia.com/gpu"
    """taint key the GPU tasks tolerate (operator Exists, effect NoSchedule)"""
    gpu_node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    """node labels a GPU task requires (the default is the one NVIDIA's GPU operator sets); tolerating
    the GPU taint only allows a GPU node, this keeps the task off CPU nodes; {}: none"""
    shm_size: str = "16Gi"
    """memory-backed /dev/shm of the GPU tasks (PyTorch data loaders and NCCL need more than 64M)"""
    gpu_timeout_s: int = Field(6 * 3600, ge=0)
    cpu_timeout_s: int = Field(2 * 3600, ge=0)
    retries: int = Field(2, ge=0)
    retry_backoff: str = "60s"
    retry_backoff_factor: float = 2.0
    retry_backoff_max: str = "1800s"
    resources: dict[str, Resources] = Field(default_factory=_default_resources)
    caching: bool = True
    s3_secret: str = "delrec-s3"
    """Kubernetes secret with the object-store credentials (a run parameter too)"""
    s3_secret_keys: dict[str, str] = Field(
        default_factory=lambda: {"accesskey": "DELREC_S3_ACCESS_KEY", "secretkey": "DELREC_S3_SECRET_KEY"}
    )
    """secret key -> environment variable (KFP's own mlpipeline-minio-artifact secret uses these keys)"""
    hf_secret: str = "delrec-hf"
    """optional secret whose ``token`` becomes HF_TOKEN on the tasks that load the LLM (gated models)"""
    s3_config_map: str = "delrec-object-store"
    """ConfigMap (manifests/base) whose keys DELREC_S3_ENDPOINT (host:port or URL), DELREC_S3_SECURE and
    DELREC_S3_REGION become every task's environment: the one place that says where the object store is"""
    publish_to: str = ""
    """s3://bucket[/prefix] of the model registry; empty: no publish step"""
    gate: dict[str, Any] = Field(default_factory=dict)
    """quality gate (delrec.store.QualityGate fields): candidate, baseline, margin, paired (the bootstrap
    interval must clear the margin), against_champion, champion_margin"""
    model_cache_pvc: str = "delrec-model-cache"
    """claim mounted at /cache (HF_HOME, DELREC_CACHE) on the tasks that load data or the LLM, so a backbone
    or dataset downloads once per cluster; empty: none"""
    model_cache_access: Literal["ReadWriteMany", "ReadWriteOnce"] = "ReadWriteMany"
    """the claim's access mode. ReadWriteMany (manifests/overlays/gpu): the LLM tasks run side by side.
    ReadWriteOnce (the kind overlay): a volume attaches to one node at a time (two pods on two nodes:
    Multi-Attach error), so the tasks that mount it run one after another"""
    local_root: str = "local_outputs/pipeline_root"
    """pipeline root of ``run`` (kfp.local)"""


class Outputs(NamedTuple):
    metrics: dict
    evaluation: Artifact
    report: Markdown
    report_html: HTML


def _config_class(stage: str) -> type[StageConfig]:
    module, name = CONFIG_CLASSES[stage]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise DelrecError(
            f"stage {stage!r} is not available in this delrec ({module}.{name}: {exc})"
        ) from None


def _resources(task: dsl.PipelineTask, res: Resources) -> None:
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)


def build_pipeline(options: PipelineOptions | None = None):
    """The pipeline function, with the Kubernetes settings of ``options`` baked in."""
    o = options or PipelineOptions()

    def cpu_task(task: dsl.PipelineTask, stage: str, image) -> dsl.PipelineTask:
        task.set_container_image(image).set_caching_options(o.caching)
        _resources(task, o.resources.get(stage) or _default_resources()[stage])
        task.set_retry(o.retries, o.retry_backoff, o.retry_backoff_factor, o.retry_backoff_max)
        kubernetes.set_timeout(task, o.cpu_timeout_s)
        if o.s3_config_map:
            # Optional: a run that never touches s3:// needs no ConfigMap; one that does fails naming it.
            kubernetes.use_config_map_as_env(
                task, o.s3_config_map, {key: key for key in S3_SETTINGS_ENV}, optional=True
            )
        return task.set_display_name(stage)

    def gpu_task(task: dsl.PipelineTask, stage: str, image) -> dsl.PipelineTask:
        cpu_task(task, stage, image)
        if o.gpus:
            # A literal, not a parameter: the driver would resolve an int parameter to "" (no GPU).
            task.set_accelerator_type(o.accelerator).set_accelerator_limit(o.gpus)
            kubernetes.add_toleration(task, key=o.gpu_toleration, operator="Exists", effect="NoSchedule")
            for key, value in o.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=o.shm_size)
        kubernetes.set_timeout(task, o.gpu_timeout_s)
        return task

    def hf_token(task: dsl.PipelineTask) -> None:
        kubernetes.use_secret_as_env(task, o.hf_secret, {"token": "HF_TOKEN"}, optional=True)
        model_cache(task)

    def model_cache(task: dsl.PipelineTask) -> None:
        if o.model_cache_pvc:
            kubernetes.mount_pvc(task, pvc_name=o.model_cache_pvc, mount_path="/cache")

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DELRec: distil a sequential recommender's pattern into an LLM's soft prompt, "
        "fine-tune the LLM with AdaLoRA, evaluate against the teacher and the no-soft-prompt ablation.",
    )
    def delrec_pipeline(
        preprocess_config: dict,
        teacher_config: dict,
        distill_config: dict,
        finetune_config: dict,
        evaluate_config: dict,
        source: str = "",
        source_fingerprint: str = "",
        cpu_image: str = o.cpu_image,
        gpu_image: str = o.gpu_image,
        s3_secret: str = o.s3_secret,
        publish_to: str = o.publish_to,
        gate: dict = o.gate,
    ) -> Outputs:
        prep = preprocess(
            config=preprocess_config,
            source=source,
            source_fingerprint=source_fingerprint,
        )
        cpu_task(prep, "preprocess", cpu_image)
        # Optional: only an s3:// source needs the credentials.
        kubernetes.use_secret_as_env(prep, s3_secret, o.s3_secret_keys, optional=True)
        model_cache(prep)
        data = prep.outputs["dataset"]

        teacher = train_teacher(config=teacher_config, dataset=data)
        cpu_task(teacher, "teacher", cpu_image)

        soft = distill(config=distill_config, dataset=data, teacher=teacher.outputs["teacher"])
        gpu_task(soft, "distill", gpu_image)
        hf_token(soft)

        tuned = finetune(config=finetune_config, dataset=data, soft_prompt=soft.outputs["soft_prompt"])
        gpu_task(tuned, "finetune", gpu_image).set_display_name("finetune")
        hf_token(tuned)
        # The ablation: the same LLM and config without the soft prompt; needs only the dataset.
        ablation = finetune(config=finetune_config, dataset=data)
        gpu_task(ablation, "finetune", gpu_image).set_display_name("finetune-ablation")
        hf_token(ablation)

        if o.model_cache_pvc and o.model_cache_access == "ReadWriteOnce":
            # The ablation would run beside distill and finetune: with a ReadWriteOnce cache, on another
            # node it never starts. One mounting pod at a time instead.
            ablation.after(tuned)

        ev = evaluate(
            config=evaluate_config,
            dataset=data,
            teacher=teacher.outputs["teacher"],
            delrec=tuned.outputs["model"],
            ablation=ablation.outputs["model"],
            distill=soft.outputs["soft_prompt"],
        )
        gpu_task(ev, "evaluate", gpu_image)
        hf_token(ev)

        with dsl.If(publish_to != "", name="publish-configured"):
            pub = publish(
                metrics=ev.outputs["Output"],
                preprocess_config=preprocess_config,
                teacher_config=teacher_config,
                distill_config=distill_config,
                finetune_config=finetune_config,
                evaluate_config=evaluate_config,
                model=tuned.outputs["model"],
                soft_prompt=soft.outputs["soft_prompt"],
                evaluation=ev.outputs["evaluation"],
                destination=publish_to,
                pipeline_name=PIPELINE_NAME,
                # The job id, not the name: a recurring run from an inline package has an empty name, and
                # every scheduled run would write (and overwrite) the same bundle.
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                gate=gate,
            )
            # Never served from cache: a re-run must really push (and re-check the gate).
            cpu_task(pub, "publish", cpu_image).set_caching_options(False)
            kubernetes.use_secret_as_env(pub, s3_secret, o.s3_secret_keys)

        return Outputs(
            metrics=ev.outputs["Output"],
            evaluation=ev.outputs["evaluation"],
            report=ev.outputs["report"],
            report_html=ev.outputs["report_html"],
        )

    return delrec_pipeline


# --------------------------------------------------------------------------- arguments


def _fingerprint(source: str) -> str:
    """A hash of the source's contents so the preprocess cache key sees new data behind the same name."""
    from delrec.store import S3Store, local_fingerprint

    try:
        if is_s3_uri(source):
            return S3Store.from_env(attempts=1).fingerprint(source)
        if Path(source).exists():
            return local_fingerprint(source)
    except Exception as exc:  # best effort: the store may be reachable only inside the cluster
        log.warning(
            "no fingerprint of %s (%s): a cached preprocess may be reused if its data changed", source, exc
        )
    return ""


def pipeline_arguments(
    preset: str, data: str | None = None, overrides: Sequence[str] = ()
) -> tuple[PipelineOptions, dict[str, Any]]:
    """Options and run arguments from a preset, ``--data`` and ``param=value`` overrides (validated)."""
    sections = load_preset(preset)
    pipeline_section = dict(sections.get("pipeline", {}))
    configs = {stage: dict(sections.get(stage, {})) for stage in STAGES}
    run_params: dict[str, Any] = {}
    option_fields = set(PipelineOptions.model_fields)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DelrecError(f"expected param=value, got {item!r}")
        value = yaml.safe_load(raw) if raw else ""
        if "." in key:
            section, _, field = key.partition(".")
            if section == "pipeline":
                pipeline_section[field] = value
            elif section in configs:
                configs[section][field] = value
            else:
                raise DelrecError(f"{item!r}: unknown section {section!r}; expected one of {list(STAGES)}")
        elif key in ("source", "source_fingerprint", *OPTION_RUN_PARAMS):
            run_params[key] = raw if key.startswith("source") else value
            if key in option_fields:
                pipeline_section[key] = value
        elif key in COMPILE_TIME_OPTIONS:
            pipeline_section[key] = value
        elif key == "teacher":
            configs["teacher"]["model"] = value
        else:
            hit = [s for s in STAGES if key in _config_class(s).model_fields]
            if not hit:
                raise DelrecError(f"{item!r}: no stage config has a field {key!r}")
            for stage in hit:
                configs[stage][key] = value
    options = PipelineOptions.from_dict(pipeline_section, source=f"preset {preset}: pipeline")
    QualityGate.from_dict(run_params.get("gate", options.gate))
    publish_to = run_params.get("publish_to", options.publish_to)
    if publish_to and not is_s3_uri(publish_to):
        raise DelrecError(f"publish_to must be an s3://bucket[/prefix] URI, got {publish_to!r}")
    for stage in STAGES:  # fail now, not an hour into the run
        _config_class(stage).from_dict(configs[stage], source=f"preset {preset}: {stage}")
    arguments: dict[str, Any] = {f"{stage}_config": configs[stage] for stage in STAGES}
    if data:
        run_params["source"] = str(Path(data).resolve()) if not data.startswith("s3://") else data
    # A source set in the preprocess config (not --data) needs a fingerprint as much.
    source = run_params.get("source") or str(configs["preprocess"].get("source") or "")
    if source and "source_fingerprint" not in run_params:
        run_params["source_fingerprint"] = _fingerprint(source)
    for name in OPTION_RUN_PARAMS:
        run_params.setdefault(name, getattr(options, name))
    arguments.update(run_params)
    return options, arguments


# --------------------------------------------------------------------------- commands


def compile_pipeline(out: str | Path = COMPILED, options: PipelineOptions | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(out))
    return out


# kfp.local's task names (in the graph's order) -> the table's labels.
TASK_LABELS = {
    "preprocess": "preprocess",
    "train-teacher": "train_teacher",
    "distill": "distill",
    "finetune": "finetune",
    "finetune-2": "finetune (ablation)",
    "evaluate": "evaluate",
    "publish": "publish",
}
# kfp.local's task cache, under the local pipeline root: the entries name artifacts in the run folders
# beside them, so `make clean` (which removes local_outputs) clears both at once.
CACHE_DIR = ".kfp_cache"


class VerifiedCache(LocalCache):
    """kfp.local's file-backed task cache (same key: component, image, command, inputs, env), with
    each entry checked when read.

    kfp's own cache treats an unreadable entry or a missing artifact as a miss, but serves an entry of
    the wrong shape as an error and one whose artifact files changed as a hit. Here an entry carries
    a checksum of itself, each artifact with a ``content_fingerprint`` (written by the stages) is
    hashed again, and any failure is a miss (logged), never an error. ``hits`` keeps what each hit
    served (key -> outputs), for the run's table.
    """

    def __init__(self, cache_root: str, code: str = "") -> None:
        super().__init__(cache_root)
        self.code = code
        self.hits: dict[str, dict[str, Any]] = {}

    def compute_key(
        self,
        component_name: str,
        image: str,
        full_command: list[str],
        arguments: dict[str, Any],
        env_vars: dict[str, str] | None = None,
        custom_cache_key: str | None = None,
    ) -> str:
        # Locally the image name stays put while the library under it changes: the library's own
        # fingerprint stands in for the immutable image tag a cluster run is compiled with.
        env = {**(env_vars or {}), "DELREC_CODE_FINGERPRINT": self.code}
        return super().compute_key(component_name, image, full_command, arguments, env, custom_cache_key)

    @staticmethod
    def _checksum(serialized: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(serialized, sort_keys=True).encode()).hexdigest()

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        serialized = self._serialize_outputs(outputs)
        entry = json.dumps({"outputs": serialized, "sha256": self._checksum(serialized)})
        # Atomic: a concurrent reader or a killed run never sees half an entry.
        fd, tmp = tempfile.mkstemp(prefix=".entry-", suffix=".tmp", dir=self.cache_root)
        with os.fdopen(fd, "w") as handle:
            handle.write(entry)
        os.replace(tmp, self._entry_path(key))

    def get(self, key: str) -> dict[str, Any] | None:
        path = Path(self._entry_path(key))
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["sha256"] != self._checksum(entry["outputs"]):
                raise ValueError("checksum mismatch")
            outputs = self._deserialize_outputs(entry["outputs"])  # raises if an artifact is gone
            for value in outputs.values():
                for artifact in value if isinstance(value, list) else [value]:
                    expected = getattr(artifact, "metadata", {}).get("content_fingerprint")
                    if expected and local_fingerprint(artifact.path) != expected:
                        raise ValueError(f"the files of {artifact.uri} changed since")
        except Exception as exc:  # whatever is wrong with an entry, running the task again repairs it
            log.warning("cache entry %s unusable (%s): a miss", path.name, exc)
            return None
        self.hits[key] = outputs
        return outputs


def code_fingerprint() -> str:
    """A hash of the delrec library's sources (``*.py``: compiled files come and go), which the
    components import."""
    package = Path(delrec.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class TaskClock(logging.Filter):
    """Times each kfp.local task from its "Executing task" and "finished" log records (the whole
    subprocess: interpreter start, imports and the stage itself) and notes which were cache hits."""

    START = re.compile(r"Executing task '([^']+)'")
    END = re.compile(r"Task '([^']+)' finished with status")
    HIT = re.compile(r"Task '?([^' ]+?)'? cache hit \(key=([0-9a-f]+)\)")
    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.hit_keys: dict[str, str] = {}
        """task -> the (shortened) key of the cache entry that served it"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.ANSI.sub("", str(record.msg))
        if match := self.START.search(message):
            self.started[match[1]] = record.created
        elif (match := self.END.search(message)) and match[1] not in self.seconds:
            self.seconds[match[1]] = record.created - self.started.get(match[1], record.created)
        elif match := self.HIT.search(message):
            self.seconds[match[1]] = 0.0
            self.hit_keys[match[1]] = match[2]
        return True


class StageRow(NamedTuple):
    """One line of the run's stage table."""

    task: str
    status: str
    """ran | cached"""
    seconds: float
    """in this run: the task's process, or (cached) next to nothing"""
    stage_seconds: float | None
    """inside the stage function when it ran (the ``wall_seconds`` of its Metrics artifact)"""
    ran_in: str
    """the run folder that produced the outputs"""


def _read_metrics(path: str | Path) -> dict[str, float]:
    """A stage's Metrics artifact file (JSON); empty where it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def stage_rows(clock: TaskClock, cache: VerifiedCache | None, run_dir: Path | None) -> list[StageRow]:
    """Each task of a finished kfp.local run: ran or cached, its time, and its stage's own time."""
    rows = []
    rank = {task: i for i, task in enumerate(TASK_LABELS)}
    for task, seconds in sorted(clock.seconds.items(), key=lambda item: rank.get(item[0], len(rank))):
        if task in clock.hit_keys and cache is not None:
            key = clock.hit_keys[task]
            outputs = next((o for k, o in cache.hits.items() if k.startswith(key)), {})
            metrics = outputs.get("metrics")
            uri = Path(metrics.uri) if metrics is not None else None
            status = "cached"
        else:
            uri = run_dir / task / "metrics" if run_dir is not None else None
            status = "ran"
        wall = _read_metrics(uri).get("wall_seconds") if uri is not None else None
        ran_in = uri.parents[1].name if uri is not None else (run_dir.name if run_dir else "")
        rows.append(StageRow(task, status, seconds, wall, ran_in))
    return rows


def format_stage_table(rows: Sequence[StageRow], total: float) -> str:
    """The stage table: task, ran or cached, time in this run (and share), time inside the stage."""
    lines = [f"{'task':<20} {'status':<7} {'this run':>9} {'share':>6}   {'in stage':>9}  ran in"]
    for row in rows:
        label = TASK_LABELS.get(row.task, row.task)
        inside = f"{row.stage_seconds:7.1f} s" if row.stage_seconds is not None else f"{'':9}"
        share = 100 * row.seconds / total if total > 0 else 0.0
        lines.append(
            f"{label:<20} {row.status:<7} {row.seconds:7.1f} s {share:5.1f}%   {inside}  {row.ran_in}"
        )
    return "\n".join(lines)


LABELS = {
    "delrec": "DELRec",
    "teacher": "teacher",
    "popularity": "popularity",
    "ablation": "LLM, no soft prompt",
    "zero_shot": "LLM, untuned",
}


def _metric_order(name: str) -> tuple[int, int]:
    """HR@k, then NDCG@k, then MRR, each by k: the paper's order, not the alphabet's."""
    family, _, k = name.partition("@")
    return {"HR": 0, "NDCG": 1, "MRR": 2}.get(family, 3), int(k) if k.isdigit() else 0


def format_metrics_table(models: dict[str, dict[str, float]]) -> str:
    """``{model: {metric: value}}`` (evaluate's metrics.json ``models``) as a models x metrics table."""
    names = dict.fromkeys(m for row in models.values() for m in row)
    columns = sorted(names, key=_metric_order)
    order = [m for m in LABELS if m in models] + [m for m in models if m not in LABELS]
    models = {m: models[m] for m in order}
    width = max(len(LABELS.get(m, m)) for m in models)
    lines = [" | ".join([f"{'model':<{width}}", *(f"{c:>8}" for c in columns)])]
    lines.append("-" * len(lines[0]))
    for model, row in models.items():
        cells = [f"{row[c]:>8.4f}" if c in row else f"{'':>8}" for c in columns]
        lines.append(" | ".join([f"{LABELS.get(model, model):<{width}}", *cells]))
    return "\n".join(lines)


def format_paired_table(paired: dict[str, dict[str, dict[str, float]]]) -> str:
    """evaluate's metrics.json ``paired`` section: DELRec minus each model, difference [95% interval].

    A ``*`` marks an interval that excludes 0 (the paired bootstrap tells the two models apart).
    """
    rows = {name.removeprefix("delrec_minus_"): cells for name, cells in paired.items()}
    columns = sorted(dict.fromkeys(m for cells in rows.values() for m in cells), key=_metric_order)
    width = max(len(f"DELRec - {LABELS.get(m, m)}") for m in rows)
    lines = [" | ".join([f"{'':<{width}}", *(f"{c:^24}" for c in columns)])]
    lines.append("-" * len(lines[0]))
    for model, cells in rows.items():
        out = []
        for c in columns:
            cell = cells[c]
            mark = "*" if cell["lo"] > 0 or cell["hi"] < 0 else " "
            out.append(f"{cell['diff']:+.3f} [{cell['lo']:+.3f}, {cell['hi']:+.3f}]{mark}")
        lines.append(" | ".join([f"{'DELRec - ' + LABELS.get(model, model):<{width}}", *out]))
    return "\n".join(lines)


class LastError:
    """A stdout wrapper that passes everything through and keeps the last exception line a task printed
    (kfp.local prints each task's output, traceback included, to stdout)."""

    LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>[A-Za-z_]\w*(?:Error|Exception)): (?P<why>.+)$")

    def __init__(self, stream) -> None:
        self.stream, self.last, self._partial = stream, "", ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if match := self.LINE.match(TaskClock.ANSI.sub("", line).strip()):
                self.last = f"{match['name']}: {match['why']}"
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def failure_line(error: RuntimeError, why: str) -> str:
    """One line for a failed kfp.local run: the task, the reason, and what a newcomer can do."""
    message = TaskClock.ANSI.sub("", str(error))
    task = re.search(r"Inner task failed: '([^']+)'", message)
    name = TASK_LABELS.get(task[1], task[1]) if task else "a task"
    hint = (
        "no network? run on a local copy: make run DATA=path/to/ml-100k"
        if name == "preprocess"
        else "its log is above"
    )
    return f"task {name} failed: {why or message}; {hint}"


def cmd_run(args: argparse.Namespace) -> int:
    from kfp import local

    options, arguments = pipeline_arguments(args.preset, args.data, args.params)
    # Locally a failure is a bug or bad input, not a preempted node: fail at once, no backoff.
    options = options.model_copy(update={"retries": 0})
    root = (REPO / (args.pipeline_root or options.local_root)).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cache_root = root / CACHE_DIR
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=not args.no_cache,
        cache_root=str(cache_root),
    )
    cache = None
    if not args.no_cache:
        # kfp.local builds its cache lazily from this singleton; ours checks each entry it serves.
        cache = VerifiedCache(str(cache_root), code=code_fingerprint())
        kfp_cache._cache_singleton, kfp_cache._cache_singleton_root = cache, str(cache_root)
    # Locally the Kubernetes settings and images mean nothing; kfp warns about each, twice per task.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image")
    print(
        f"kfp.local run of preset {args.preset} under {root} (Kubernetes settings and images are not used here; "
        + ("no cache)" if args.no_cache else f"cache: {cache_root})")
    )
    clock = TaskClock()
    root_logger = logging.getLogger()
    level = root_logger.level
    if not root_logger.isEnabledFor(logging.INFO):  # the clock reads kfp's INFO records
        root_logger.setLevel(logging.INFO)
    root_logger.addFilter(clock)
    before = {p for p in root.iterdir() if p.is_dir()}
    started = time.perf_counter()
    errors = LastError(sys.stdout)
    sys.stdout = errors
    try:
        result = build_pipeline(options)(**arguments)
    except RuntimeError as exc:  # kfp.local: a task failed (its traceback is above)
        raise DelrecError(failure_line(exc, errors.last)) from None
    finally:
        sys.stdout = errors.stream
        root_logger.removeFilter(clock)
        root_logger.setLevel(level)
    total = time.perf_counter() - started
    # A run where every task is a cache hit may leave no folder of its own.
    run_dir = next(iter(sorted({p for p in root.iterdir() if p.is_dir()} - before)), None)
    evaluation = Path(result.outputs["evaluation"].path)
    report = json.loads((evaluation / "metrics.json").read_text())
    meta = report.get("meta", {})
    print(
        f"\n== DELRec metrics: {meta.get('dataset', '?')} {meta.get('split', '?')} split, "
        f"{meta.get('examples', '?')} examples, ranked within {meta.get('universe', '?')} =="
    )
    print(format_metrics_table({m: r["metrics"] for m, r in report["models"].items()}))
    if report.get("paired"):
        print("\n== DELRec minus each model: difference [paired 95% bootstrap interval], * excludes 0 ==")
        print(format_paired_table(report["paired"]))
    rows = stage_rows(clock, cache, run_dir)
    counts = {status: sum(r.status == status for r in rows) for status in ("ran", "cached")}
    print(
        f"\n== wall time: {total:.1f} s in all; {counts['ran']} tasks ran, {counts['cached']} cached; "
        "per task (its process, of which in the stage function when it ran) =="
    )
    print(format_stage_table(rows, total))
    print("\n== artifacts ==")
    print(f"run folder:  {run_dir if run_dir is not None else '(none: every task was cached)'}")
    print(f"evaluation:  {evaluation}")
    print(f"report:      {result.outputs['report'].path}")
    print(f"report html: {result.outputs['report_html'].path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    options = pipeline_arguments(args.preset)[0] if args.preset else None
    print(compile_pipeline(args.out, options))
    return 0


def _client(host: str):
    import kfp

    return kfp.Client(host=host)


def cmd_submit(args: argparse.Namespace) -> int:
    options, arguments = pipeline_arguments(args.preset, args.data, args.params)
    client = _client(args.host)
    result = client.create_run_from_pipeline_func(
        build_pipeline(options),
        arguments=arguments,
        run_name=args.run_name,
        experiment_name=args.experiment,
        pipeline_root=args.pipeline_root,
    )
    print(f"submitted run {result.run_id}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    fields = args.cron.split()
    if len(fields) != 6:
        raise DelrecError(
            f"--cron {args.cron!r} has {len(fields)} fields; KFP takes 6, seconds first "
            "(e.g. '0 0 3 * * *' for 03:00 every day)"
        )
    options, arguments = pipeline_arguments(args.preset, args.data, args.params)
    client = _client(args.host)
    experiment = client.create_experiment(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(Path(tmp) / "pipeline.yaml", options)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=args.job_name,
            cron_expression=args.cron,
            params=arguments,
            pipeline_package_path=str(package),
            pipeline_root=args.pipeline_root,
            max_concurrency=1,
            no_catchup=True,
        )
    print(f"scheduled recurring run {job.recurring_run_id} ({args.cron})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="write the compiled pipeline YAML (committed)")
    p.add_argument("--out", default=str(COMPILED))
    p.add_argument("--preset", help="take the pipeline: section (Kubernetes settings) from this preset")
    p.set_defaults(handler=cmd_compile)

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--preset", default=DEFAULT_PRESET, help=f"configs/NAME.yaml (default {DEFAULT_PRESET})"
        )
        p.add_argument("--data", help="dataset source: a local copy (path) or s3:// URI")
        p.add_argument("params", nargs="*", metavar="param=value", help="overrides (see the module doc)")

    p = sub.add_parser("run", help="run the whole pipeline here with kfp.local")
    run_args(p)
    p.add_argument("--pipeline-root", help="local pipeline root (default: the preset's local_root)")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help=f"run every task (by default an unchanged task reuses its outputs; cache: ROOT/{CACHE_DIR})",
    )
    p.set_defaults(handler=cmd_run)

    for name, handler in (("submit", cmd_submit), ("schedule", cmd_schedule)):
        p = sub.add_parser(name, help=f"{name} on a Kubeflow Pipelines server")
        p.add_argument("--host", required=True, help="KFP API URL, e.g. http://localhost:8080")
        p.add_argument("--experiment", default="delrec")
        p.add_argument("--pipeline-root", help="e.g. s3://mlpipeline/delrec (default: the server's)")
        run_args(p)
        p.set_defaults(handler=handler)
    sub.choices["submit"].add_argument("--run-name")
    sub.choices["schedule"].add_argument("--cron", required=True, help="6 fields, seconds first")
    sub.choices["schedule"].add_argument("--job-name", default="delrec-retrain")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except DelrecError as exc:
        print(f"pipeline.py {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
