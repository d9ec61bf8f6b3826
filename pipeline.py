"""The DELRec Kubeflow pipeline: the graph and its options; the commands are delrec.pipeline_cli.

    prepare -> preprocess -> train_teacher -> distill -> finetune (with the soft prompt) --+
                                          \\-> finetune (ablation: no soft prompt) -----+--> evaluate -> [publish]

Commands:
    python pipeline.py compile [--out FILE] [--preset NAME]
    python pipeline.py run [--preset NAME] [--data PATH] [--no-cache] [param=value ...]  (kfp.local, here)
    python pipeline.py submit --host URL [--experiment NAME] [--pipeline-root s3://...] [param=value ...]
    python pipeline.py schedule [create] --host URL --cron "0 0 3 * * *" [--job-name NAME] [param=value ...]
    python pipeline.py schedule list --host URL [--experiment NAME]
    python pipeline.py schedule delete NAME --host URL [--experiment NAME]

``schedule`` uploads the pipeline version of this code (named ``<image tag>-<spec hash>``, uploaded once)
and replaces the recurring run of that name, so scheduling again leaves one recurring run, on the newest
version.

What a team changes from run to run is a flat, typed run parameter (``delrec.config.RUN_PARAMETERS``:
source, teacher_model, backbone, distill_steps, distill_batch_size, finetune_steps, finetune_batch_size,
evaluate_batch_size; and publish_to); the rest of each stage's config travels as a dict parameter (the
preset's section plus overrides). Both default to the preset's values (compiled in), so a run needs
no argument; a run parameter wins over its stage dict. The first task, ``prepare``, applies them and
fingerprints the source (never cached, so each scheduled run sees new data); KFP's cache key changes
whenever a config or an input changes. ``param=value`` overrides take ``section.field=value``
(``teacher.max_epochs=5``, ``distill.steps=5``), a run parameter (``distill_steps=5``,
``publish_to=s3://models``), ``teacher=gru4rec``, or a field name shared by stage configs (``seed=7``,
``backbone=...`` set it in every stage that has it).
Values are parsed as YAML. The preset's ``pipeline:`` section holds the Kubernetes settings
(images, GPU scheduling, resources, retries, timeouts, secrets, publishing, scale-out); ``gpus=N`` (or
``pipeline.gpus=N``) is baked into the compiled spec, as the KFP driver drops an int placeholder, and so
are the scale-out options (``trainer=trainjob nodes=2 gpus_per_node=8 queue=... runtime=...``: more than
one GPU runs distill and finetune as torchrun ranks, ``trainjob`` as a Kubeflow Trainer v2 TrainJob;
docs/cluster.md, section 6).

``run`` reuses, as a cluster does, the outputs of every task whose key is unchanged: component and its
code, image, stage config, the input artifacts, the source's fingerprint and a backbone folder's file
listing (``prepare`` takes both in each run), and locally the delrec library's sources (a cluster's image
tag). Locally an input artifact counts by its ``content_fingerprint``; a cluster's key holds the artifact's
identity instead (KFP's cacheutils), so there a task that ran again re-runs everything after it even when
its output is the same. Changing one stage's config re-runs that stage and
everything downstream. The cache lies in ROOT/.kfp_cache (``make clean-cache`` removes it); ``--no-cache``
runs every task. Publish and prepare are never served from a cache.
"""

# No `from __future__ import annotations`: KFP reads the pipeline function's annotations as types.

import ast
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Markdown
from pydantic import Field, field_validator, model_validator

from components import distill, evaluate, finetune, prepare, preprocess, publish, recommend, train_teacher
from delrec import checkpoints, images, launch, pipeline_args, trainjob
from delrec.config import STAGES, StageConfig
from delrec.store import ENV_CREDENTIALS_USERS, is_s3_uri

