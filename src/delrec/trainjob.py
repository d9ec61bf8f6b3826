"""A training stage as a Kubeflow Trainer v2 ``TrainJob``: build it, submit it, follow it, clean it up.

With the pipeline option ``trainer: trainjob`` the distill and finetune tasks are small CPU launcher
pods. Each submits one TrainJob (``trainer.kubeflow.org/v1alpha1``, Trainer v2.3) on the
``torch-distributed`` ClusterTrainingRuntime: M nodes x N ranks, each node running
``python -m delrec.remote_stage`` (stage the inputs from S3, torchrun the stage, rank 0 uploads the
output). The launcher streams the rank-0 pod's log, waits for the ``Complete`` or ``Failed`` condition,
deletes the TrainJob whatever happened, and downloads the output into its own KFP output artifact, so
lineage and the downstream tasks are those of a one-pod run.

Inputs and outputs travel through the object store: the TrainJob's pods read the input artifacts at
their KFP URIs (``s3://<pipeline root>/...``), and rank 0 uploads the output to
``<outputs>/<run id>/<task>``, a prefix that depends on the run and task only, so a retried launcher
that adopts the TrainJob of the attempt before it finds that job's output. The launcher removes the
prefix once it holds the files.

The TrainJob runs the launcher's own image (read from its pod): the library that built the command
line is the one that runs it, and the ``gpu_image`` run parameter decides both. Its environment is
the launcher's object-store and model settings, copied as they are in the launcher pod's spec: the
ConfigMap and Secret references stay references, no credential passes through this code.

Client: the ``kubernetes`` package (``CustomObjectsApi`` for the TrainJob, ``CoreV1Api`` for the
pods and their logs), not the Kubeflow SDK (``kubeflow.trainer``). kfp already depends on
``kubernetes``, so it adds nothing to the images; the SDK would add its own dependency tree and an
API (``TrainerClient``, runtimes and ``CustomTrainer`` objects built around a Python function) that
has changed between minor releases, and it builds the TrainJob itself, where this module wants the
manifest as a plain dict it can validate against the CRD's schema in tests. The REST surface used
here (create/get/delete of one custom object, list pods by label, read a log) is stable, and the
real client is exercised against an in-process fake API server in the tests.

Pod selection: every pod of a TrainJob carries the labels of its JobSet (named after the TrainJob):
``jobset.sigs.k8s.io/jobset-name=<name>`` and ``jobset.sigs.k8s.io/replicatedjob-name=node`` (the
trainer's replicated job in Trainer's runtimes), and the Job controller's
``batch.kubernetes.io/job-completion-index``; index 0 is the node of rank 0. These are the selectors
the Kubeflow SDK uses (``kubeflow/trainer/constants``), and Trainer's torch plugin derives
``PET_NODE_RANK`` from the same completion index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from pydantic import Field, field_validator

from delrec.checkpoints import ENV_RUN_ID, ENV_TASK
from delrec.config import StageConfig
from delrec.errors import DelrecError
from delrec.launch import ENV_NPROC_PER_NODE, ENV_TRAINER, ENV_TRAINJOB, Artifact, Stage, read_metrics
from delrec.store import S3Store, is_s3_uri, join_uri

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
# The trainer's replicated job and container in Trainer's runtimes (Go: constants.Node).
TRAINER_NODE = "node"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
RUN_ID_LABEL = "pipeline/runid"
"""KFP's label of a run's pods; on the TrainJob too, so ``kubectl get trainjobs -l`` finds a run's jobs"""
TASK_LABEL = "delrec/task"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PATCH_MANAGER = "delrec"
# The launcher's environment that the TrainJob's pods need: where the object store is and its
# credentials, the gated-model token, checkpointing, NCCL's settings. The launcher's own switches stay.
FORWARDED_ENV = re.compile(r"^(DELREC_|AWS_|NCCL_|HF_TOKEN$)")
LAUNCHER_ONLY_ENV = {ENV_TRAINER, ENV_NPROC_PER_NODE, ENV_TRAINJOB}
# A Kubernetes object name (the runtime) or label value (the queue): a DNS-1123 label.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubernetes_name(name: str) -> str:
    """``name`` if empty or a DNS-1123 label (a runtime's name, a queue label's value); else ValueError."""
    if name and not DNS_LABEL.match(name):
        raise ValueError(f"expected a Kubernetes name (lower-case letters, digits, '-'), got {name!r}")
    return name


