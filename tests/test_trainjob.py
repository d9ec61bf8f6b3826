"""delrec.trainjob: the TrainJob manifest against Kubeflow Trainer's API schema, and the launcher driven
through the real ``kubernetes`` client against an in-process fake API server (no cluster)."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import jsonschema
import pytest
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from kubernetes import client
from test_store import BUCKET, moto_endpoint, store  # noqa: F401 (fixtures)

from delrec import launch, trainjob
from delrec.errors import DelrecError
from delrec.launch import Artifact


def _trainjob_schema() -> dict:
    """The TrainJob's JSON schema from ``kubeflow-trainer-api`` (Trainer v2.3.0's API models, generated
    from its OpenAPI spec), made strict: an unknown field is an error here, where the API server would
    drop it without a word, and an optional field is absent, never null (so an error names the field)."""

    def closed(node: Any) -> Any:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            options = node.get("anyOf", [])
            if {"type": "null"} in options:
                rest = [option for option in node.pop("anyOf") if option != {"type": "null"}]
                node.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
            for value in node.values():
                closed(value)
        elif isinstance(node, list):
            for value in node:
                closed(value)
        return node

    schema = TrainerV1alpha1TrainJob.model_json_schema(by_alias=True)
    # The generated models wrap a resource Quantity in an object (their oneOf of float and str); on the
    # wire, as in the CRD, it is the string or number itself.
    schema["$defs"]["IoK8sApimachineryPkgApiResourceQuantity"] = {"type": ["string", "number"]}
    return closed(schema)


TRAINJOB_SCHEMA = jsonschema.Draft202012Validator(_trainjob_schema())
NAMESPACE = "kubeflow"
RUN_ID = "5f0c6b0e-2d4b-4c36-9a51-0a3c2b7f9e10"


def settings(**overrides) -> trainjob.TrainJobSettings:
    values = {"nodes": 2, "gpus_per_node": 4, "node_selector": {"nvidia.com/gpu.present": "true"}}
    return trainjob.TrainJobSettings(**{**values, **overrides})


def manifest(name: str = "delrec-distill-0123456789", **overrides) -> dict:
    return trainjob.build_trainjob(
        name=name,
        namespace=NAMESPACE,
        image="registry.example/delrec-gpu:abc123",
        arguments=trainjob.remote_stage_arguments(
            "distill", {"steps": 5}, {"data": "s3://b/d", "teacher": "s3://b/t"}, "s3://b/out"
        ),
        settings=settings(**overrides),
        env=[
            {
                "name": "DELREC_S3_ACCESS_KEY",
                "valueFrom": {"secretKeyRef": {"name": "delrec-s3", "key": "accesskey"}},
            }
        ],
        labels={trainjob.RUN_ID_LABEL: RUN_ID, trainjob.TASK_LABEL: "distill"},
    )


# --------------------------------------------------------------------------- the manifest


@pytest.mark.parametrize(
    "overrides", [{}, {"gpus_per_node": 0, "nodes": 2}, {"queue": "team-a", "model_cache_pvc": "cache"}]
)
def test_the_trainjob_validates_against_the_trainer_api_schema(overrides):
    TRAINJOB_SCHEMA.validate(manifest(**overrides))


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda m: m["spec"]["trainer"].update(numNodes="two"), "'two' is not of type 'integer'"),
        (lambda m: m["spec"]["trainer"].update(numNode=2), "'numNode' was unexpected"),
        (lambda m: m["spec"]["runtimePatches"][0].pop("manager"), "'manager' is a required property"),
        (lambda m: m["spec"]["trainer"]["env"].append({"value": "x"}), "'name' is a required property"),
    ],
)
def test_the_schema_check_catches_a_broken_trainjob(break_it, message):
    broken = manifest()
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError, match=message):
        TRAINJOB_SCHEMA.validate(broken)


def test_the_trainjob_carries_the_gpus_the_command_and_the_scheduling():
    m = manifest(queue="team-a")
    trainer = m["spec"]["trainer"]
    assert m["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and m["kind"] == "TrainJob"
    assert m["spec"]["runtimeRef"] == {
        "name": "torch-distributed", "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime"
    }  # fmt: skip
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 4
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
    assert trainer["command"] == ["python", "-m", "delrec.remote_stage"]
    assert trainer["args"][:5] == ["distill", "--data", "s3://b/d", "--teacher", "s3://b/t"]
    assert trainer["args"][5:8] == ["--out", "s3://b/out", "--config-json"]
    assert json.loads(trainer["args"][8]) == {"steps": 5}
    assert m["metadata"]["labels"] == {
        "pipeline/runid": RUN_ID, "delrec/task": "distill", "kueue.x-k8s.io/queue-name": "team-a"
    }  # fmt: skip
    (patch,) = m["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"] == [
        {"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}
    ]
    # No GPU: one CPU rank per node, no GPU request, no GPU node wanted.
    cpu = manifest(gpus_per_node=0)
    pod = cpu["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    resources = cpu["spec"]["trainer"]["resourcesPerNode"]
    assert cpu["spec"]["trainer"]["numProcPerNode"] == 1 and "limits" not in resources
    assert "nvidia.com/gpu" not in resources["requests"]
    cpu_pod = pod["template"]["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_pod and "nodeSelector" not in cpu_pod


def test_the_name_is_one_per_run_and_task_and_a_short_dns_label():
    name = trainjob.trainjob_name(RUN_ID, "finetune-ablation")
    assert name == trainjob.trainjob_name(RUN_ID, "finetune-ablation")  # a retry finds the same job
    assert name != trainjob.trainjob_name(RUN_ID, "finetune") != trainjob.trainjob_name("other", "finetune")
    assert len(name + "-node-0-0") <= 63 and name.startswith("delrec-finetune-ablation-")
    with pytest.raises(DelrecError, match="run id"):
        trainjob.trainjob_name("", "distill")


def test_settings_name_the_bad_field():
    with pytest.raises(DelrecError, match="nodes"):
        trainjob.TrainJobSettings.from_dict({"nodes": 0})
    with pytest.raises(DelrecError, match="outputs"):
        trainjob.TrainJobSettings.from_dict({"outputs": "/tmp/out"})
    with pytest.raises(DelrecError, match="queue: .*Kubernetes name"):
        trainjob.TrainJobSettings.from_dict({"queue": "Team A"})


@pytest.mark.parametrize(
    ("status", "hint"),
    [(403, "kubectl apply -k manifests/trainjob"), (404, "is Kubeflow Trainer v2 installed")],
)
def test_a_refused_trainjob_says_what_to_fix(cluster, status, hint):
    cluster.refuse_create = status
    runner, _ = jobs(cluster)
    with pytest.raises(DelrecError, match=hint):
        runner.run(manifest(), timeout_s=60, poll_s=0.01)
    assert cluster.deleted == []


# --------------------------------------------------------------------------- a fake Kubernetes API


class FakeCluster:
    """Just enough of the API server for delrec.trainjob: TrainJobs (create, get, delete), pods listed by
    label, a pod's log, and the launcher's own pod. ``statuses`` are the TrainJob's successive
    ``status`` values, one per GET (the last repeats)."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.statuses: list[dict] = [{}]
        self.gets = 0
        self.suspended_gets = 0  # the first GETs show the job suspended (queued by Kueue)
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.selectors: list[str] = []
        self.rank0_log = "rank 0: step 1\nrank 0: done\n"
        self.on_create = lambda job: None
        self.refuse_create = 0
        self.refuse_pods = False
        self.launcher = {
            "metadata": {"name": "launcher-pod", "namespace": NAMESPACE},
            "spec": {"containers": [{"name": "main", "image": "registry.example/delrec-gpu:abc123", "env": [
                {"name": "KFP_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "DELREC_TRAINER", "value": "trainjob"},
                {"name": "DELREC_TASK", "value": "distill"},
                {"name": "DELREC_RUN_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['pipeline/runid']"}}},
                {"name": "DELREC_S3_ENDPOINT", "valueFrom": {"configMapKeyRef": {"name": "delrec-object-store", "key": "DELREC_S3_ENDPOINT", "optional": True}}},
                {"name": "DELREC_S3_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "delrec-s3", "key": "accesskey"}}},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "delrec-hf", "key": "token", "optional": True}}},
                {"name": "NCCL_DEBUG", "value": "WARN"},
            ]}]},
        }  # fmt: skip

    def handle(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, object]:
        jobs = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NAMESPACE}/trainjobs"
        pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
        if method == "POST" and path == jobs:
            if self.refuse_create:
                return self.refuse_create, {"kind": "Status", "message": "refused"}
            name = body["metadata"]["name"]
            if name in self.jobs:
                return 409, {"kind": "Status", "reason": "AlreadyExists", "message": f"{name} already exists"}
            self.created.append(body)
            self.jobs[name] = body
            self.on_create(body)
            return 201, body
        if path.startswith(jobs + "/"):
            name = path.rsplit("/", 1)[1]
            if name not in self.jobs:
                return 404, {"kind": "Status", "reason": "NotFound", "message": "not found"}
            if method == "DELETE":
                self.deleted.append(name)
                del self.jobs[name]
                return 200, {"kind": "Status", "status": "Success"}
            status = self.statuses[min(self.gets, len(self.statuses) - 1)]
            self.gets += 1
            job = {**self.jobs[name], "status": status}
            if self.gets <= self.suspended_gets:
                job["spec"] = {**job["spec"], "suspend": True}
            return 200, job
        if path == pods:
            selector = query.get("labelSelector", [""])[0]
            self.selectors.append(selector)
            wanted = dict(pair.split("=") for pair in selector.split(","))
            items = []
            for name in self.jobs:
                labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                          "batch.kubernetes.io/job-completion-index": "0"}  # fmt: skip
                if wanted.items() <= labels.items():
                    items.append({"metadata": {"name": f"{name}-node-0-0-x1", "uid": f"uid-{name}", "labels": labels},
                                  "status": {"phase": "Running"}})  # fmt: skip
            return 200, {"kind": "PodList", "items": items}
        if path.endswith("/log") and path.startswith(pods):
            # The client sends follow=True; the API server parses it with Go's strconv.ParseBool.
            assert query.get("container") == ["node"] and query.get("follow", [""])[0].lower() == "true"
            return 200, self.rank0_log
        if path == f"{pods}/launcher-pod":
            if self.refuse_pods:
                return 403, {"kind": "Status", "message": 'pods "launcher-pod" is forbidden'}
            return 200, self.launcher
        return 404, {"kind": "Status", "message": f"no route {method} {path}"}