REPO = Path(__file__).resolve().parent
PIPELINE_NAME = "delrec"
COMPILED = REPO / "pipeline.yaml"
DEFAULT_PRESET = "ml-100k"
# Run parameters whose defaults come from the preset's pipeline: section.
OPTION_RUN_PARAMS = (
    "cpu_image", "gpu_image", "s3_secret", "publish_to", "gate",
)  # fmt: skip
# Options that are baked into the compiled spec (no run parameter), settable as ``name=value`` too: KFP's
# driver fills pod-spec placeholders with a parameter's *string* value, so an int GPU count would be lost.
COMPILE_TIME_OPTIONS = ("gpus", "trainer", "nodes", "gpus_per_node", "runtime", "queue")
# What delrec.store reads besides the credentials: the keys of the s3_config_map ConfigMap, set as these
# environment variables of every task.
S3_SETTINGS_ENV = ("DELREC_S3_ENDPOINT", "DELREC_S3_SECURE", "DELREC_S3_REGION")
# NCCL's own default logs nothing: WARN puts the cause of a failed collective (a peer that died, a
# transport that could not start) into the task's log without INFO's per-rank flood.
NCCL_ENV = {"NCCL_DEBUG": "WARN"}
# The launcher pod outlives its TrainJob's deadline by this much, so it can delete the job it gave up on.
LAUNCHER_GRACE_S = 600
# The retries' window of a task without a timeout (a launcher waiting for Kueue's admission): 30 days.
RETRY_WINDOW_UNBOUNDED_S = 30 * 86400

log = logging.getLogger("pipeline")


class Resources(StageConfig):
    """Kubernetes requests (and optional limits) of one task."""

    cpu: str = "1"
    memory: str = "4Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None