# What a refused create most likely means, and the fix.
CREATE_HINTS = {
    403: " (the pipeline's ServiceAccount lacks the launcher's RBAC: kubectl apply -k manifests/trainjob)",
    404: " (no TrainJob resource: is Kubeflow Trainer v2 installed? docs/cluster.md, section 6)",
}


class TrainJobSettings(StageConfig):
    """How a stage's TrainJob is shaped and scheduled (the pipeline's ``trainer: trainjob`` options)."""

    runtime: str = "torch-distributed"
    """the ClusterTrainingRuntime"""
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=0)
    """GPUs (and torchrun ranks) per node; 0: one CPU rank per node (gloo)"""
    accelerator: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "32Gi"
    queue: str = ""
    """Kueue LocalQueue; empty: no queue label"""
    gpu_toleration: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = Field(default_factory=dict)
    shm_size: str = "16Gi"
    model_cache_pvc: str = ""
    outputs: str = "s3://delrec-artifacts/trainjob"
    """s3:// prefix where rank 0 uploads the output (``<outputs>/<run id>/<task>``)"""
    timeout_s: int = Field(6 * 3600, ge=1)
    poll_s: float = Field(10.0, gt=0)

    @field_validator("runtime", "queue")
    @classmethod
    def _dns_label(cls, name: str) -> str:
        return kubernetes_name(name)

    @field_validator("outputs")
    @classmethod
    def _s3(cls, outputs: str) -> str:
        if not is_s3_uri(outputs):
            raise ValueError(f"expected s3://bucket[/prefix], got {outputs!r}")
        return outputs

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)


def trainjob_name(run_id: str, task: str) -> str:
    """``delrec-<task>-<10 hex of the run id>``: the same for every attempt of one task of one run (a
    retry adopts the job), and short: the JobSet's pod host names add ``-node-0-0`` and must stay a
    63-character DNS label."""
    if not run_id or not task:
        raise DelrecError("a TrainJob needs the KFP run id and the task name", field="run_id")
    slug = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:30]
    return f"delrec-{slug}-{hashlib.sha256(run_id.encode()).hexdigest()[:10]}"


def remote_stage_arguments(
    stage: Stage, config: Mapping, inputs: Mapping[str, str], out_uri: str
) -> list[str]:
    """The arguments of ``python -m delrec.remote_stage`` on every node: input and output URIs, config."""
    args = [stage]
    for name, uri in inputs.items():
        args += [f"--{name}", uri]
    return [*args, "--out", out_uri, "--config-json", json.dumps(dict(config), sort_keys=True)]


