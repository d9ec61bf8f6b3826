"""pipeline.py: the committed compiled YAML, its Kubernetes settings, overrides, submit, the schedule
cron check, and the local task cache (test_pipeline_schedule.py: scheduling on a server)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import ancestors  # noqa: E402
from test_store import BUCKET, moto_endpoint, store  # noqa: E402, F401 (fixtures)

import pipeline  # noqa: E402
from delrec import pipeline_cache, pipeline_report  # noqa: E402
from delrec.config import RUN_PARAMETERS, load_preset  # noqa: E402
from delrec.errors import DelrecError  # noqa: E402

# The stages that load the LLM: distill, both finetunes, and evaluate (it scores three LLM variants).
GPU_EXECUTORS = ("exec-distill", "exec-finetune", "exec-finetune-2", "exec-evaluate", "exec-recommend")


def load_compiled(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_current(tmp_path):
    fresh = pipeline.compile_pipeline(tmp_path / "pipeline.yaml")
    assert pipeline.COMPILED.is_file(), "run `make compile` and commit pipeline.yaml"
    assert fresh.read_text() == pipeline.COMPILED.read_text(), "pipeline.yaml is stale: run `make compile`"


def test_compiled_yaml_gpu_scheduling_secrets_and_resources():
    spec, k8s = load_compiled(pipeline.COMPILED)
    executors = spec["deploymentSpec"]["executors"]
    assert set(executors) == {
        "exec-prepare",
        "exec-preprocess",
        "exec-train-teacher",
        *GPU_EXECUTORS,
        "exec-evaluate",
        "exec-publish",
    }
    for name, executor in executors.items():
        resources = executor["container"]["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name
        assert k8s[name]["activeDeadlineSeconds"], name
        gpu = name in GPU_EXECUTORS
        assert ("accelerator" in resources) == gpu, name
        assert ("tolerations" in k8s[name]) == gpu, name
        assert executor["container"]["image"].startswith("{{$.inputs.parameters"), name  # an image parameter
    for name in GPU_EXECUTORS:
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in k8s[name][
            "tolerations"
        ]
        assert k8s[name]["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
        shm = k8s[name]["emptyDirMounts"]
        assert shm == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi", "volumeName": "dshm"}
        ]
        assert k8s[name]["secretAsEnv"][0]["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "token"}]
        assert int(k8s[name]["activeDeadlineSeconds"]) == pipeline.PipelineOptions().gpu_timeout_s
    s3_env = [{"envVar": "DELREC_S3_ACCESS_KEY", "secretKey": "accesskey"},
              {"envVar": "DELREC_S3_SECRET_KEY", "secretKey": "secretkey"}]  # fmt: skip
    for name in set(executors) - set(GPU_EXECUTORS):
        assert "nodeSelector" not in k8s[name], name
    for name in ("exec-prepare", "exec-preprocess", "exec-publish"):
        secret, *others = k8s[name]["secretAsEnv"]
        assert secret["keyToEnv"] == s3_env
        assert "s3_secret" in str(secret["secretNameParameter"])  # the secret's name is a run parameter
        # prepare checks the backbone on the hub as the LLM stages will load it: with the gated-model token
        expected = [[{"envVar": "HF_TOKEN", "secretKey": "token"}]] if name == "exec-prepare" else []
        assert [other["keyToEnv"] for other in others] == expected, name
        assert all(other["optional"] for other in others), name


def test_compiled_yaml_caching_retries_and_publish_condition():
    spec, _ = load_compiled(pipeline.COMPILED)
    tasks = spec["root"]["dag"]["tasks"]
    for name, task in tasks.items():
        if name.startswith("condition"):
            continue
        assert task["retryPolicy"]["maxRetryCount"] == 2, name
        if name != "prepare":
            assert task["cachingOptions"] == {"enableCache": True}, name
    # KFP's cache key hashes a task's inputs: each stage's config dict (the run parameters applied by
    # prepare) and the data fingerprint are inputs, so a changed config or changed data is a cache miss.
    stage_config = {"preprocess": "preprocess", "train-teacher": "teacher", "distill": "distill",
                    "finetune": "finetune", "finetune-2": "finetune", "evaluate": "evaluate"}  # fmt: skip
    for task, stage in stage_config.items():
        config = tasks[task]["inputs"]["parameters"]["config"]
        assert config == {
            "taskOutputParameter": {"outputParameterKey": f"{stage}_config", "producerTask": "prepare"}
        }
    # Both finetunes get the teacher (read with teacher_kd > 0); only DELRec's gets the soft prompt.
    for task, soft in (("finetune", True), ("finetune-2", False)):
        artifacts = tasks[task]["inputs"]["artifacts"]
        assert artifacts["teacher"]["taskOutputArtifact"] == {
            "outputArtifactKey": "teacher",
            "producerTask": "train-teacher",
        }
        assert ("soft_prompt" in artifacts) is soft
    (condition,) = [t for n, t in tasks.items() if n.startswith("condition")]
    assert "publish_to" in condition["triggerPolicy"]["condition"]
    publish = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]["publish"]
    assert publish["cachingOptions"] == {}  # never from cache: a re-run must push again
    # The bundle's folder is the job id: a recurring run's name is empty, its id never is.
    params = publish["inputs"]["parameters"]
    assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"


@pytest.mark.parametrize(
    "overrides", [[], ["trainer=trainjob", "gpus=4", "queue=team-a"], ["trainer=trainjob"]]
)
def test_every_retry_of_a_task_can_run_its_whole_timeout(tmp_path, overrides):
    # Argo counts backoffMaxDuration from the first attempt's start: past it a failed task is not
    # retried, and a retried pod is killed at it (workflow/controller/operator.go, processNodeRetries).
    options = pipeline.pipeline_arguments("ml-100k", None, overrides)[0]
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    checked = 0
    for task in (t for dag in dags for t in dag["tasks"].values() if "retryPolicy" in t):
        policy = task["retryPolicy"]
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        timeout = int(k8s[executor].get("activeDeadlineSeconds", 0))
        retries, factor = policy["maxRetryCount"], policy["backoffFactor"]
        assert factor == int(factor) >= 1, executor  # Argo parses the factor as an integer
        first_wait = int(policy["backoffDuration"].removesuffix("s"))
        needed = timeout * (retries + 1) + sum(first_wait * int(factor) ** i for i in range(retries))
        window = int(policy["backoffMaxDuration"].removesuffix("s"))
        assert retries >= 1 and window >= (needed if timeout else 30 * 86400), executor
        checked += 1
    assert checked == 9  # every task: the root's seven and the publish condition's two


def test_the_source_is_fingerprinted_each_run_by_a_first_task_that_is_never_cached():
    spec, _ = load_compiled(pipeline.COMPILED)
    tasks = spec["root"]["dag"]["tasks"]
    prepare = tasks["prepare"]
    # A cached prepare would hand every scheduled run the first run's fingerprint: no retraining.
    assert prepare["cachingOptions"].get("enableCache") is not True
    assert "dependentTasks" not in prepare and "prepare" in tasks["preprocess"]["dependentTasks"]
    fingerprint = tasks["preprocess"]["inputs"]["parameters"]["source_fingerprint"]
    assert fingerprint == {
        "taskOutputParameter": {"outputParameterKey": "source_fingerprint", "producerTask": "prepare"}
    }
    # Nothing fingerprinted at submit time: a schedule's arguments are fixed when it is created.
    assert "source_fingerprint" not in spec["root"]["inputDefinitions"]["parameters"]
    # The backbone folder's key goes to every task that loads the backbone's weights without an
    # upstream LLM artifact (evaluate reads distill's and finetune's, which change with the weights).
    key = {"taskOutputParameter": {"outputParameterKey": "backbone_key", "producerTask": "prepare"}}
    for name in ("distill", "finetune", "finetune-2"):
        assert tasks[name]["inputs"]["parameters"]["backbone_key"] == key, name
    executor = spec["deploymentSpec"]["executors"]["exec-prepare"]["container"]
    assert executor["image"] == "{{$.inputs.parameters['pipelinechannel--cpu_image']}}"
    assert "accelerator" not in executor["resources"]


FLAT_TYPES = {"source": "STRING", "teacher_model": "STRING", "backbone": "STRING",
              "distill_steps": "NUMBER_INTEGER", "distill_batch_size": "NUMBER_INTEGER",
              "finetune_steps": "NUMBER_INTEGER", "finetune_batch_size": "NUMBER_INTEGER",
              "evaluate_batch_size": "NUMBER_INTEGER", "publish_to": "STRING"}  # fmt: skip


@pytest.mark.parametrize("preset", [None, "demo"])
def test_run_parameters_are_flat_typed_and_default_to_the_preset(tmp_path, preset):
    if preset is None:  # the committed YAML: the default preset's values
        path, sections = pipeline.COMPILED, load_preset(pipeline.DEFAULT_PRESET)
    else:
        path = pipeline.compile_pipeline(tmp_path / "p.yaml", *pipeline.pipeline_arguments(preset))
        sections = load_preset(preset)
    spec, _ = load_compiled(path)
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: params[name]["parameterType"] for name in FLAT_TYPES} == FLAT_TYPES
    assert set(FLAT_TYPES) == {*RUN_PARAMETERS, "publish_to"}
    expected = {
        "source": sections["preprocess"].get("source") or "",
        "teacher_model": sections["teacher"]["model"],
        "backbone": sections["distill"]["backbone"],
        "distill_steps": sections["distill"]["steps"],
        "distill_batch_size": sections["distill"]["batch_size"],
        "finetune_steps": sections["finetune"]["steps"],
        "finetune_batch_size": sections["finetune"]["batch_size"],
        "evaluate_batch_size": sections["evaluate"]["batch_size"],
        "publish_to": sections.get("pipeline", {}).get("publish_to", "") if preset else "",
    }
    assert {name: params[name]["defaultValue"] for name in FLAT_TYPES} == expected
    # "Create run" in the UI needs nothing pasted: every root parameter has a default.
    for name, param in params.items():
        assert param.get("isOptional") is True and "defaultValue" in param, name
    # The rest of each stage's config is a dict parameter with the preset's values, without the flat fields.
    distill = params["distill_config"]["defaultValue"]
    assert distill["warmup_steps"] == sections["distill"]["warmup_steps"]
    assert not {"steps", "batch_size", "backbone"} & set(distill)


def test_a_run_parameter_wins_over_its_stage_dict(tmp_path):
    from components import prepare
    from delrec.config import apply_run_parameters
    from delrec.store import local_fingerprint

    source = tmp_path / "raw"
    source.mkdir()
    (source / "u.data").write_text("1\t1\t5\t1\n")
    configs = {f"{stage}_config": {} for stage in pipeline.STAGES}
    configs["distill_config"] = {"steps": 20, "batch_size": 2, "backbone": "tiny-t5", "warmup_steps": 4}
    configs["preprocess_config"] = {"dataset": "ml-100k", "source": "/elsewhere"}
    out = prepare.python_func(
        **configs, source=str(source), backbone="tiny-llama", distill_steps=5, finetune_steps=0
    )
    assert out.distill_config == {"steps": 5, "batch_size": 2, "backbone": "tiny-llama", "warmup_steps": 4}
    assert out.finetune_config == out.evaluate_config == {"backbone": "tiny-llama"}
    assert out.preprocess_config == {"dataset": "ml-100k", "source": str(source)}
    assert out.source_fingerprint == local_fingerprint(source)
    # An empty run parameter leaves the dict's value; no source at all: nothing to fingerprint.
    configs["preprocess_config"] = {"dataset": "ml-100k"}
    out = prepare.python_func(**configs, source="")
    assert out.preprocess_config == {"dataset": "ml-100k"} and out.source_fingerprint == ""
    with pytest.raises(DelrecError, match="unknown run parameter"):
        apply_run_parameters({}, {"steps": 5})


def test_new_weights_under_an_unchanged_backbone_folder_change_prepares_backbone_key(tmp_path):
    from components import prepare
    from delrec.llm.backbone import weights_key

    folder = tmp_path / "my-llm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights v1")
    configs = {f"{stage}_config": {} for stage in pipeline.STAGES}

    def key(backbone: str) -> str:
        return prepare.python_func(**configs, backbone=backbone).backbone_key

    first = key(str(folder))
    assert len(first) == 16 and key(str(folder)) == first  # unchanged weights: a cache hit
    (folder / "model.safetensors").write_bytes(b"weights v2, longer")
    assert key(str(folder)) not in ("", first)
    # Built-in names and model ids: the code and the id are the key; no name (the configs' default), no
    # listing of the working folder.
    assert key("smollm2-135m") == key("tiny-llama") == key("") == ""
    assert weights_key("HuggingFaceTB/SmolLM2-135M") == ""  # prepare would ask the hub whether it exists


def test_prepare_refuses_a_backbone_that_cannot_load_before_any_stage_runs(tmp_path, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    from components import prepare

    configs = {f"{stage}_config": {} for stage in pipeline.STAGES}

    def refused(backbone: str) -> DelrecError:
        with pytest.raises(DelrecError) as err:
            prepare.python_func(**configs, backbone=backbone)
        assert err.value.field == "backbone"
        return err.value

    assert "offline mode" in str(refused("nosuch"))  # the tests run with HF_HUB_OFFLINE=1
    assert "no such model folder" in str(refused(str(tmp_path / "missing")))
    assert "no such model folder" in str(refused("./missing"))
    assert "no config.json" in str(refused(str(tmp_path)))
    (tmp_path / "config.json").write_text("{}")
    assert prepare.python_func(**configs, backbone=str(tmp_path)).backbone_key  # a model folder passes

    # Online, the hub is asked (here a stand-in): an unknown id is refused, a hub out of reach is not.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    answers = []

    def model_info(repo_id, **kwargs):
        raise answers.pop()

    monkeypatch.setattr("huggingface_hub.model_info", model_info)
    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # without an HTTP response
    Exception.__init__(not_found, "404 Repository Not Found")
    answers.append(not_found)
    assert "the Hugging Face hub has no such model" in str(refused("org/nosuch"))
    answers.append(OSError("Name or service not known"))
    assert prepare.python_func(**configs, backbone="org/maybe").backbone_key == ""


def test_prepare_fails_the_run_when_later_tasks_would_wait_for_a_missing_s3_secret(tmp_path, monkeypatch):
    from components import prepare
    from delrec.store import ENV_CREDENTIALS_USERS

    # Compiled: prepare's pod is told every task that mounts the object-store secret without `optional`.
    spec, k8s = load_compiled(pipeline.COMPILED)
    s3_keys = set(pipeline.PipelineOptions().s3_secret_keys.values())
    required = {
        executor
        for executor, settings in k8s.items()
        for secret in settings.get("secretAsEnv", [])
        if {e["envVar"] for e in secret["keyToEnv"]} == s3_keys and not secret.get("optional")
    }
    tasks = spec["root"]["dag"]["tasks"]
    training = {
        tasks[t]["componentRef"]["name"].replace("comp-", "exec-"): n for t, n in TRAINING_TASKS.items()
    }
    assert required == {*training, "exec-publish", "exec-recommend"}  # the last two: when publish_to is set
    users = container_env(spec, "exec-prepare")[ENV_CREDENTIALS_USERS].split(",")
    assert sorted(users) == sorted(training.values())
    # Checkpoints on the pods' own disks: no task needs the secret unless the run publishes.
    bare = pipeline.compile_pipeline(tmp_path / "p.yaml", pipeline.PipelineOptions(checkpoint_root=""))
    assert ENV_CREDENTIALS_USERS not in container_env(load_compiled(bare)[0], "exec-prepare")

    # Run: no credentials in prepare's environment fails the run before preprocess, naming the field.
    for var in ("DELREC_S3_ACCESS_KEY", "DELREC_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    configs = {f"{stage}_config": {} for stage in pipeline.STAGES}
    monkeypatch.setenv(ENV_CREDENTIALS_USERS, ",".join(users))
    with pytest.raises(DelrecError, match="distill, .*finetune.* need object-store credentials") as err:
        prepare.python_func(**configs)
    assert err.value.field == "s3_secret" and "delrec-s3" in str(err.value)
    monkeypatch.delenv(ENV_CREDENTIALS_USERS)
    assert prepare.python_func(**configs).source_fingerprint == ""  # nothing needs them
    with pytest.raises(DelrecError, match="publish, recommend need"):
        prepare.python_func(**configs, publish_to="s3://registry/delrec")
    monkeypatch.setenv("DELREC_S3_ACCESS_KEY", "key")
    monkeypatch.setenv("DELREC_S3_SECRET_KEY", "secret")
    monkeypatch.setenv(ENV_CREDENTIALS_USERS, ",".join(users))
    assert prepare.python_func(**configs, publish_to="s3://registry/delrec").source_fingerprint == ""


def test_a_killed_local_task_resumes_only_under_the_code_that_checkpointed_it(tmp_path):
    from delrec.pipeline_cli import local_run_id

    root = tmp_path / ".checkpoints"
    (root / "local-aaaa" / "distill").mkdir(parents=True)
    (root / "local-aaaa" / "distill" / "state.pt").write_bytes(b"trained by code aaaa")
    (root / "local" / "finetune").mkdir(parents=True)  # the run id before it named the code
    (root / "local-notes.txt").write_text("not ours")
    assert local_run_id(root, "aaaa") == "local-aaaa"
    assert (root / "local-aaaa" / "distill" / "state.pt").read_bytes() == b"trained by code aaaa"  # resumes
    assert not (root / "local").exists()
    assert local_run_id(root, "bbbb") == "local-bbbb"  # other code: starts afresh ...
    assert not (root / "local-aaaa").exists()  # ... and the state only code aaaa could resume is gone
    assert (root / "local-notes.txt").read_text() == "not ours"


def test_new_objects_under_an_s3_source_change_the_fingerprint(store, moto_endpoint, monkeypatch):  # noqa: F811
    from components import prepare

    uri = f"s3://{BUCKET}/raw/tiny"
    configs = {f"{stage}_config": {} for stage in pipeline.STAGES}
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)  # the delrec-object-store ConfigMap's
    monkeypatch.setenv("DELREC_S3_SECURE", "false")

    def fingerprint() -> str:
        return prepare.python_func(**configs, source=uri).source_fingerprint

    store.put_bytes(b"1\t1\t5\t1\n", f"{uri}/u.data")
    first = fingerprint()
    assert len(first) == 16 and fingerprint() == first  # unchanged data: the same key, a cache hit
    store.put_bytes(b"1\t1\t5\t2\n", f"{uri}/u.data")
    assert fingerprint() != first  # new data behind the same URI: a new key, a new model


def gpu_counts(spec: dict) -> dict[str, str]:
    """GPU executor -> its compiled accelerator count (the value the driver puts in the pod's limits)."""
    counts = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        if accelerator := executor["container"]["resources"].get("accelerator"):
            counts[name] = accelerator["resourceCount"]
    return counts


@pytest.mark.parametrize("preset", [None, "demo", "ml-100k"])
def test_every_gpu_executor_requests_a_literal_gpu_count_and_a_gpu_node(tmp_path, preset):
    options = pipeline.pipeline_arguments(preset)[0] if preset else None
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    counts = gpu_counts(spec)
    assert set(counts) == set(GPU_EXECUTORS)
    for name, count in counts.items():
        # KFP 2.17's driver fills a placeholder from a parameter's string value: an int parameter
        # resolves to "" and the pod gets no GPU. Only a literal survives.
        assert "{{" not in str(count) and int(count) >= 1, (name, count)
        assert k8s[name]["nodeSelector"]["labels"]["nvidia.com/gpu.present"] == "true", name
    # No run parameter the driver could resolve to "" anywhere in the graph.
    assert "gpus" not in spec["root"]["inputDefinitions"]["parameters"]
    assert "accelerator_count" not in str(spec["root"])


def test_gpus_zero_runs_the_llm_stages_as_cpu_tasks(tmp_path):
    options = pipeline.pipeline_arguments("demo", None, ["gpus=0"])[0]
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    assert gpu_counts(spec) == {}
    assert not any("tolerations" in e or "nodeSelector" in e for e in k8s.values())


def test_options_change_the_kubernetes_settings(tmp_path):
    options = pipeline.PipelineOptions(
        gpus=2,
        gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        shm_size="2Gi",
        gpu_timeout_s=60,
        resources={"distill": {"cpu": "7", "memory": "3Gi"}},
    )
    _, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    spec, _ = load_compiled(tmp_path / "p.yaml")
    assert set(gpu_counts(spec).values()) == {"2"}
    for name in GPU_EXECUTORS:
        assert k8s[name]["nodeSelector"] == {
            "labels": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        }
        assert k8s[name]["emptyDirMounts"][0]["sizeLimit"] == "2Gi"
        assert k8s[name]["activeDeadlineSeconds"] == "60"
    assert "nodeSelector" not in k8s["exec-train-teacher"]
    resources = spec["deploymentSpec"]["executors"]["exec-distill"]["container"]["resources"]
    assert resources["resourceCpuRequest"] == "7" and resources["resourceMemoryRequest"] == "3Gi"
    # Stages not named keep a request (the defaults of Resources).
    assert spec["deploymentSpec"]["executors"]["exec-train-teacher"]["container"]["resources"][
        "resourceCpuRequest"
    ]


def test_arguments_from_preset_overrides_and_data(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    (data / "u.data").write_text("1\t1\t5\t1\n")
    options, args = pipeline.pipeline_arguments(
        "demo",
        str(data),
        [
            "preprocess.dataset=ml-100k",
            "seed=7",
            "teacher=gru4rec",
            "finetune.steps=3",
            "publish_to=s3://models",
            "pipeline.gpus=2",
        ],
    )
    assert args["source"] == str(data.resolve()) and "source" not in args["preprocess_config"]
    assert "source_fingerprint" not in args  # the pipeline's prepare task takes it when the run starts
    for stage in ("preprocess", "teacher", "distill", "finetune", "evaluate"):
        assert args[f"{stage}_config"]["seed"] == 7
    # The fields of RUN_PARAMETERS travel as flat run parameters, once: not also in their stage dicts.
    assert args["teacher_model"] == "gru4rec" and "model" not in args["teacher_config"]
    assert args["finetune_steps"] == 3 and "steps" not in args["finetune_config"]
    assert args["publish_to"] == "s3://models" and options.publish_to == "s3://models"
    assert options.gpus == 2 and "gpus" not in args  # compiled in, not a run argument
    # The same source in the preprocess config rather than --data.
    by_config = pipeline.pipeline_arguments(
        "demo", None, ["preprocess.dataset=ml-100k", f"preprocess.source={data}"]
    )[1]
    assert by_config["source"] == str(data)


@pytest.mark.parametrize(
    "overrides",
    [
        ["distill.steps=5", "backbone=tiny-llama-2"],
        ["distill_steps=5", "distill.backbone=tiny-llama-2", "finetune.backbone=tiny-llama-2",
         "evaluate.backbone=tiny-llama-2"],
    ],
)  # fmt: skip
def test_overrides_set_the_flat_run_parameters(overrides):
    args = pipeline.pipeline_arguments("demo", None, overrides)[1]
    assert args["distill_steps"] == 5 and args["backbone"] == "tiny-llama-2"
    for stage in ("distill", "finetune", "evaluate"):
        assert "backbone" not in args[f"{stage}_config"]


def test_one_backbone_for_every_llm_stage():
    with pytest.raises(DelrecError, match="set backbone="):
        pipeline.pipeline_arguments("demo", None, ["distill.backbone=other"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_preset_validates_before_anything_runs(preset):
    data = None if preset == "demo" else "/data"  # the demo's data is generated: a source is refused
    options, arguments = pipeline.pipeline_arguments(preset, data)
    assert options.local_root == f"local_outputs/{preset}"  # no two presets share a task cache
    assert arguments["source"] == (data or "")


def test_a_preset_extends_another_field_by_field(tmp_path):
    base = load_preset("ml-100k")
    steam = load_preset("steam")
    assert steam["preprocess"] == {**base["preprocess"], "dataset": "steam-llara", "split": "given"}
    assert steam["teacher"] == {**base["teacher"], "max_len": 10}
    assert steam["finetune"] == base["finetune"]
    loop = tmp_path / "a.yaml"
    loop.write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {loop}\n")
    with pytest.raises(DelrecError, match="extend each other in a loop"):
        load_preset(loop)
    bad = tmp_path / "c.yaml"
    bad.write_text("extends: ml-100k\nteacher: 5\n")
    with pytest.raises(DelrecError, match="field 'teacher'"):
        load_preset(bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("nosuchfield=1", "no stage config has a field"),
        ("bogus.steps=1", "unknown section"),
        ("teacher.max_epochs=-1", "teacher"),
        ("novalue", "param=value"),
        ("publish_to=/tmp/models", "s3://"),
        ("gate={metric: x}", "quality-gate"),
        ("pipeline.retry_backoff_factor=1.5", "retry_backoff_factor"),  # Argo would fail at the retry
        ("pipeline.retry_backoff=1 minute", "retry_backoff"),
    ],
)
def test_bad_overrides_fail_before_running(override, message, capsys):
    assert pipeline.main(["run", "--preset", "demo", override]) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def client():
    with mock.patch("kfp.Client") as cls:
        yield cls


def test_compile_to_a_folder_is_an_error_message(tmp_path, capsys):
    assert pipeline.main(["compile", "--out", str(tmp_path)]) == 2
    assert "--out must name a .yaml file" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_submit_calls_kfp_client(client):
    code = pipeline.main(
        [
            "submit",
            "--host",
            "http://kfp.example:8080",
            "--experiment",
            "nightly",
            "--pipeline-root",
            "s3://mlpipeline/delrec",
            "--preset",
            "demo",
            "--run-name",
            "try-1",
            "distill.steps=5",
            "preprocess.dataset=ml-100k",
            "source=s3://raw/ml-100k",
            "gpu_image=registry.local/delrec-gpu:dev",
        ]
    )
    assert code == 0
    client.assert_called_once_with(host="http://kfp.example:8080")
    call = client.return_value.create_run_from_pipeline_func.call_args
    assert call.kwargs["experiment_name"] == "nightly"
    assert call.kwargs["pipeline_root"] == "s3://mlpipeline/delrec"
    assert call.kwargs["run_name"] == "try-1"
    arguments = call.kwargs["arguments"]
    assert arguments["distill_steps"] == 5 and "steps" not in arguments["distill_config"]
    # Nothing is listed at submit time (the store may be reachable only inside the cluster): the run's
    # prepare task fingerprints the source.
    assert arguments["source"] == "s3://raw/ml-100k" and "source_fingerprint" not in arguments
    assert arguments["gpu_image"] == "registry.local/delrec-gpu:dev"
    assert call.args[0].name == "delrec"


def test_schedule_rejects_a_five_field_cron(client, capsys):
    assert pipeline.main(["schedule", "--host", "http://kfp:8080", "--cron", "0 3 * * *"]) == 2
    assert "6, seconds first" in capsys.readouterr().err
    client.assert_not_called()


def test_metrics_table():
    table = pipeline_report.format_metrics_table(
        {"delrec": {"HR@1": 0.5, "NDCG@5": 0.6}, "teacher": {"HR@1": 0.25}, "zero_shot": {"HR@1": 0.05}}
    )
    lines = table.splitlines()
    assert lines[0].split() == ["model", "|", "HR@1", "|", "NDCG@5"]
    assert "DELRec" in lines[2] and "0.5000" in lines[2] and "0.6000" in lines[2]
    assert lines[4].startswith("LLM, untuned")
    # Columns in the paper's order (HR by k, NDCG by k, MRR), rows with DELRec first.
    table = pipeline_report.format_metrics_table(
        {
            "teacher": {"MRR": 0.1, "HR@10": 0.2, "NDCG@10": 0.3, "HR@5": 0.4, "HR@1": 0.5},
            "delrec": {"HR@1": 0.1},
        }
    )
    header, _, first, _ = table.splitlines()
    assert header.split()[::2] == ["model", "HR@1", "HR@5", "HR@10", "NDCG@10", "MRR"]
    assert first.startswith("DELRec")


def test_model_cache_mounted_and_nothing_installed_at_run_time(tmp_path):
    spec, k8s = load_compiled(pipeline.COMPILED)
    for name in ("exec-preprocess", *GPU_EXECUTORS, "exec-evaluate"):
        (mount,) = k8s[name]["pvcMount"]
        assert (mount["constant"], mount["mountPath"]) == ("delrec-model-cache", "/cache"), name
    assert "pvcMount" not in k8s["exec-train-teacher"]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        # The images hold delrec and kfp: a task must not pip install (clusters may be offline).
        assert "pip install" not in " ".join(executor["container"]["command"]), name
    options = pipeline.PipelineOptions(model_cache_pvc="")
    _, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    assert not any("pvcMount" in executor for executor in k8s.values())


CACHE_TASKS = ("preprocess", "distill", "finetune", "finetune-2", "evaluate")


@pytest.mark.parametrize(
    ("preset", "access", "serial"), [("demo", "ReadWriteOnce", True), ("ml-100k", "ReadWriteMany", False)]
)
def test_a_read_write_once_model_cache_is_never_mounted_by_two_pods_at_once(tmp_path, preset, access, serial):
    options = pipeline.pipeline_arguments(preset)[0]
    assert options.model_cache_access == access
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    tasks, up = spec["root"]["dag"]["tasks"], ancestors(spec["root"]["dag"]["tasks"])
    pairs = [(a, b) for i, a in enumerate(CACHE_TASKS) for b in CACHE_TASKS[i + 1 :]]
    assert all(
        k8s[tasks[t]["componentRef"]["name"].replace("comp-", "exec-")]["pvcMount"] for t in CACHE_TASKS
    )
    # Two tasks can run at once unless one waits for the other.
    concurrent = [(a, b) for a, b in pairs if a not in up[b] and b not in up[a]]
    assert (concurrent == []) is serial, concurrent
    if not serial:  # the side-by-side graph needs the shared claim of the gpu overlay
        assert ("distill", "finetune-2") in concurrent


def test_paired_table_marks_intervals_that_exclude_zero():
    cell = lambda d, lo, hi: {"diff": d, "lo": lo, "hi": hi}  # noqa: E731
    table = pipeline_report.format_paired_table(
        {
            "delrec_minus_zero_shot": {"MRR": cell(0.01, -0.02, 0.04), "HR@1": cell(0.05, 0.01, 0.09)},
            "delrec_minus_popularity": {"HR@1": cell(-0.15, -0.2, -0.1), "MRR": cell(-0.1, -0.15, -0.05)},
        }
    )
    header, _, untuned, popularity = table.splitlines()
    assert header.split("|")[1].strip() == "HR@1"  # the paper's metric order
    assert untuned.startswith("DELRec - LLM, untuned") and "+0.050 [+0.010, +0.090]*" in untuned
    assert "+0.010 [-0.020, +0.040] " in untuned and "*" not in untuned.split("|")[2]
    assert popularity.startswith("DELRec - popularity") and popularity.count("*") == 2


# --------------------------------------------------------------------------- the local task cache


def cached_dataset(tmp_path: Path, cache: pipeline_cache.VerifiedCache, key: str = "k1"):
    """An entry in ``cache`` whose output is a Dataset folder with its content fingerprint."""
    from kfp import dsl

    from delrec.store import local_fingerprint

    folder = tmp_path / "run" / "preprocess" / "dataset"
    folder.mkdir(parents=True)
    (folder / "data.json").write_text('{"users": 3}')
    dataset = dsl.Dataset(name="dataset", uri=str(folder), metadata={"users": 3})
    dataset.metadata["content_fingerprint"] = local_fingerprint(folder)
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "run" / "evaluate" / "metrics"))
    metrics.log_metric("delrec_HR@1", 0.25)
    Path(metrics.path).parent.mkdir()
    Path(metrics.path).write_text(json.dumps(metrics.metadata))  # as components/evaluate.py writes it
    cache.put(key, {"dataset": dataset, "metrics": metrics, "Output": 1.5})
    return folder


def test_cache_entry_round_trips_and_is_recorded_as_a_hit(tmp_path):
    cache = pipeline_cache.VerifiedCache(str(tmp_path / "cache"))
    cached_dataset(tmp_path, cache)
    outputs = cache.get("k1")
    assert outputs["Output"] == 1.5 and outputs["dataset"].metadata["users"] == 3
    assert outputs["metrics"].metadata == {"delrec_HR@1": 0.25}
    assert cache.hits == {"k1": outputs}
    assert cache.get("other") is None


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda entry, data: entry.write_text("{not json"), id="unreadable"),
        pytest.param(lambda entry, data: entry.write_text("[1, 2]"), id="wrong-shape"),
        pytest.param(lambda entry, data: entry.write_text(entry.read_text()[:-20]), id="truncated"),
        pytest.param(
            lambda entry, data: entry.write_text(entry.read_text().replace("1.5", "2.5")), id="edited"
        ),
        pytest.param(lambda entry, data: (data / "data.json").write_text('{"users": 4}'), id="files-changed"),
        pytest.param(lambda entry, data: (data / "data.json").unlink(), id="file-gone"),
        pytest.param(lambda entry, data: __import__("shutil").rmtree(data), id="artifact-gone"),
        pytest.param(
            lambda entry, data: (data.parents[1] / "evaluate" / "metrics").write_text('{"delrec_HR@1": 0.9}'),
            id="metrics-file-edited",
        ),
        pytest.param(
            lambda entry, data: (data.parents[1] / "evaluate" / "metrics").unlink(), id="metrics-gone"
        ),
    ],
)
def test_a_damaged_cache_entry_is_a_miss_never_an_error(tmp_path, damage, caplog):
    cache = pipeline_cache.VerifiedCache(str(tmp_path / "cache"))
    data = cached_dataset(tmp_path, cache)
    damage(Path(cache._entry_path("k1")), data)
    assert cache.get("k1") is None and not cache.hits
    assert "a miss" in caplog.text


