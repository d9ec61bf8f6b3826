"""Kubernetes manifests: each validates offline against the pinned Kubernetes version, the kustomize
overlays render, and the pieces agree with one another (secret names and keys, the S3 endpoint, the
buckets, the kind port mappings). Nothing here needs a cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from delrec.images import immutable_reference

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
# The Kubernetes minor version of the kind node image (manifests/kind/cluster.yaml); every manifest is
# validated against it.
K8S_VERSION = "1.33.0"
OVERLAYS = ("base", "overlays/kind", "overlays/gpu", "overlays/kind-gpu")
KIND_CONFIGS = sorted((MANIFESTS / "kind").glob("*.yaml"))


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource_files() -> list[Path]:
    """Every manifest file that holds Kubernetes resources (not kustomizations, not kind configs)."""
    return sorted(
        p
        for p in MANIFESTS.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p.parent != MANIFESTS / "kind"
    )


def validate(doc: dict, where: str) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


# --------------------------------------------------------------------------- a small kustomize resolver


def resolve(folder: Path) -> list[dict]:
    """Render a kustomization the way this repository uses kustomize: resources (files or folders with
    their own kustomization), common labels, and JSON6902 patches aimed by kind and name. It checks that
    every referenced file exists and every patch hits exactly one resource; a stand-in for `kubectl
    kustomize` where kubectl is not installed."""
    kfile = folder / "kustomization.yaml"
    assert kfile.is_file(), f"{folder} has no kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    known = {"apiVersion", "kind", "resources", "patches", "labels"}
    assert set(spec) <= known, f"{kfile}: fields this resolver does not handle: {set(spec) - known}"
    docs: list[dict] = []
    for ref in spec.get("resources", []):
        path = (folder / ref).resolve()
        assert path.exists(), f"{kfile}: resource {ref} does not exist"
        docs += resolve(path) if path.is_dir() else load_docs(path)
    for entry in spec.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
    for patch in spec.get("patches", []):
        target = patch["target"]
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"{kfile}: patch target {target} matches {len(hits)} resources"
        for op in yaml.safe_load(patch["patch"]):
            apply_json_patch(hits[0], op)
    return docs


def apply_json_patch(doc: dict, op: dict) -> None:
    assert op["op"] in ("add", "replace"), f"unsupported patch op {op['op']}"
    *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
    node = doc
    for part in parents:
        node = node[part]
    if op["op"] == "replace":
        assert last in node or isinstance(last, int), f"replace of a missing field {op['path']}"
    node[last] = op["value"]


def rendered(overlay: str) -> list[dict]:
    return resolve(MANIFESTS / overlay)


def find(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def secret_refs(doc: dict):
    """(secret name, key) of every secretKeyRef in a workload."""
    text = yaml.safe_dump(doc)
    for match in re.finditer(r"secretKeyRef:\n\s+key: (\S+)\n\s+name: (\S+)", text):
        yield match.group(2), match.group(1)


def secret_templates() -> dict[tuple[str, str], dict]:
    docs = [d for p in sorted((MANIFESTS / "secrets").glob("*.yaml")) for d in load_docs(p)]
    return {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in docs}


def import_pipeline():
    sys.path.insert(0, str(REPO))
    try:
        import pipeline
    finally:
        sys.path.remove(str(REPO))
    return pipeline


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_validates_strictly(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        validate(doc, str(path.relative_to(REPO)))


def kubernetes_validate_cli() -> str | None:
    local = Path(sys.executable).parent / "kubernetes-validate"
    return str(local) if local.exists() else shutil.which("kubernetes-validate")


@pytest.mark.skipif(kubernetes_validate_cli() is None, reason="kubernetes-validate CLI not installed")
def test_kubernetes_validate_cli_strict_passes_every_file():
    """The same check through the command line, as CI or a reviewer would run it."""
    files = [str(p) for p in resource_files()]
    out = subprocess.run(
        [kubernetes_validate_cli(), "--strict", "-k", K8S_VERSION, "--quiet", *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_strict_validation_rejects_an_unknown_field():
    doc = load_docs(MANIFESTS / "overlays" / "kind" / "kfp-ui-nodeport.yaml")[0]
    doc["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape("('portz' was unexpected)")):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_resolves_and_validates(overlay):
    docs = rendered(overlay)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert len(names) == len(docs), f"{overlay}: duplicate resources"
    for doc in docs:
        validate(doc, overlay)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "delrec"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_renders_the_same_resources(overlay):
    out = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS / overlay)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for doc in docs:
        validate(doc, f"kubectl kustomize {overlay}")
    ours = {yaml.safe_dump(d, sort_keys=True) for d in rendered(overlay)}
    assert {yaml.safe_dump(d, sort_keys=True) for d in docs} == ours


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_credentials_in_applied_manifests(overlay):
    """Secrets are created at install time (kind-up.sh, or by hand from the templates), never applied from git."""
    assert not [d for d in rendered(overlay) if d["kind"] == "Secret"]


def test_secret_templates_hold_only_placeholders():
    templates = secret_templates()
    assert templates
    for (_, name), doc in templates.items():
        assert "data" not in doc, f"{name}: use stringData placeholders"
        for key, value in doc["stringData"].items():
            assert value == "REPLACE_ME", f"{name}.{key} holds a value, not the REPLACE_ME placeholder"


def pipeline_secret_refs() -> list[tuple[str, str, bool]]:
    """(secret name, key, optional) of every secretAsEnv of the committed pipeline.yaml's executors; a
    name given by a run parameter is that parameter's default."""
    spec, platform = yaml.safe_load_all((REPO / "pipeline.yaml").read_text())
    defaults = {n: p.get("defaultValue") for n, p in spec["root"]["inputDefinitions"]["parameters"].items()}
    refs = []
    for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
        for secret in executor.get("secretAsEnv", []):
            source = secret["secretNameParameter"]
            if "runtimeValue" in source:
                name = source["runtimeValue"]["constant"]
            else:  # a root parameter, passed into sub-DAGs (the publish condition) as pipelinechannel--<p>
                name = defaults[source["componentInputParameter"].removeprefix("pipelinechannel--")]
            refs += [(name, k["secretKey"], secret.get("optional", False)) for k in secret["keyToEnv"]]
    return refs