def build_trainjob(
    *,
    name: str,
    namespace: str,
    image: str,
    arguments: Sequence[str],
    settings: TrainJobSettings,
    env: Sequence[Mapping[str, Any]] = (),
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest: ``settings.nodes`` nodes of ``settings.procs_per_node`` ranks, each node
    running ``python -m delrec.remote_stage <arguments>`` in ``image`` with ``env``.

    GPU scheduling (toleration, node selector), the memory-backed /dev/shm and the model cache are
    runtime patches on the trainer's pods: the runtime owns the pod template, the TrainJob patches it.
    """
    resources: dict[str, Any] = {"requests": {"cpu": settings.cpu, "memory": settings.memory}}
    pod: dict[str, Any] = {
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}],
        "containers": [{"name": TRAINER_NODE, "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    if settings.model_cache_pvc:
        pod["volumes"].append(
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": settings.model_cache_pvc}}
        )
        pod["containers"][0]["volumeMounts"].append({"name": "model-cache", "mountPath": "/cache"})
    if settings.gpus_per_node:
        gpus = str(settings.gpus_per_node)
        resources["requests"][settings.accelerator] = gpus
        resources["limits"] = {settings.accelerator: gpus}
        pod["tolerations"] = [{"key": settings.gpu_toleration, "operator": "Exists", "effect": "NoSchedule"}]
        if settings.node_selector:
            pod["nodeSelector"] = dict(settings.node_selector)
    all_labels = dict(labels or {})
    if settings.queue:
        all_labels[QUEUE_LABEL] = settings.queue
    replicated_job = {"name": TRAINER_NODE, "template": {"spec": {"template": {"spec": pod}}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "spec": {
            "runtimeRef": {"name": settings.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": image,
                "command": ["python", "-m", "delrec.remote_stage"],
                "args": list(arguments),
                "numNodes": settings.nodes,
                "numProcPerNode": settings.procs_per_node,
                "resourcesPerNode": resources,
                "env": [dict(e) for e in env],
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [replicated_job]}}},
                }
            ],
            # A backstop if the launcher dies: the job stops at the deadline even with nobody watching.
            "activeDeadlineSeconds": settings.timeout_s,
        },
    }


def finished(job: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """``(type, reason, message)`` of the job's true ``Complete`` or ``Failed`` condition, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"], condition.get("reason", ""), condition.get("message", "")
    return None


class TrainJobs:
    """Create, follow and delete TrainJobs in one namespace through a ``kubernetes`` ApiClient."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        out: IO[str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        from kubernetes import client

        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.out = out or sys.stdout
        self.sleep = sleep
        self.clock = clock

    def submit(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Create the TrainJob; one of that name already there (an earlier attempt of this task) is
        adopted if it carries the same run and task labels, refused otherwise."""
        from kubernetes.client.exceptions import ApiException

        name = manifest["metadata"]["name"]
        try:
            created = self.custom.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, dict(manifest)
            )
            log.info("created TrainJob %s/%s", self.namespace, name)
            return created
        except ApiException as exc:
            if exc.status != 409:
                hint = CREATE_HINTS.get(exc.status, "")
                raise DelrecError(
                    f"could not create the TrainJob: {_api_reason(exc)}{hint}", path=name
                ) from None
        existing = self.get(name)
        wanted = {k: manifest["metadata"]["labels"].get(k) for k in (RUN_ID_LABEL, TASK_LABEL)}
        found = {k: (existing["metadata"].get("labels") or {}).get(k) for k in wanted}
        if found != wanted:
            raise DelrecError(
                f"a TrainJob of this name belongs to another run or task ({found}, expected {wanted})",
                path=f"{self.namespace}/{name}",
            )
        log.info("adopted the TrainJob %s/%s of an earlier attempt", self.namespace, name)
        return existing

    def get(self, name: str) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            what = "is gone (deleted by someone else?)" if exc.status == 404 else _api_reason(exc)
            raise DelrecError(f"TrainJob {what}", path=f"{self.namespace}/{name}") from None

    def wait(self, name: str, *, timeout_s: float, poll_s: float) -> None:
        """Poll the TrainJob's conditions until ``Complete``; ``Failed`` or the timeout is a DelrecError
        with the job's reason and message. The timeout counts from admission: a job Kueue holds suspended
        in its queue may wait there as long as the queue takes (the TrainJob's own deadline, too, starts
        when it is resumed)."""
        admitted: float | None = None  # when the job last left the queue; None while it is suspended
        queued_logged = False
        while True:
            job = self.get(name)
            state = finished(job)
            if state and state[0] == "Complete":
                log.info("TrainJob %s/%s completed", self.namespace, name)
                return
            if state:
                _, reason, message = state
                raise DelrecError(f"TrainJob failed: {reason}: {message}", path=f"{self.namespace}/{name}")
            if (job.get("spec") or {}).get("suspend"):
                if not queued_logged:
                    log.info("TrainJob %s/%s is queued (suspended until admitted)", self.namespace, name)
                admitted, queued_logged = None, True
            elif admitted is None:
                admitted, queued_logged = self.clock(), False
            if admitted is not None and self.clock() - admitted >= timeout_s:
                raise DelrecError(
                    f"TrainJob did not finish within {timeout_s:.0f} s (pipeline option gpu_timeout_s)",
                    path=f"{self.namespace}/{name}",
                )
            self.sleep(poll_s)

    def rank0_pod(self, name: str) -> Any | None:
        """The newest pod of node 0 (a restarted node gets a new pod), or None before it exists."""
        selector = f"{JOBSET_NAME_LABEL}={name},{REPLICATED_JOB_LABEL}={TRAINER_NODE},{JOB_INDEX_LABEL}=0"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return max(pods, key=lambda p: str(p.metadata.creation_timestamp or ""), default=None)

    def follow_logs(self, name: str, stop: threading.Event, poll_s: float) -> None:
        """Copy the log of each rank-0 pod, once it has started, to :attr:`out`, until ``stop`` is set;
        then one last look, so a job that ended between two polls still shows its log. A failure here
        costs only log lines: it is logged and retried, never raised."""
        followed: set[str] = set()
        while True:
            last = stop.is_set()
            try:
                self._follow_new_rank0_pod(name, followed)
            except Exception as exc:  # a dropped stream or an API hiccup: try again next round
                log.warning("reading the rank-0 log of TrainJob %s: %s", name, exc)
            if last:
                return
            stop.wait(poll_s)

    def _follow_new_rank0_pod(self, name: str, followed: set[str]) -> None:
        pod = self.rank0_pod(name)
        if pod is None or pod.metadata.uid in followed or pod.status.phase == "Pending":
            return
        followed.add(pod.metadata.uid)
        self.out.write(f"--- log of {pod.metadata.name} (rank 0) ---\n")
        response = self.core.read_namespaced_pod_log(
            pod.metadata.name, self.namespace, container=TRAINER_NODE, follow=True, _preload_content=False
        )
        try:
            for line in response:  # ends when the container does
                self.out.write(line.decode(errors="replace"))
                self.out.flush()
        finally:
            response.release_conn()

    def delete(self, name: str) -> None:
        """Delete the TrainJob and (in the background) its JobSet and pods; already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy="Background"
            )
            log.info("deleted TrainJob %s/%s", self.namespace, name)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete TrainJob %s/%s: %s", self.namespace, name, _api_reason(exc))

    def run(self, manifest: Mapping[str, Any], *, timeout_s: float, poll_s: float) -> None:
        """Submit (or adopt), stream the rank-0 log, wait for the end; delete the TrainJob in every
        case (done, failed, timed out, interrupted)."""
        name = manifest["metadata"]["name"]
        self.submit(manifest)
        stop = threading.Event()
        logs = threading.Thread(target=self.follow_logs, args=(name, stop, poll_s), daemon=True)
        logs.start()
        try:
            self.wait(name, timeout_s=timeout_s, poll_s=poll_s)
        finally:
            stop.set()
            logs.join(timeout=max(poll_s, 5.0))
            self.delete(name)


def _api_reason(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"


# --------------------------------------------------------------------------- the launcher pod


def launcher_env(container_env: Sequence[Any], environ: Mapping[str, str]) -> list[dict[str, Any]]:
    """The launcher container's environment the TrainJob needs (:data:`FORWARDED_ENV`), in the form of
    a pod spec: ConfigMap and Secret references as references; a value from the pod's own fields (the
    run id from its KFP label) resolved, since the TrainJob's pods carry no KFP labels."""
    forwarded = []
    for var in container_env:
        if not FORWARDED_ENV.match(var.name) or var.name in LAUNCHER_ONLY_ENV:
            continue
        source = var.value_from
        if source is not None and (source.secret_key_ref or source.config_map_key_ref):
            kind, ref = (
                ("secretKeyRef", source.secret_key_ref)
                if source.secret_key_ref
                else ("configMapKeyRef", source.config_map_key_ref)
            )
            entry = {"name": ref.name, "key": ref.key}
            if ref.optional is not None:
                entry["optional"] = ref.optional
            forwarded.append({"name": var.name, "valueFrom": {kind: entry}})
        elif source is not None:
            if var.name in environ:
                forwarded.append({"name": var.name, "value": environ[var.name]})
        else:
            forwarded.append({"name": var.name, "value": var.value or ""})
    return forwarded