@pytest.fixture
def cluster():
    fake = FakeCluster()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            status, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    fake.api_client = client.ApiClient(config)
    yield fake
    server.shutdown()


def jobs(fake: FakeCluster) -> tuple[trainjob.TrainJobs, io.StringIO]:
    out = io.StringIO()
    return trainjob.TrainJobs(fake.api_client, NAMESPACE, out=out, sleep=lambda s: None), out


RUNNING = {"conditions": [{"type": "Created", "status": "True", "reason": "JobsCreated", "message": ""}]}
COMPLETE = {
    "conditions": [{"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "done"}]
}
FAILED = {"conditions": [{"type": "Failed", "status": "True", "reason": "JobsFailed",
                          "message": "jobset failed: node-0 exited with code 1"}]}  # fmt: skip


def test_a_trainjob_that_succeeds_is_followed_and_deleted(cluster):
    cluster.statuses = [{}, RUNNING, RUNNING, COMPLETE]
    runner, out = jobs(cluster)
    runner.run(manifest(), timeout_s=60, poll_s=0.01)
    assert [j["metadata"]["name"] for j in cluster.created] == ["delrec-distill-0123456789"]
    assert cluster.gets == 4 and cluster.deleted == ["delrec-distill-0123456789"]
    # The rank-0 pod's log, picked by the JobSet's labels and the Job's completion index.
    assert "rank 0: step 1\nrank 0: done\n" in out.getvalue()
    assert "--- log of delrec-distill-0123456789-node-0-0-x1 (rank 0) ---" in out.getvalue()
    assert cluster.selectors[0] == (
        "jobset.sigs.k8s.io/jobset-name=delrec-distill-0123456789,"
        "jobset.sigs.k8s.io/replicatedjob-name=node,batch.kubernetes.io/job-completion-index=0"
    )
    assert out.getvalue().count("--- log of") == 1  # each pod's log once


def test_a_failed_trainjob_fails_the_task_with_its_message_and_is_deleted(cluster):
    cluster.statuses = [RUNNING, FAILED]
    runner, _ = jobs(cluster)
    with pytest.raises(
        DelrecError, match="TrainJob failed: JobsFailed: jobset failed: node-0 exited with code 1"
    ):
        runner.run(manifest(), timeout_s=60, poll_s=0.01)
    assert cluster.deleted == ["delrec-distill-0123456789"]


def test_a_trainjob_that_runs_past_the_timeout_is_deleted(cluster):
    cluster.statuses = [RUNNING]
    clock = iter(range(0, 1000, 10))
    out = io.StringIO()
    runner = trainjob.TrainJobs(
        cluster.api_client, NAMESPACE, out=out, sleep=lambda s: None, clock=lambda: next(clock)
    )
    with pytest.raises(DelrecError, match="did not finish within 30 s"):
        runner.run(manifest(), timeout_s=30, poll_s=0.01)
    assert cluster.deleted == ["delrec-distill-0123456789"]


def test_time_in_the_kueue_queue_does_not_count_against_the_timeout(cluster):
    # 50 polls queued (500 s on the clock), then 2 running and complete: within 30 s of admission.
    cluster.statuses = [{}] * 50 + [RUNNING, RUNNING, COMPLETE]
    cluster.suspended_gets = 50
    clock = iter(range(0, 10_000, 10))
    runner = trainjob.TrainJobs(
        cluster.api_client, NAMESPACE, out=io.StringIO(), sleep=lambda s: None, clock=lambda: next(clock)
    )
    runner.run(manifest(), timeout_s=30, poll_s=0.01)
    assert cluster.gets == 53 and cluster.deleted == ["delrec-distill-0123456789"]
    # Admitted and then running past the timeout still fails.
    cluster.statuses, cluster.gets, cluster.suspended_gets = [RUNNING], 0, 5
    with pytest.raises(DelrecError, match="did not finish within 30 s"):
        runner.run(manifest(), timeout_s=30, poll_s=0.01)
    assert cluster.gets > 5


def test_a_retried_launcher_adopts_the_trainjob_of_the_attempt_before(cluster):
    earlier = manifest()
    cluster.jobs[earlier["metadata"]["name"]] = earlier  # the first launcher died, its job lives on
    cluster.statuses = [COMPLETE]
    runner, out = jobs(cluster)
    runner.run(manifest(), timeout_s=60, poll_s=0.01)
    assert cluster.created == [] and cluster.deleted == ["delrec-distill-0123456789"]
    assert "rank 0: done" in out.getvalue()


def test_a_trainjob_of_that_name_from_another_run_is_never_adopted(cluster):
    other = manifest()
    other["metadata"]["labels"]["pipeline/runid"] = "another-run"
    cluster.jobs[other["metadata"]["name"]] = other
    runner, _ = jobs(cluster)
    with pytest.raises(DelrecError, match="belongs to another run or task"):
        runner.run(manifest(), timeout_s=60, poll_s=0.01)
    assert cluster.deleted == []  # not ours to delete


def test_a_trainjob_deleted_under_the_launcher_fails_the_task(cluster):
    runner, _ = jobs(cluster)
    cluster.on_create = lambda job: cluster.jobs.clear()
    with pytest.raises(DelrecError, match="is gone"):
        runner.run(manifest(), timeout_s=60, poll_s=0.01)


# --------------------------------------------------------------------------- the launcher end to end


def test_the_launcher_runs_a_stage_as_a_trainjob(cluster, store, moto_endpoint, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("DELREC_S3_SECURE", "false")
    staged = f"s3://{BUCKET}/trainjob"
    environ = {
        "KFP_POD_NAME": "launcher-pod",
        "DELREC_RUN_ID": RUN_ID,
        "DELREC_TASK": "distill",
        launch.ENV_TRAINJOB: json.dumps({"nodes": 2, "gpus_per_node": 1, "outputs": staged, "poll_s": 0.01}),
    }
    cluster.statuses = [RUNNING, COMPLETE]

    def rank0_uploads(job):  # what node 0 of the TrainJob does: the output under --out
        args = job["spec"]["trainer"]["args"]
        out_uri = args[args.index("--out") + 1]
        store.put_bytes(b'{"best_step": 3, "ta_accuracy": 0.5}', f"{out_uri}/metrics.json")
        store.put_bytes(b"weights", f"{out_uri}/soft_prompt.safetensors")

    cluster.on_create = rank0_uploads
    inputs = {"data": Artifact("/unused", f"s3://{BUCKET}/v2/run/dataset"),
              "teacher": Artifact("/unused", f"s3://{BUCKET}/v2/run/teacher")}  # fmt: skip
    out = Artifact(str(tmp_path / "soft_prompt"), f"s3://{BUCKET}/v2/run/soft_prompt")
    metrics = trainjob.run_stage(
        "distill", {"steps": 5}, inputs, out, api_client=cluster.api_client, environ=environ,
        namespace=NAMESPACE, store=store,
    )  # fmt: skip
    assert metrics == {"best_step": 3, "ta_accuracy": 0.5}
    assert (tmp_path / "soft_prompt" / "soft_prompt.safetensors").read_bytes() == b"weights"
    assert store.list(f"{staged}/{RUN_ID}/distill") == []  # the staging prefix is removed
    (job,) = cluster.created
    TRAINJOB_SCHEMA.validate(job)
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == "registry.example/delrec-gpu:abc123"  # the launcher's own image
    assert trainer["args"][:5] == [
        "distill",
        "--data",
        inputs["data"].uri,
        "--teacher",
        inputs["teacher"].uri,
    ]
    assert trainer["args"][trainer["args"].index("--out") + 1] == f"{staged}/{RUN_ID}/distill"
    # Secrets and ConfigMaps stay references; the run id (from the launcher's KFP label) is resolved;
    # KFP's own variables and the launcher's switches stay behind.
    assert trainer["env"] == [
        {"name": "DELREC_TASK", "value": "distill"},
        {"name": "DELREC_RUN_ID", "value": RUN_ID},
        {"name": "DELREC_S3_ENDPOINT", "valueFrom": {"configMapKeyRef": {"name": "delrec-object-store", "key": "DELREC_S3_ENDPOINT", "optional": True}}},
        {"name": "DELREC_S3_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "delrec-s3", "key": "accesskey"}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "delrec-hf", "key": "token", "optional": True}}},
        {"name": "NCCL_DEBUG", "value": "WARN"},
    ]  # fmt: skip
    assert job["metadata"]["name"] == trainjob.trainjob_name(RUN_ID, "distill")
    assert cluster.deleted == [job["metadata"]["name"]]


def test_the_launcher_refuses_inputs_outside_the_object_store(cluster, tmp_path):
    environ = {"DELREC_RUN_ID": RUN_ID, "DELREC_TASK": "distill"}
    with pytest.raises(DelrecError, match="field 'data'.*object store"):
        trainjob.run_stage(
            "distill", {}, {"data": Artifact("/d", "/local/d")}, Artifact(str(tmp_path / "o")),
            api_client=cluster.api_client, environ=environ, namespace=NAMESPACE,
        )  # fmt: skip
    assert cluster.created == []


def test_a_launcher_without_its_rbac_or_its_run_id_says_what_is_missing(cluster, tmp_path):
    inputs, out = {"data": Artifact("/d", f"s3://{BUCKET}/d")}, Artifact(str(tmp_path / "o"))
    cluster.refuse_pods = True
    environ = {"KFP_POD_NAME": "launcher-pod", "DELREC_RUN_ID": RUN_ID, "DELREC_TASK": "finetune"}
    with pytest.raises(DelrecError, match="own pod: .*forbidden.*kubectl apply -k manifests/trainjob"):
        trainjob.run_stage(
            "finetune", {}, inputs, out, api_client=cluster.api_client, environ=environ, namespace=NAMESPACE
        )
    with pytest.raises(DelrecError, match="run id"):  # not a KFP pod: refused before any API call
        trainjob.run_stage(
            "finetune", {}, inputs, out, api_client=cluster.api_client, environ={}, namespace=NAMESPACE
        )
    assert cluster.created == []