def test_cache_key_follows_the_library_code(tmp_path):
    args = ("preprocess", "image:1", ["python", "-c", "x"], {"config": {"seed": 1}})
    one = pipeline_cache.VerifiedCache(str(tmp_path), code="aaa")
    assert one.compute_key(*args) == pipeline_cache.VerifiedCache(str(tmp_path), code="aaa").compute_key(
        *args
    )
    assert one.compute_key(*args) != pipeline_cache.VerifiedCache(str(tmp_path), code="bbb").compute_key(
        *args
    )
    changed = ("preprocess", "image:1", ["python", "-c", "x"], {"config": {"seed": 2}})
    assert one.compute_key(*args) != one.compute_key(*changed)


def test_code_fingerprint_follows_the_library_sources_not_compiled_files(tmp_path, monkeypatch):
    package = tmp_path / "delrec"
    (package / "__pycache__").mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    monkeypatch.setattr(pipeline_cache.delrec, "__file__", str(package / "__init__.py"))
    before = pipeline_cache.code_fingerprint()
    (package / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"\0")
    assert pipeline_cache.code_fingerprint() == before
    (package / "__init__.py").write_text("x = 2\n")
    assert pipeline_cache.code_fingerprint() != before
    # An upgraded dependency (say transformers) changes it too: the local stand-in for a new image tag.
    import importlib.metadata

    after = pipeline_cache.code_fingerprint()
    real = importlib.metadata.distributions

    def upgraded():
        for dist in real():
            if dist.metadata["Name"] == "transformers":
                dist = type("Dist", (), {"metadata": {"Name": "transformers"}, "version": "99.0"})()
            yield dist

    monkeypatch.setattr("importlib.metadata.distributions", upgraded)
    assert pipeline_cache.code_fingerprint() != after