def launcher_pod(core: Any, namespace: str, environ: Mapping[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """(image, forwarded environment) of the pod this code runs in: KFP's ``main`` container."""
    name = environ.get("KFP_POD_NAME") or environ.get("HOSTNAME")
    if not name:
        raise DelrecError("cannot tell which pod this is (no KFP_POD_NAME or HOSTNAME)", field="KFP_POD_NAME")
    from kubernetes.client.exceptions import ApiException

    try:
        pod = core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        hint = CREATE_HINTS.get(exc.status, "") if exc.status == 403 else ""
        raise DelrecError(
            f"cannot read the launcher's own pod: {_api_reason(exc)}{hint}", path=name
        ) from None
    containers = pod.spec.containers
    main = next((c for c in containers if c.name == "main"), containers[0])
    return main.image, launcher_env(main.env or [], environ)


def current_namespace() -> str:
    """The namespace of this pod (its service account's): the TrainJob goes beside its launcher."""
    if not SERVICE_ACCOUNT_NAMESPACE.is_file():
        raise DelrecError(
            "not in a Kubernetes pod: no service-account namespace", path=SERVICE_ACCOUNT_NAMESPACE
        )
    return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()


def in_cluster_api_client() -> Any:
    """An ApiClient with this pod's service-account token (the launcher only runs in a pod)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException as exc:
        raise DelrecError(f"a TrainJob is launched from a pod of the pipeline: {exc}") from None
    return client.ApiClient()


def run_stage(
    stage: Stage,
    config: Mapping,
    inputs: Mapping[str, Artifact | None],
    out: Artifact,
    *,
    api_client: Any | None = None,
    environ: Mapping[str, str] | None = None,
    namespace: str | None = None,
    store: S3Store | None = None,
) -> dict:
    """Run ``stage`` as a TrainJob from a launcher pod (see the module doc) and return its metrics.

    The settings come from :data:`delrec.launch.ENV_TRAINJOB`, the run id and task from
    ``DELREC_RUN_ID`` / ``DELREC_TASK`` (the pipeline sets them); the output lands at ``out.path``.
    """
    environ = os.environ if environ is None else environ
    settings = TrainJobSettings.from_dict(json.loads(environ.get(ENV_TRAINJOB) or "{}"), source=ENV_TRAINJOB)
    run_id, task = environ.get(ENV_RUN_ID, ""), environ.get(ENV_TASK, "")
    job_name = trainjob_name(run_id, task)
    uris = {}
    for name, artifact in inputs.items():
        if artifact is None:
            continue
        if not is_s3_uri(artifact.uri):
            raise DelrecError(
                f"a TrainJob reads its inputs from the object store; this input's URI is {artifact.uri!r} "
                "(set the pipeline root to an s3:// bucket)",
                field=name,
            )
        uris[name] = artifact.uri
    out_uri = join_uri(settings.outputs, run_id, task)
    api_client = api_client or in_cluster_api_client()
    namespace = namespace or current_namespace()
    jobs = TrainJobs(api_client, namespace)
    image, env = launcher_pod(jobs.core, namespace, environ)
    manifest = build_trainjob(
        name=job_name,
        namespace=namespace,
        image=image,
        arguments=remote_stage_arguments(stage, config, uris, out_uri),
        settings=settings,
        env=env,
        labels={RUN_ID_LABEL: run_id, TASK_LABEL: task},
    )
    jobs.run(manifest, timeout_s=settings.timeout_s, poll_s=settings.poll_s)
    store = store or S3Store.from_env()
    store.get_dir(out_uri, out.path)
    store.remove_prefix(out_uri)
    return read_metrics(out.path)