def test_secret_refs_finds_a_workloads_secret_key_refs():
    """The helper the template check relies on sees a secretKeyRef (no workload in the overlays has one
    today, so the check below would be empty if the helper were blind)."""
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "delrec-hf", "key": "token"}}}]
    job = {"kind": "Job", "spec": {"template": {"spec": {"containers": [{"name": "c", "env": env}]}}}}
    assert list(secret_refs(job)) == [("delrec-hf", "token")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_reference_has_a_template(overlay):
    templates = secret_templates()
    docs = rendered(overlay)
    refs = [(d["metadata"]["namespace"], name, key) for d in docs for name, key in secret_refs(d)]
    launcher = find(docs, "ConfigMap", "kfp-launcher")
    s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    ref = s3["credentials"]["secretRef"]
    namespace = launcher["metadata"]["namespace"]  # where the pipeline pods run
    refs += [
        (namespace, ref["secretName"], ref["accessKeyKey"]),
        (namespace, ref["secretName"], ref["secretKeyKey"]),
    ]
    # The pipeline's tasks: their object-store credentials must come from a templated secret too. The
    # Hugging Face token secret has no template on purpose: it is optional (tasks run without it; only
    # gated models need it), and README.md and docs/cluster.md say how to create it.
    pipeline = pipeline_secret_refs()
    hf = {ref for ref in pipeline if ref[0] == "delrec-hf"}
    assert hf == {("delrec-hf", "token", True)}
    tasks = [(namespace, name, key) for name, key, _ in set(pipeline) - hf]
    assert {(namespace, "delrec-s3", "accesskey"), (namespace, "delrec-s3", "secretkey")} <= set(tasks)
    refs += tasks
    assert refs
    for namespace, name, key in refs:
        assert (namespace, name) in templates, f"no template for secret {namespace}/{name}"
        assert key in templates[namespace, name]["stringData"], f"secret {name} template lacks key {key}"


def test_launcher_and_tasks_reach_the_same_store_and_a_bucket_the_setup_creates():
    """The launcher's provider and the tasks' ConfigMap name one endpoint, TLS and region; the pipeline
    root's bucket is one scripts/object-store-setup.sh creates; the ConfigMap holds exactly the keys
    pipeline.py maps to the environment, in the namespace of the pipeline pods."""
    pipeline = import_pipeline()
    docs = rendered("base")
    launcher = find(docs, "ConfigMap", "kfp-launcher")
    s3 = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    settings = find(docs, "ConfigMap", pipeline.PipelineOptions().s3_config_map)
    assert settings["metadata"]["namespace"] == launcher["metadata"]["namespace"]
    assert set(settings["data"]) == set(pipeline.S3_SETTINGS_ENV)
    assert settings["data"]["DELREC_S3_ENDPOINT"] == s3["endpoint"]
    assert settings["data"]["DELREC_S3_SECURE"] == ("false" if s3["disableSSL"] else "true")
    assert settings["data"]["DELREC_S3_REGION"] == s3["region"] and s3["forcePathStyle"] is True
    # The default store: the S3 port of the SeaweedFS Service KFP 2.17 installs.
    assert s3["endpoint"] == "seaweedfs.kubeflow.svc.cluster.local:9000"
    setup = (REPO / "scripts" / "object-store-setup.sh").read_text()
    buckets = re.search(r"^BUCKETS=\$\{BUCKETS:-([^}]*)\}$", setup, re.M).group(1).split()
    assert launcher["data"]["defaultPipelineRoot"].removeprefix("s3://").split("/")[0] in buckets
    assert {"delrec-data", "delrec-models"} <= set(buckets)


def test_kind_s3_node_port_reaches_seaweedfs_past_kfp_network_policy():
    docs = rendered("overlays/kind")
    service = find(docs, "Service", "delrec-s3")
    assert service["spec"]["selector"] == {"app": "seaweedfs"}
    assert service["spec"]["ports"][0]["targetPort"] == 8333  # SeaweedFS's S3 port
    policy = find(docs, "NetworkPolicy", "delrec-s3-from-host")["spec"]
    assert policy["podSelector"]["matchLabels"] == service["spec"]["selector"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [8333]
    assert not [d for d in rendered("overlays/gpu") if d["kind"] == "NetworkPolicy"]  # kind only


@pytest.mark.parametrize(
    ("overlay", "cluster"), [("overlays/kind", "cluster.yaml"), ("overlays/kind-gpu", "cluster-gpu.yaml")]
)
def test_kind_node_ports_match_the_kind_config(overlay, cluster):
    docs = rendered(overlay)
    node_ports = {
        p["nodePort"] for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"] if "nodePort" in p
    }
    mapped = {
        m["containerPort"]
        for node in load_docs(MANIFESTS / "kind" / cluster)[0]["nodes"]
        for m in node.get("extraPortMappings", [])
    }
    assert node_ports == mapped == {30080, 30900}


def test_gpu_overlay_runs_the_device_plugin_on_gpu_nodes():
    docs = rendered("overlays/gpu")
    plugin = find(docs, "DaemonSet", "nvidia-device-plugin-daemonset")["spec"]["template"]["spec"]
    assert plugin["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in plugin["tolerations"]
    # The kind GPU worker carries the same label and taint.
    workers = [
        n for n in load_docs(MANIFESTS / "kind" / "cluster-gpu.yaml")[0]["nodes"] if n["role"] == "worker"
    ]
    gpu = [n for n in workers if n.get("labels") == plugin["nodeSelector"]]
    assert len(gpu) == 1 and "key: nvidia.com/gpu" in gpu[0]["kubeadmConfigPatches"][0]
    assert (
        find(docs, "PersistentVolumeClaim", "delrec-model-cache")["spec"]["resources"]["requests"]["storage"]
        == "200Gi"
    )


def test_kind_gpu_overlay_has_the_device_plugin_the_s3_policy_and_a_claim_local_path_can_bind():
    """kind's only storage (local-path) binds ReadWriteOnce claims only: the kind-gpu overlay is the kind
    overlay (its node ports: test_kind_node_ports_match_the_kind_config) plus the device plugin."""
    docs = rendered("overlays/kind-gpu")
    find(docs, "DaemonSet", "nvidia-device-plugin-daemonset")
    assert find(docs, "PersistentVolumeClaim", "delrec-model-cache")["spec"]["accessModes"] == [
        "ReadWriteOnce"
    ]
    find(docs, "NetworkPolicy", "delrec-s3-from-host")


def test_gpu_kind_cluster_has_an_untainted_node_for_kfp_and_the_cpu_stages():
    """kind taints its control plane: without a worker free of the GPU taint, KFP never schedules."""
    nodes = load_docs(MANIFESTS / "kind" / "cluster-gpu.yaml")[0]["nodes"]
    schedulable = [
        n
        for n in nodes
        if n["role"] == "worker" and "taints" not in "".join(n.get("kubeadmConfigPatches", []))
    ]
    assert schedulable and not any(n.get("labels") for n in schedulable)


@pytest.mark.parametrize(
    ("overlay", "preset"),
    [("overlays/kind", "demo"), ("overlays/kind", "kind"), ("overlays/gpu", "ml-100k"), ("base", "demo")],
)
def test_model_cache_access_mode_matches_the_pipeline_compiled_for_it(overlay, preset):
    """kind keeps a ReadWriteOnce cache and its preset serialises the tasks that mount it; the gpu overlay
    shares it ReadWriteMany, as the LLM tasks of the ml-100k preset run side by side on several nodes."""
    pipeline = import_pipeline()
    pvc = find(rendered(overlay), "PersistentVolumeClaim", "delrec-model-cache")
    options = pipeline.pipeline_arguments(preset)[0]
    assert pvc["spec"]["accessModes"] == [options.model_cache_access]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay):
    for doc in rendered(overlay):
        text = yaml.safe_dump(doc)
        for image in re.findall(r"image: (\S+)", text):
            problem = immutable_reference(image)
            assert problem is None, f"{doc['metadata']['name']}: {problem}"


@pytest.mark.parametrize("path", KIND_CONFIGS, ids=lambda p: p.name)
def test_kind_node_image_matches_the_validated_version(path):
    config = load_docs(path)[0]
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4" and config["kind"] == "Cluster"
    for node in config["nodes"]:
        match = re.fullmatch(r"kindest/node:v(\d+\.\d+)\.\d+@sha256:[0-9a-f]{64}", node["image"])
        assert match, f"{path.name}: node image {node['image']} is not pinned by digest"
        assert match.group(1) == K8S_VERSION.rsplit(".", 1)[0]


def test_model_cache_init_job_prepares_the_images_cache_folders():
    """The Job runs as the images' user and creates their HF_HOME and DELREC_CACHE on the cache volume."""
    docs = rendered("base")
    job = find(docs, "Job", "delrec-model-cache-init")["spec"]["template"]["spec"]
    claim = job["volumes"][0]["persistentVolumeClaim"]["claimName"]
    pvc = find(docs, "PersistentVolumeClaim", claim)
    assert pvc["metadata"]["namespace"] == find(docs, "ConfigMap", "kfp-launcher")["metadata"]["namespace"]
    container = job["containers"][0]
    assert container["volumeMounts"][0]["mountPath"] == "/cache"
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (REPO / "docker" / dockerfile).read_text()
        uid = re.search(r"^ARG UID=(\d+)$", text, re.M).group(1)
        assert job["securityContext"]["runAsUser"] == int(uid)
        assert job["securityContext"]["runAsGroup"] == 0  # the images' user is in group 0
        hf_home = re.search(r"^ARG HF_HOME=(\S+)$", text, re.M).group(1)
        cache = re.search(r"DELREC_CACHE=(\S+)", text).group(1)
        for folder in (hf_home, cache):
            assert folder.startswith("/cache/") and "mkdir -p" in container["args"][0]
            assert folder in container["args"][0]


def test_trainjob_rbac_lets_the_pipeline_pods_do_what_the_launcher_does_and_no_more():
    """manifests/trainjob: the Role covers each API call of delrec.trainjob (create/get/delete of its
    TrainJob; its own pod, the rank-0 pod by label, that pod's log), bound to the ServiceAccount of KFP's
    pipeline pods in their namespace."""
    from delrec import trainjob

    docs = rendered("trainjob")
    assert {d["kind"] for d in docs} == {"Role", "RoleBinding"}
    for doc in docs:
        validate(doc, "trainjob")
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "delrec"
    role = find(docs, "Role", "delrec-trainjob-launcher")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {(trainjob.GROUP, trainjob.PLURAL, verb) for verb in ("create", "get", "delete")}
    needed |= {("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get")}
    assert needed <= granted
    # Nothing beyond the launcher's objects: no other resource, no update or patch of anything.
    assert {(group, resource) for group, resource, _ in granted} == {
        (trainjob.GROUP, trainjob.PLURAL), ("", "pods"), ("", "pods/log")
    }  # fmt: skip
    assert not {verb for *_, verb in granted} & {"update", "patch", "deletecollection", "*"}
    binding = find(docs, "RoleBinding", "delrec-trainjob-launcher")
    namespace = find(rendered("base"), "ConfigMap", "kfp-launcher")["metadata"]["namespace"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": namespace}
    ]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