@pytest.mark.parametrize("flag, cached", [([], True), (["--no-cache"], False)])
def test_run_caches_unless_told_not_to(tmp_path, flag, cached):
    class Stop(Exception):
        pass

    init = mock.Mock()
    with (
        mock.patch("kfp.local.init", init),
        mock.patch.object(pipeline, "build_pipeline", side_effect=Stop),
        pytest.raises(Stop),
    ):
        pipeline.main(["run", "--preset", "demo", "--pipeline-root", str(tmp_path), *flag])
    kwargs = init.call_args.kwargs
    assert kwargs["cache_root"] == str(tmp_path / pipeline_cache.CACHE_DIR)
    # --no-cache: every task misses, and what it writes replaces the entry (a stale one is not kept).
    import kfp.local.cache as kfp_cache

    cache = kfp_cache._cache_singleton
    assert isinstance(cache, pipeline_cache.VerifiedCache) and kwargs["enable_caching"]
    cache.put("key", {})
    assert (cache.get("key") is not None) is cached


def test_a_failed_run_ends_in_one_line_naming_the_task_the_reason_and_the_fix(tmp_path, capsys):
    def failing(**_):
        print("Traceback (most recent call last):\n  ...\ndelrec.errors.DelrecError: cannot download ml-100k")
        raise RuntimeError("Pipeline \x1b[95m'delrec'\x1b[0m finished with status FAILURE. "
                           "Inner task failed: \x1b[96m'preprocess'\x1b[0m.")  # fmt: skip

    with mock.patch("kfp.local.init"), mock.patch.object(pipeline, "build_pipeline", return_value=failing):
        code = pipeline.main(["run", "--preset", "demo", "--pipeline-root", str(tmp_path)])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "task preprocess failed: DelrecError: cannot download ml-100k" in line
    assert "make run DATA=path/to/ml-100k" in line
    assert pipeline_report.failure_line(RuntimeError("Inner task failed: 'finetune-2'."), "").startswith(
        "task finetune (ablation) failed"
    )
    # A local copy that does not parse: no network hint, its log instead.
    parse_error = "DelrecError: /data/ml/u.data:2: expected 4 fields"
    line = pipeline_report.failure_line(RuntimeError("Inner task failed: 'preprocess'."), parse_error)
    assert line == f"task preprocess failed: {parse_error}; its log is above"


