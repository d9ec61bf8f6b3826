"""The object store's address and TLS come from one ConfigMap: pipeline.py sets its keys as the environment
of every task, the manifests create it with exactly those keys, and delrec.store reads those names."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402
from delrec.store import S3Settings  # noqa: E402


def compiled(tmp_path: Path, options: pipeline.PipelineOptions | None = None) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(pipeline.compile_pipeline(tmp_path / "p.yaml", options).read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def config_map_env(executor: dict) -> dict[str, dict[str, str]]:
    return {
        c["configMapName"]: {k["configMapKey"]: k["envVar"] for k in c["keyToEnv"]}
        for c in executor.get("configMapAsEnv", [])
    }


def test_every_task_reads_the_object_store_settings_from_the_config_map(tmp_path):
    spec, executors = compiled(tmp_path)
    assert set(executors) == set(spec["deploymentSpec"]["executors"])  # none without platform settings
    want = {name: name for name in ("DELREC_S3_ENDPOINT", "DELREC_S3_SECURE", "DELREC_S3_REGION")}
    for name, executor in executors.items():
        assert config_map_env(executor) == {"delrec-object-store": want}, name
    # The tasks that hold the credentials (they talk to S3) among them.
    talking = {n for n, e in executors.items() if e.get("secretAsEnv")}
    assert {"exec-preprocess", "exec-publish"} <= talking


def test_the_endpoint_is_no_run_parameter_or_component_input(tmp_path):
    spec, _ = compiled(tmp_path)
    assert not {"s3_endpoint", "s3_secure"} & set(spec["root"]["inputDefinitions"]["parameters"])
    for component in spec["components"].values():
        inputs = component.get("inputDefinitions", {}).get("parameters", {})
        assert not {"s3_endpoint", "s3_secure"} & set(inputs)


def test_config_map_name_is_an_option_and_empty_drops_it(tmp_path):
    _, executors = compiled(tmp_path, pipeline.PipelineOptions(s3_config_map="team-s3"))
    assert all(set(config_map_env(e)) == {"team-s3"} for e in executors.values())
    _, executors = compiled(tmp_path, pipeline.PipelineOptions(s3_config_map=""))
    assert not any("configMapAsEnv" in e for e in executors.values())


def test_store_reads_the_names_the_config_map_sets(monkeypatch):
    values = {"DELREC_S3_ENDPOINT": "seaweedfs.kubeflow:9000", "DELREC_S3_SECURE": "false"}
    values["DELREC_S3_REGION"] = "eu-west-1"
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    assert set(values) == set(pipeline.S3_SETTINGS_ENV)
    settings = S3Settings.from_env()
    assert (settings.endpoint, settings.secure, settings.region) == (
        "seaweedfs.kubeflow:9000",
        False,
        "eu-west-1",
    )