def _default_resources() -> dict[str, Resources]:
    return {
        "prepare": Resources(cpu="250m", memory="1Gi"),
        "preprocess": Resources(cpu="1", memory="4Gi"),
        "teacher": Resources(cpu="4", memory="8Gi"),
        "distill": Resources(cpu="4", memory="32Gi"),
        "finetune": Resources(cpu="4", memory="32Gi"),
        "evaluate": Resources(cpu="4", memory="16Gi"),
        "publish": Resources(cpu="500m", memory="1Gi"),
        "recommend": Resources(cpu="4", memory="16Gi"),
        "launcher": Resources(cpu="250m", memory="1Gi"),
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
    retry_backoff: str = Field("60s", pattern=r"^[0-9]+[smh]$")
    """wait before the first retry (``60s``, ``5m``, ``1h``)"""
    retry_backoff_factor: int = Field(2, ge=1)
    """each later wait is this many times the one before; an integer because Argo reads it as one (a
    fraction fails the run at its first retry)"""
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
    checkpoint_root: str = "s3://delrec-artifacts/checkpoints"
    """s3://bucket[/prefix] of the training tasks' checkpoints, one prefix per run and task
    (``<run id>/<task>``), so a retried pod resumes where the last one stopped instead of at step 0
    (``delrec.checkpoints``); a task removes its prefix once its output is written, a failed run's stay
    (expire them with a lifecycle rule on the prefix); empty: on the pod's own disk, lost with it"""

    @field_validator("checkpoint_root")
    @classmethod
    def _s3_or_empty(cls, root: str) -> str:
        if root and not is_s3_uri(root):
            raise ValueError(f"expected s3://bucket[/prefix] or empty, got {root!r}")
        return root

    local_root: str = "local_outputs/pipeline_root"
    """pipeline root of ``run`` (kfp.local)"""

    # Scale-out of distill and finetune (delrec.launch). Evaluate and recommend stay one pod.
    trainer: Literal["pod", "trainjob"] = "pod"
    """pod: each training stage runs in its task's pod, on ``gpus`` GPUs (torchrun ranks when more than
    one); trainjob: the task is a CPU launcher that submits a Kubeflow Trainer v2 TrainJob of ``nodes`` x
    ``gpus_per_node`` ranks and waits for it (delrec.trainjob; docs/cluster.md, section 6)"""
    nodes: int = Field(1, ge=1)
    """TrainJob nodes (trainer: trainjob)"""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs and torchrun ranks per TrainJob node (trainer: trainjob); default: ``gpus``; 0: one CPU rank
    per node (gloo), the kind smoke run"""
    runtime: str = "torch-distributed"
    """the ClusterTrainingRuntime of the TrainJobs"""
    queue: str = ""
    """Kueue LocalQueue of the TrainJobs (label kueue.x-k8s.io/queue-name); empty: none"""
    trainjob_outputs: str = "s3://delrec-artifacts/trainjob"
    """s3://bucket[/prefix] where a TrainJob's rank 0 uploads the stage output (``<run id>/<task>``), for
    its launcher to download into its KFP output artifact and remove"""

    @field_validator("trainjob_outputs")
    @classmethod
    def _s3_prefix(cls, root: str) -> str:
        if not is_s3_uri(root):
            raise ValueError(f"expected s3://bucket[/prefix], got {root!r}")
        return root

    @field_validator("runtime", "queue")
    @classmethod
    def _kubernetes_name(cls, name: str) -> str:
        return trainjob.kubernetes_name(name)

    @model_validator(mode="after")
    def _trainjob_only(self) -> "PipelineOptions":
        # The options that shape a TrainJob mean nothing to a pod: refuse them rather than ignore them.
        if self.trainer == "pod":
            if self.nodes > 1:
                raise ValueError(f"nodes: {self.nodes} nodes need trainer: trainjob (a pod is one node)")
            if self.queue:
                raise ValueError("queue: Kueue admits TrainJobs; set trainer: trainjob or drop the queue")
            if self.gpus_per_node is not None and self.gpus_per_node != self.gpus:
                raise ValueError("gpus_per_node: with trainer: pod a task gets `gpus` GPUs; set gpus instead")
        return self

    @property
    def node_gpus(self) -> int:
        """GPUs (and ranks) per node of a training stage."""
        return self.gpus if self.gpus_per_node is None else self.gpus_per_node


class Outputs(NamedTuple):
    metrics: dict
    evaluation: Artifact
    report: Markdown
    report_html: HTML


def _resources(task: dsl.PipelineTask, res: Resources) -> None:
    task.set_cpu_request(res.cpu).set_memory_request(res.memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)


class _Tasks:
    """The Kubernetes settings of the graph's tasks (images, resources, GPUs, secrets, volumes, checkpoints),
    from the preset's pipeline options."""

    def __init__(self, options: PipelineOptions):
        self.o = options
        self.secret_users: list[str] = []
        """tasks that get the object-store secret without ``optional`` (prepare checks it is there)"""

    def cpu(self, task: dsl.PipelineTask, stage: str, image) -> dsl.PipelineTask:
        task.set_container_image(image).set_caching_options(self.o.caching)
        _resources(task, self.o.resources.get(stage) or _default_resources()[stage])
        self.deadline(task, self.o.cpu_timeout_s)
        if self.o.s3_config_map:
            # Optional: a run that never touches s3:// needs no ConfigMap; one that does fails naming it.
            kubernetes.use_config_map_as_env(
                task, self.o.s3_config_map, {key: key for key in S3_SETTINGS_ENV}, optional=True
            )
        return task.set_display_name(stage)

    def gpu(self, task: dsl.PipelineTask, stage: str, image) -> dsl.PipelineTask:
        self.cpu(task, stage, image)
        if self.o.gpus:
            # A literal, not a parameter: the driver would resolve an int parameter to "" (no GPU).
            task.set_accelerator_type(self.o.accelerator).set_accelerator_limit(self.o.gpus)
            kubernetes.add_toleration(task, key=self.o.gpu_toleration, operator="Exists", effect="NoSchedule")
            for key, value in self.o.gpu_node_selector.items():
                kubernetes.add_node_selector(task, key, value)
        kubernetes.empty_dir_mount(task, "dshm", "/dev/shm", medium="Memory", size_limit=self.o.shm_size)
        self.deadline(task, self.o.gpu_timeout_s)
        return task

    def deadline(self, task: dsl.PipelineTask, timeout_s: int) -> None:
        """A pod's timeout (0: none) and the retries' window. Argo counts the window (KFP's
        backoff_max_duration) from the first attempt's start: past it a failed task is not retried, and
        a retried pod is killed at it. So it spans every attempt's whole timeout and the waits between."""
        kubernetes.set_timeout(task, timeout_s)
        unit = {"s": 1, "m": 60, "h": 3600}[self.o.retry_backoff[-1]]
        first_wait = int(self.o.retry_backoff[:-1]) * unit
        waits = sum(first_wait * self.o.retry_backoff_factor**i for i in range(self.o.retries))
        window = timeout_s * (self.o.retries + 1) + waits if timeout_s else RETRY_WINDOW_UNBOUNDED_S
        task.set_retry(self.o.retries, self.o.retry_backoff, self.o.retry_backoff_factor, f"{window}s")

    def hf_token(self, task: dsl.PipelineTask) -> None:
        kubernetes.use_secret_as_env(task, self.o.hf_secret, {"token": "HF_TOKEN"}, optional=True)
        self.model_cache(task)

    def model_cache(self, task: dsl.PipelineTask) -> None:
        if self.o.model_cache_pvc:
            kubernetes.mount_pvc(task, pvc_name=self.o.model_cache_pvc, mount_path="/cache")

    def identify(self, task: dsl.PipelineTask, name: str, s3_secret) -> None:
        """The run id and task name in the environment (checkpoints' prefix, a TrainJob's name), and the
        object-store credentials."""
        task.set_env_variable(checkpoints.ENV_TASK, name)
        kubernetes.use_field_path_as_env(task, checkpoints.ENV_RUN_ID, "metadata.labels['pipeline/runid']")
        kubernetes.use_secret_as_env(task, s3_secret, self.o.s3_secret_keys)
        # A local run checkpoints to disk (kfp.local ignores the secret): only s3:// needs credentials.
        if is_s3_uri(self.o.checkpoint_root) or self.o.trainer == "trainjob":
            self.secret_users.append(name)

    def workspace(self, task: dsl.PipelineTask, name: str, s3_secret) -> None:
        """Checkpoints under ``<checkpoint_root>/<run id>/<name>``, where a retried pod finds them.

        An object-store prefix, not a volume: KFP puts the names of the claims a task mounts into its
        cache key, so a claim per run (CreatePVC, or KFP's own workspace) would make every training
        task a cache miss; and the ablation runs beside distill and finetune, on other nodes. The run
        id comes from the pod's label, not an input (PIPELINE_JOB_ID_PLACEHOLDER): inputs are in the
        cache key too. kfp.local sets no labels: ``pipeline.py run`` sets a local root and the run id
        ``local-<code fingerprint>`` instead, so a killed local run's training task resumes in the next
        run of the same code.
        """
        if not self.o.checkpoint_root:
            return
        task.set_env_variable(checkpoints.ENV_ROOT, self.o.checkpoint_root)
        self.identify(task, name, s3_secret)

    def training(self, task: dsl.PipelineTask, stage: str, name: str, image, s3_secret) -> dsl.PipelineTask:
        """distill or a finetune: in its own pod (torchrun ranks on ``gpus`` > 1), or a launcher of a
        TrainJob (trainer: trainjob)."""
        if self.o.trainer == "trainjob":
            self._trainjob_launcher(task, stage, image)
            # Forwarded to the TrainJob as a secret reference (delrec.trainjob.launcher_env).
            kubernetes.use_secret_as_env(task, self.o.hf_secret, {"token": "HF_TOKEN"}, optional=True)
            if not self.o.checkpoint_root:
                self.identify(task, name, s3_secret)
        else:
            self.gpu(task, stage, image)
            self.hf_token(task)
            if self.o.gpus > 1:
                task.set_env_variable(launch.ENV_NPROC_PER_NODE, str(self.o.gpus))
                for key, value in NCCL_ENV.items():
                    task.set_env_variable(key, value)
        self.workspace(task, name, s3_secret)
        return task.set_display_name(name)

    def _trainjob_launcher(self, task: dsl.PipelineTask, stage: str, image) -> None:
        """A CPU pod that submits the stage's TrainJob and waits for it. It runs the GPU image: the
        TrainJob runs the launcher's own image (delrec.trainjob), so the gpu_image parameter decides."""
        self.cpu(task, "launcher", image)
        res = self.o.resources.get(stage) or _default_resources()[stage]
        settings = trainjob.TrainJobSettings(
            runtime=self.o.runtime,
            nodes=self.o.nodes,
            gpus_per_node=self.o.node_gpus,
            accelerator=self.o.accelerator,
            cpu=res.cpu,
            memory=res.memory,
            queue=self.o.queue,
            gpu_toleration=self.o.gpu_toleration,
            node_selector=self.o.gpu_node_selector,
            shm_size=self.o.shm_size,
            # Several nodes (and the tasks beside it) cannot share a ReadWriteOnce claim.
            model_cache_pvc=self.o.model_cache_pvc if self.o.model_cache_access == "ReadWriteMany" else "",
            outputs=self.o.trainjob_outputs,
            timeout_s=self.o.gpu_timeout_s,
        )
        task.set_env_variable(launch.ENV_TRAINER, "trainjob")
        task.set_env_variable(launch.ENV_TRAINJOB, settings.model_dump_json())
        if self.o.node_gpus:
            for key, value in NCCL_ENV.items():
                task.set_env_variable(key, value)
        # It outlives the TrainJob's own deadline, to delete a job it gave up on; with a Kueue queue the
        # job waits for admission as long as the queue takes, a bound the pod cannot know (0: none).
        self.deadline(task, 0 if self.o.queue else self.o.gpu_timeout_s + LAUNCHER_GRACE_S)


def build_pipeline(options: PipelineOptions | None = None, defaults: dict[str, Any] | None = None):
    """The pipeline function, with the Kubernetes settings of ``options`` baked in.

    ``defaults`` (``pipeline_arguments``' run arguments; by default those of the default preset) give
    the run parameters and stage configs their defaults, so a run needs no argument at all.
    """
    o = options or PipelineOptions()
    d = defaults if defaults is not None else pipeline_arguments(DEFAULT_PRESET)[1]
    tasks = _Tasks(o)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="DELRec: distil a sequential recommender's pattern into an LLM's soft prompt, "
        "fine-tune the LLM with AdaLoRA, evaluate against the teacher and the no-soft-prompt ablation.",
    )
    def delrec_pipeline(
        # What a team changes (delrec.config.RUN_PARAMETERS): these win over the stage dicts below.
        source: str = d["source"],
        teacher_model: str = d["teacher_model"],
        backbone: str = d["backbone"],
        distill_steps: int = d["distill_steps"],
        distill_batch_size: int = d["distill_batch_size"],
        finetune_steps: int = d["finetune_steps"],
        finetune_batch_size: int = d["finetune_batch_size"],
        evaluate_batch_size: int = d["evaluate_batch_size"],
        publish_to: str = o.publish_to,
        recommend_top_n: int = 10,
        # The rest of each stage's config (the preset's).
        preprocess_config: dict = d["preprocess_config"],
        teacher_config: dict = d["teacher_config"],
        distill_config: dict = d["distill_config"],
        finetune_config: dict = d["finetune_config"],
        evaluate_config: dict = d["evaluate_config"],
        cpu_image: str = o.cpu_image,
        gpu_image: str = o.gpu_image,
        s3_secret: str = o.s3_secret,
        gate: dict = o.gate,
    ) -> Outputs:
        # Runs every time: it lists the source now (a schedule's arguments were fixed when it was
        # created), so unchanged data is a cache hit from preprocess on and new data retrains.
        setup = prepare(
            preprocess_config=preprocess_config,
            teacher_config=teacher_config,
            distill_config=distill_config,
            finetune_config=finetune_config,
            evaluate_config=evaluate_config,
            source=source,
            teacher_model=teacher_model,
            backbone=backbone,
            distill_steps=distill_steps,
            distill_batch_size=distill_batch_size,
            finetune_steps=finetune_steps,
            finetune_batch_size=finetune_batch_size,
            evaluate_batch_size=evaluate_batch_size,
            publish_to=publish_to,
        )
        tasks.cpu(setup, "prepare", cpu_image).set_caching_options(False)
        kubernetes.use_secret_as_env(setup, s3_secret, o.s3_secret_keys, optional=True)
        # The cache volume: a path source or backbone folder on it is listed where the stages read it; the
        # token: check_backbone asks the hub about a private model id as the LLM stages will load it.
        tasks.hf_token(setup)
        config = {stage: setup.outputs[f"{stage}_config"] for stage in STAGES}

        prep = preprocess(
            config=config["preprocess"],
            source_fingerprint=setup.outputs["source_fingerprint"],
        )
        tasks.cpu(prep, "preprocess", cpu_image)
        # Optional: only an s3:// source needs the credentials.
        kubernetes.use_secret_as_env(prep, s3_secret, o.s3_secret_keys, optional=True)
        tasks.model_cache(prep)
        data = prep.outputs["dataset"]

        teacher = train_teacher(config=config["teacher"], dataset=data)
        tasks.cpu(teacher, "teacher", cpu_image)
        tasks.workspace(teacher, "teacher", s3_secret)

        # Cache key only: new weights under an unchanged backbone path re-run the LLM stages.
        backbone_key = setup.outputs["backbone_key"]
        soft = distill(
            config=config["distill"],
            dataset=data,
            teacher=teacher.outputs["teacher"],
            backbone_key=backbone_key,
        )
        tasks.training(soft, "distill", "distill", gpu_image, s3_secret)

        # The teacher is read only with teacher_kd > 0 (distillation of its candidate scores).
        tuned = finetune(
            config=config["finetune"],
            dataset=data,
            soft_prompt=soft.outputs["soft_prompt"],
            teacher=teacher.outputs["teacher"],
            backbone_key=backbone_key,
        )
        tasks.training(tuned, "finetune", "finetune", gpu_image, s3_secret)
        # The ablation: the same LLM, config and teacher without the soft prompt.
        ablation = finetune(
            config=config["finetune"],
            dataset=data,
            teacher=teacher.outputs["teacher"],
            backbone_key=backbone_key,
        )
        tasks.training(ablation, "finetune", "finetune-ablation", gpu_image, s3_secret)

        if o.model_cache_pvc and o.model_cache_access == "ReadWriteOnce":
            # The ablation would run beside distill and finetune: with a ReadWriteOnce cache, on another
            # node it never starts. One mounting pod at a time instead.
            ablation.after(tuned)

        ev = evaluate(
            config=config["evaluate"],
            dataset=data,
            teacher=teacher.outputs["teacher"],
            delrec=tuned.outputs["model"],
            ablation=ablation.outputs["model"],
            distill=soft.outputs["soft_prompt"],
        )
        tasks.gpu(ev, "evaluate", gpu_image)
        tasks.hf_token(ev)

        with dsl.If(publish_to != "", name="publish-configured"):
            pub = publish(
                metrics=ev.outputs["Output"],
                preprocess_config=config["preprocess"],
                teacher_config=config["teacher"],
                distill_config=config["distill"],
                finetune_config=config["finetune"],
                evaluate_config=config["evaluate"],
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
            tasks.cpu(pub, "publish", cpu_image).set_caching_options(False)
            kubernetes.use_secret_as_env(pub, s3_secret, o.s3_secret_keys)

            # What a team deploys it for: the next items for every user, only from a model that passed.
            with dsl.If(pub.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
                recs = recommend(
                    evaluate_config=config["evaluate"],
                    dataset=data,
                    teacher=teacher.outputs["teacher"],
                    delrec=tuned.outputs["model"],
                    top_n=recommend_top_n,
                    destination=publish_to,
                    pipeline_name=PIPELINE_NAME,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                )
                tasks.gpu(recs, "recommend", gpu_image).set_caching_options(False)
                tasks.hf_token(recs)
                kubernetes.use_secret_as_env(recs, s3_secret, o.s3_secret_keys)

        # Known once every task is built: prepare fails the run at once if their secret is missing.
        if tasks.secret_users:
            setup.set_env_variable(ENV_CREDENTIALS_USERS, ",".join(tasks.secret_users))
        return Outputs(
            metrics=ev.outputs["Output"],
            evaluation=ev.outputs["evaluation"],
            report=ev.outputs["report"],
            report_html=ev.outputs["report_html"],
        )

    return delrec_pipeline


# --------------------------------------------------------------------------- arguments


def pipeline_arguments(
    preset: str, data: str | None = None, overrides: Sequence[str] = ()
) -> tuple[PipelineOptions, dict[str, Any]]:
    """Options and run arguments of this graph from a preset, ``--data`` and ``param=value`` overrides
    (the grammar: ``delrec.pipeline_args``), validated."""
    return pipeline_args.pipeline_arguments(
        preset,
        data,
        overrides,
        options_class=PipelineOptions,
        option_run_params=OPTION_RUN_PARAMS,
        compile_time_options=COMPILE_TIME_OPTIONS,
    )


# --------------------------------------------------------------------------- commands


def _sorted_header_defaults(text: str) -> str:
    """KFP's header comment lists a dict parameter's default in protobuf map order, which changes from
    one process to the next: sort it, so the same pipeline compiles to the same file."""

    def ordered(value: Any) -> Any:
        return {k: ordered(value[k]) for k in sorted(value)} if isinstance(value, dict) else value

    def fix(match: re.Match) -> str:
        return f"{match[1]}{ordered(ast.literal_eval(match[2]))}]"

    return re.sub(r"^(#    \w+: dict \[Default: )(\{.*\})\]$", fix, text, flags=re.M)


def compile_pipeline(
    out: str | Path = COMPILED, options: PipelineOptions | None = None, defaults: dict[str, Any] | None = None
) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options, defaults), str(out))
    out.write_text(_sorted_header_defaults(out.read_text()))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (delrec.pipeline_cli), over this graph."""
    from delrec import pipeline_cli

    graph = pipeline_cli.Graph(
        name=PIPELINE_NAME,
        build=build_pipeline,
        compile=compile_pipeline,
        arguments=pipeline_arguments,
        compiled=COMPILED,
        root=REPO,
        default_preset=DEFAULT_PRESET,
        description=__doc__,
    )
    return pipeline_cli.main(graph, argv)


if __name__ == "__main__":
    sys.exit(main())