TRAINING_TASKS = {"train-teacher": "teacher", "distill": "distill", "finetune": "finetune",
                  "finetune-2": "finetune-ablation"}  # fmt: skip


def test_every_training_task_checkpoints_to_its_own_prefix_of_the_run(tmp_path):
    spec, k8s = load_compiled(pipeline.COMPILED)
    tasks, executors = spec["root"]["dag"]["tasks"], spec["deploymentSpec"]["executors"]
    s3_env = [{"envVar": "DELREC_S3_ACCESS_KEY", "secretKey": "accesskey"},
              {"envVar": "DELREC_S3_SECRET_KEY", "secretKey": "secretkey"}]  # fmt: skip
    for task, name in TRAINING_TASKS.items():
        executor = tasks[task]["componentRef"]["name"].replace("comp-", "exec-")
        env = {e["name"]: e["value"] for e in executors[executor]["container"]["env"]}
        assert env == {"DELREC_CHECKPOINT_ROOT": "s3://delrec-artifacts/checkpoints", "DELREC_TASK": name}
        # The run id comes from the pod's label: a retried pod of the same run gets the same prefix.
        assert k8s[executor]["fieldPathAsEnv"] == [
            {"fieldPath": "metadata.labels['pipeline/runid']", "name": "DELREC_RUN_ID"}
        ]
        secret = next(s for s in k8s[executor]["secretAsEnv"] if s["keyToEnv"] == s3_env)
        assert "s3_secret" in str(secret["secretNameParameter"]) and not secret.get("optional")
        params = tasks[task]["inputs"]["parameters"]
        # The endpoint comes from the delrec-object-store ConfigMap, like every task's.
        assert any(c["configMapName"] == "delrec-object-store" for c in k8s[executor]["configMapAsEnv"])
        # Nothing run-specific among the inputs: KFP's cache key holds every input value.
        assert "{{$.pipeline_job" not in str(params) and "{{$.pipeline_task" not in str(params), task
    for executor in ("exec-preprocess", "exec-evaluate", "exec-publish"):
        assert "env" not in executors[executor]["container"] and "fieldPathAsEnv" not in k8s[executor]
    # No claim per run: KFP puts the names of mounted claims into the cache key.
    assert not any("createpvc" in str(e["container"]["image"]).lower() for e in executors.values())
    options = pipeline.PipelineOptions(checkpoint_root="")
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    assert not any("env" in e["container"] for e in spec["deploymentSpec"]["executors"].values())
    assert not any("fieldPathAsEnv" in e for e in k8s.values())


