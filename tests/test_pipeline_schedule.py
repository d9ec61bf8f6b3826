"""``pipeline.py schedule``: idempotent against an in-memory KFP server (a fake kfp.Client whose
methods take the real Client's arguments; no network)."""

from __future__ import annotations

import inspect
import json
import sys
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import kfp
import kfp_server_api as api
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pipeline  # noqa: E402
from delrec import images  # noqa: E402

HOST = ["--host", "http://kfp:8080"]
CLIENT = kfp.Client  # the real class, whose signatures the fake checks (the tests patch kfp.Client)


class FakeKfp:
    """One KFP server: experiments, pipelines, versions and recurring runs in memory. Every call is
    checked against kfp.Client's own signature and recorded in ``calls`` as (method, arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.ids = count(1)
        self.experiments: dict[str, str] = {}
        self.pipelines: dict[str, str] = {}
        self.versions: dict[str, api.V2beta1PipelineVersion] = {}
        self.runs: dict[str, api.V2beta1RecurringRun] = {}
        self.fail_create = False
        self.pipeline_services = SimpleNamespace(pipeline_service_create_pipeline=self._create_pipeline)

    def _record(self, method: str, *args, **kwargs) -> dict:
        bound = inspect.signature(getattr(CLIENT, method)).bind(None, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        self.calls.append((method, arguments))
        return arguments

    def called(self, method: str) -> list[dict]:
        return [arguments for name, arguments in self.calls if name == method]

    @staticmethod
    def _name(filter: str | None) -> str | None:
        return json.loads(filter)["predicates"][0]["stringValue"] if filter else None

    def _create_pipeline(self, pipeline: api.V2beta1Pipeline) -> api.V2beta1Pipeline:
        self.calls.append(("create_pipeline", {"display_name": pipeline.display_name}))
        self.pipelines[pipeline.display_name] = f"p-{next(self.ids)}"
        return api.V2beta1Pipeline(pipeline_id=self.pipelines[pipeline.display_name])

    def create_experiment(self, *args, **kwargs) -> api.V2beta1Experiment:
        name = self._record("create_experiment", *args, **kwargs)["name"]
        self.experiments.setdefault(name, f"e-{next(self.ids)}")
        return api.V2beta1Experiment(experiment_id=self.experiments[name], display_name=name)

    def get_experiment(self, *args, **kwargs) -> api.V2beta1Experiment:
        name = self._record("get_experiment", *args, **kwargs)["experiment_name"]
        if name not in self.experiments:
            raise ValueError(f"No experiment is found with name {name}.")
        return api.V2beta1Experiment(experiment_id=self.experiments[name], display_name=name)

    def get_pipeline_id(self, *args, **kwargs) -> str | None:
        return self.pipelines.get(self._record("get_pipeline_id", *args, **kwargs)["name"])

    def list_pipeline_versions(self, *args, **kwargs) -> api.V2beta1ListPipelineVersionsResponse:
        a = self._record("list_pipeline_versions", *args, **kwargs)
        name = self._name(a["filter"])
        found = [
            v
            for v in self.versions.values()
            if v.pipeline_id == a["pipeline_id"] and name in (None, v.display_name)
        ]
        return api.V2beta1ListPipelineVersionsResponse(pipeline_versions=found or None)

    def upload_pipeline_version(self, *args, **kwargs) -> api.V2beta1PipelineVersion:
        a = self._record("upload_pipeline_version", *args, **kwargs)
        assert Path(a["pipeline_package_path"]).read_text().startswith("# PIPELINE DEFINITION")
        version = api.V2beta1PipelineVersion(
            pipeline_id=a["pipeline_id"],
            pipeline_version_id=f"v-{next(self.ids)}",
            display_name=a["pipeline_version_name"],
        )
        self.versions[version.pipeline_version_id] = version
        return version

    def get_pipeline_version(self, *args, **kwargs) -> api.V2beta1PipelineVersion:
        version_id = self._record("get_pipeline_version", *args, **kwargs)["pipeline_version_id"]
        if version_id not in self.versions:
            raise api.ApiException(status=404, reason="Not Found")
        return self.versions[version_id]

    def list_recurring_runs(self, *args, **kwargs) -> api.V2beta1ListRecurringRunsResponse:
        a = self._record("list_recurring_runs", *args, **kwargs)
        name = self._name(a["filter"])
        found = [
            r
            for r in self.runs.values()
            if r.experiment_id == a["experiment_id"] and name in (None, r.display_name)
        ]
        # Pages of page_size, the token being the next index.
        start = int(a["page_token"] or 0)
        end = start + a["page_size"]
        return api.V2beta1ListRecurringRunsResponse(
            recurring_runs=found[start:end] or None, next_page_token=str(end) if end < len(found) else ""
        )

    def create_recurring_run(self, *args, **kwargs) -> api.V2beta1RecurringRun:
        a = self._record("create_recurring_run", *args, **kwargs)
        if self.fail_create:
            raise api.ApiException(status=500, reason="create failed")
        run = api.V2beta1RecurringRun(
            recurring_run_id=f"r-{next(self.ids)}",
            display_name=a["job_name"],
            experiment_id=a["experiment_id"],
            mode="ENABLE" if a["enabled"] else "DISABLE",
            trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=a["cron_expression"])),
            pipeline_version_reference=api.V2beta1PipelineVersionReference(
                pipeline_id=a["pipeline_id"], pipeline_version_id=a["version_id"]
            ),
            runtime_config=api.V2beta1RuntimeConfig(parameters=a["params"], pipeline_root=a["pipeline_root"]),
        )
        self.runs[run.recurring_run_id] = run
        return run

    def disable_recurring_run(self, *args, **kwargs) -> dict:
        self.runs[self._record("disable_recurring_run", *args, **kwargs)["recurring_run_id"]].mode = "DISABLE"
        return {}

    def enable_recurring_run(self, *args, **kwargs) -> dict:
        self.runs[self._record("enable_recurring_run", *args, **kwargs)["recurring_run_id"]].mode = "ENABLE"
        return {}

    def delete_recurring_run(self, *args, **kwargs) -> dict:
        del self.runs[self._record("delete_recurring_run", *args, **kwargs)["recurring_run_id"]]
        return {}


@pytest.fixture
def server():
    fake = FakeKfp()
    with mock.patch("kfp.Client", lambda host: fake):
        yield fake


def schedule(*extra: str, job: str = "delrec-retrain", cron: str = "0 0 3 * * *") -> int:
    return pipeline.main(["schedule", *HOST, "--cron", cron, "--job-name", job, "--preset", "demo", *extra])


def test_scheduling_the_same_code_twice_makes_one_version_and_leaves_one_recurring_run(server, capsys):
    assert schedule("teacher.seed=3") == 0
    (first,) = server.runs
    assert schedule("teacher.seed=3") == 0
    out = capsys.readouterr().out
    assert "(uploaded)" in out and "(already there)" in out
    assert len(server.called("create_pipeline")) == 1 and list(server.pipelines) == ["delrec"]
    (version,) = server.versions.values()
    assert version.display_name.startswith(images.source_tag() + "-")
    assert len(server.called("upload_pipeline_version")) == 1
    (run,) = server.runs.values()
    assert run.recurring_run_id != first and run.mode == "ENABLE"
    assert run.pipeline_version_reference.pipeline_version_id == version.pipeline_version_id
    (created, _) = server.called("create_recurring_run")
    assert created["experiment_id"] == server.experiments["delrec"]
    assert created["cron_expression"] == "0 0 3 * * *"
    assert created["params"]["teacher_config"]["seed"] == 3
    assert created["max_concurrency"] == 1 and created["no_catchup"] is True
    # The replaced run is disabled before its successor is created: never two enabled at once.
    order = [
        name for name, _ in server.calls if name.endswith("_recurring_run") and name != "list_recurring_runs"
    ]
    assert order == [
        "create_recurring_run",
        "disable_recurring_run",
        "create_recurring_run",
        "delete_recurring_run",
    ]


def test_new_code_adds_a_version_and_moves_the_recurring_run_to_it(server, monkeypatch):
    assert schedule() == 0
    (old,) = server.versions
    # New code: the image tag (in the compiled spec and in the version's name) changes.
    monkeypatch.setattr(images, "source_tag", lambda root=None: "0.1.0-feedfacecafe")
    assert schedule() == 0
    assert len(server.versions) == 2 and len(server.pipelines) == 1
    (new,) = set(server.versions) - {old}
    assert server.versions[new].display_name.startswith("0.1.0-feedfacecafe-")
    (run,) = server.runs.values()
    assert run.pipeline_version_reference.pipeline_version_id == new


def test_a_failed_create_keeps_the_old_schedule_running(server, capsys):
    assert schedule() == 0
    (old,) = server.runs
    server.fail_create = True
    assert schedule() == 2  # the server's refusal is an error message, not a traceback
    assert f"error: the KFP server at {HOST[1]}" in capsys.readouterr().err
    assert list(server.runs) == [old] and server.runs[old].mode == "ENABLE"


def test_an_unreachable_server_is_an_error_message(capsys):
    assert pipeline.main(["schedule", "list", "--host", "http://127.0.0.1:9"]) == 2
    assert "error: the KFP server at http://127.0.0.1:9" in capsys.readouterr().err


def test_schedule_list_prints_each_recurring_run_with_its_version(server, capsys):
    assert schedule(job="nightly") == 0
    assert schedule(job="weekly", cron="0 0 4 * * 0") == 0
    (version,) = server.versions.values()
    capsys.readouterr()
    assert pipeline.main(["schedule", "list", *HOST]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:4] == ["name", "mode", "cron", "version"]
    assert len(lines) == 2
    nightly = next(line for line in lines if line.startswith("nightly"))
    assert "ENABLE" in nightly and version.display_name in nightly
    assert any(line.startswith("weekly") and "0 0 4 * * 0" in line for line in lines)
    # A version deleted on the server since: the run is still listed, by the version's id.
    del server.versions[version.pipeline_version_id]
    assert pipeline.main(["schedule", "list", *HOST]) == 0
    assert version.pipeline_version_id in capsys.readouterr().out


def test_schedule_delete_removes_the_named_run_only(server, capsys):
    assert schedule(job="nightly") == 0
    assert schedule(job="weekly") == 0
    assert pipeline.main(["schedule", "delete", "nightly", *HOST]) == 0
    assert [run.display_name for run in server.runs.values()] == ["weekly"]
    assert "deleted recurring run nightly" in capsys.readouterr().out


def test_schedule_delete_of_an_unknown_name_fails_and_names_it(server, capsys):
    assert schedule(job="nightly") == 0
    assert pipeline.main(["schedule", "delete", "nighlty", *HOST]) == 2
    err = capsys.readouterr().err
    assert "no recurring run named 'nighlty'" in err and "'delrec'" in err
    assert len(server.runs) == 1 and not server.called("delete_recurring_run")