def test_checkpoint_root_must_be_an_s3_prefix():
    with pytest.raises(ValueError, match="s3://bucket"):
        pipeline.PipelineOptions(checkpoint_root="/mnt/checkpoints")


def test_recommendations_are_made_only_for_a_model_that_passed_the_gate():
    spec, k8s = load_compiled(pipeline.COMPILED)
    components = spec["components"]
    parent = next(
        (name, task)
        for name, comp in components.items()
        for task in comp.get("dag", {}).get("tasks", {}).values()
        if task.get("componentRef", {}).get("name") == "comp-condition-2"
    )
    # The recommend task sits under a condition on publish's verdict, itself under publish-configured.
    assert parent[0] == "comp-condition-1" and "publish" in components["comp-condition-1"]["dag"]["tasks"]
    assert (
        parent[1]["triggerPolicy"]["condition"]
        == "inputs.parameter_values['pipelinechannel--publish-passed'] == true"
    )
    task = components["comp-condition-2"]["dag"]["tasks"]["recommend"]
    assert not task["cachingOptions"].get("enableCache")  # a re-run must really write and upload
    params = task["inputs"]["parameters"]
    assert "PIPELINE_JOB_ID" in str(params["run_id"]) or "pipeline_job_uuid" in str(params["run_id"])
    assert params["top_n"] == {"componentInputParameter": "pipelinechannel--recommend_top_n"}
    executor = spec["deploymentSpec"]["executors"]["exec-recommend"]
    assert executor["container"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert any(s["keyToEnv"] for s in k8s["exec-recommend"]["secretAsEnv"])


# --------------------------------------------------------------------------- scale-out (delrec.launch)

TRAINING_EXECUTORS = ("exec-distill", "exec-finetune", "exec-finetune-2")


def container_env(spec: dict, executor: str) -> dict[str, str]:
    return {
        e["name"]: e["value"]
        for e in spec["deploymentSpec"]["executors"][executor]["container"].get("env", [])
    }


def test_several_gpus_in_a_pod_run_the_training_stages_as_torchrun_ranks(tmp_path):
    options = pipeline.pipeline_arguments("ml-100k", None, ["gpus=2"])[0]
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    assert gpu_counts(spec) == {name: "2" for name in GPU_EXECUTORS}
    for name in TRAINING_EXECUTORS:
        env = container_env(spec, name)
        assert env["DELREC_NPROC_PER_NODE"] == "2" and env["NCCL_DEBUG"] == "WARN", name
        assert "DELREC_TRAINER" not in env
        assert k8s[name]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"  # NCCL's shared-memory transport
    # evaluate and recommend score with one rank, on the GPUs they get.
    for name in ("exec-evaluate", "exec-recommend"):
        assert "DELREC_NPROC_PER_NODE" not in container_env(spec, name)
    # One GPU (the committed YAML): no torchrun, the library runs in the component's process.
    spec, _ = load_compiled(pipeline.COMPILED)
    assert not any("DELREC_NPROC_PER_NODE" in container_env(spec, name) for name in TRAINING_EXECUTORS)


def test_trainer_trainjob_turns_the_training_tasks_into_cpu_launchers_of_trainjobs(tmp_path):
    from test_trainjob import TRAINJOB_SCHEMA

    from delrec import trainjob

    overrides = ["trainer=trainjob", "nodes=2", "gpus=4", "queue=team-a"]
    options = pipeline.pipeline_arguments("ml-100k", None, overrides)[0]
    spec, k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "tj.yaml", options))
    unqueued = pipeline.pipeline_arguments("ml-100k", None, overrides[:-1])[0]
    unqueued_k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "unqueued.yaml", unqueued))[1]
    pod_options = pipeline.pipeline_arguments("ml-100k", None, ["gpus=4"])[0]
    pod_spec, pod_k8s = load_compiled(pipeline.compile_pipeline(tmp_path / "pod.yaml", pod_options))
    executors = spec["deploymentSpec"]["executors"]
    # The launchers: no GPU, no GPU node, no shm or model cache; the GPU image (the TrainJob runs it).
    assert set(gpu_counts(spec)) == {"exec-evaluate", "exec-recommend"}
    for name in TRAINING_EXECUTORS:
        container = executors[name]["container"]
        assert "accelerator" not in container["resources"], name
        assert container["resources"]["resourceCpuRequest"] == "250m", name
        assert container["image"] == "{{$.inputs.parameters['pipelinechannel--gpu_image']}}"
        assert not {"tolerations", "nodeSelector", "emptyDirMounts", "pvcMount"} & set(k8s[name]), name
        # Queued by Kueue, it may wait for admission as long as the queue takes (its clock starts there).
        assert "activeDeadlineSeconds" not in k8s[name], name
        # Without a queue it outlives the TrainJob's own deadline, to delete the job it gave up on.
        assert (
            int(unqueued_k8s[name]["activeDeadlineSeconds"])
            == options.gpu_timeout_s + pipeline.LAUNCHER_GRACE_S
        )
        env = container_env(spec, name)
        assert env["DELREC_TRAINER"] == "trainjob" and env["NCCL_DEBUG"] == "WARN"
        settings = trainjob.TrainJobSettings.model_validate_json(env["DELREC_TRAINJOB"])
        assert (settings.nodes, settings.gpus_per_node, settings.runtime, settings.queue) == (
            2, 4, "torch-distributed", "team-a"
        )  # fmt: skip
        assert (
            settings.timeout_s == options.gpu_timeout_s and settings.cpu == options.resources["distill"].cpu
        )
        # The run id and task name the TrainJob's name is made of, the object-store credentials and the
        # gated-model token, which the launcher forwards as references.
        assert k8s[name]["fieldPathAsEnv"] == [
            {"fieldPath": "metadata.labels['pipeline/runid']", "name": "DELREC_RUN_ID"}
        ]
        secrets = {e["envVar"] for s in k8s[name]["secretAsEnv"] for e in s["keyToEnv"]}
        assert secrets == {"HF_TOKEN", "DELREC_S3_ACCESS_KEY", "DELREC_S3_SECRET_KEY"}, name
        # What it submits is a valid TrainJob carrying the GPUs.
        job = trainjob.build_trainjob(
            name=trainjob.trainjob_name("run", env["DELREC_TASK"]), namespace="kubeflow", image="i",
            arguments=["distill"], settings=settings,
        )  # fmt: skip
        TRAINJOB_SCHEMA.validate(job)
        assert job["spec"]["trainer"]["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "4"}
        assert job["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    assert [container_env(spec, n)["DELREC_TASK"] for n in TRAINING_EXECUTORS] == [
        "distill", "finetune", "finetune-ablation"
    ]  # fmt: skip
    # The graph and every other task are those of a pod run.
    tasks, pod_tasks = spec["root"]["dag"]["tasks"], pod_spec["root"]["dag"]["tasks"]
    assert {n: t["componentRef"] for n, t in tasks.items()} == {
        n: t["componentRef"] for n, t in pod_tasks.items()
    }
    for name in set(executors) - set(TRAINING_EXECUTORS):
        assert executors[name] == pod_spec["deploymentSpec"]["executors"][name], name
        assert k8s[name] == pod_k8s[name], name


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["nodes=2"], "nodes"),
        (["queue=team-a"], "queue"),
        (["gpus_per_node=2"], "gpus_per_node"),
        (["trainer=slurm"], "trainer"),
        (["trainer=trainjob", "nodes=0"], "nodes"),
        (["trainer=trainjob", "pipeline.trainjob_outputs=/tmp/out"], "trainjob_outputs"),
        (["trainer=trainjob", "queue=Team_A"], "queue"),
        (["trainer=trainjob", "runtime=torch distributed"], "runtime"),
    ],
)
def test_bad_scale_out_options_name_the_field(overrides, field):
    with pytest.raises(DelrecError, match=f"{field}:"):
        pipeline.pipeline_arguments("demo", None, overrides)


def test_a_cpu_trainjob_runs_one_gloo_rank_per_node(tmp_path):
    """The kind smoke run (docs/cluster.md): gpus 0, two nodes of one CPU process."""
    from delrec import trainjob

    options = pipeline.pipeline_arguments("kind", None, ["trainer=trainjob", "nodes=2"])[0]
    spec, _ = load_compiled(pipeline.compile_pipeline(tmp_path / "p.yaml", options))
    settings = trainjob.TrainJobSettings.model_validate_json(
        container_env(spec, "exec-distill")["DELREC_TRAINJOB"]
    )
    assert (settings.nodes, settings.gpus_per_node, settings.procs_per_node) == (2, 0, 1)
    assert settings.model_cache_pvc == ""  # kind's claim is ReadWriteOnce: two nodes cannot share it
    assert "NCCL_DEBUG" not in container_env(spec, "exec-distill")
