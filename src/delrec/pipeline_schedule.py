"""Recurring runs on a KFP server, made idempotent.

``schedule`` compiles the pipeline, finds the pipeline by name on the server (else creates it, with no
version), and finds the version named for the compiled spec (else uploads it): ``<image source tag>-<12
hex of the spec>``, so the same code and settings never make two versions. The recurring run is then
replaced by name within the experiment. KFP 2.17 has no update for recurring runs, so a replace is:
disable the old one(s), create the new one, delete the old; never two enabled schedules of one name
(a duplicate run holds GPUs for hours), and when the create fails the old schedule is enabled again and
keeps running. Even an unchanged schedule is replaced (the run config holds the parameters too, and a
new id costs nothing), which still leaves exactly one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from delrec import images
from delrec.errors import DelrecError

ENABLED = "ENABLE"
"""kfp_server_api.RecurringRunMode.ENABLE"""


def _named(name: str) -> str:
    """A KFP list filter: display name equals ``name``."""
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def version_name(package: Path) -> str:
    """The pipeline version of a compiled spec: the image source tag (which code) and the spec's hash
    (which code and settings, exactly)."""
    return f"{images.source_tag()}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def ensure_version(client: Any, package: Path, pipeline_name: str) -> tuple[str, str, str, bool]:
    """The pipeline and the version of ``package`` on the server, each found by name or created:
    ``(pipeline_id, version_id, version_name, created)``."""
    from kfp_server_api import V2beta1Pipeline

    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        # Not upload_pipeline: it would also create a version named like the pipeline, a duplicate of
        # the tagged version made next.
        pipeline_id = client.pipeline_services.pipeline_service_create_pipeline(
            pipeline=V2beta1Pipeline(name=pipeline_name, display_name=pipeline_name)
        ).pipeline_id
    version = version_name(package)
    found = client.list_pipeline_versions(pipeline_id, filter=_named(version)).pipeline_versions
    if found:
        return pipeline_id, found[0].pipeline_version_id, version, False
    created = client.upload_pipeline_version(str(package), version, pipeline_id=pipeline_id)
    return pipeline_id, created.pipeline_version_id, version, True


def recurring_runs(client: Any, experiment_id: str, name: str | None = None) -> list[Any]:
    """The experiment's recurring runs (all pages), only those named ``name`` if given."""
    runs: list[Any] = []
    token = ""
    while True:
        page = client.list_recurring_runs(
            page_token=token,
            page_size=100,
            experiment_id=experiment_id,
            filter=_named(name) if name is not None else None,
        )
        runs += page.recurring_runs or []
        token = page.next_page_token
        if not token:
            return runs


def replace_recurring_run(client: Any, experiment_id: str, name: str, **create: Any) -> Any:
    """Create the recurring run ``name`` (``create``: create_recurring_run's other arguments) in place
    of any of that name: the enabled old ones are disabled first, and all deleted after (those enabled
    again if the create fails). Returns the new one."""
    old = recurring_runs(client, experiment_id, name)
    enabled = [run.recurring_run_id for run in old if run.mode == ENABLED]
    for run_id in enabled:
        client.disable_recurring_run(run_id)
    try:
        new = client.create_recurring_run(experiment_id=experiment_id, job_name=name, **create)
    except Exception:
        for run_id in enabled:
            client.enable_recurring_run(run_id)
        raise
    for run in old:
        client.delete_recurring_run(run.recurring_run_id)
    return new


def experiment_id(client: Any, experiment: str) -> str:
    """The id of an existing experiment (list and delete never create one)."""
    try:
        return client.get_experiment(experiment_name=experiment).experiment_id
    except ValueError as exc:
        raise DelrecError(f"experiment {experiment!r}: {exc}") from None


def delete_recurring_runs(client: Any, experiment: str, name: str) -> list[str]:
    """Delete the experiment's recurring runs named ``name``; their ids. None of that name: an error."""
    runs = recurring_runs(client, experiment_id(client, experiment), name)
    if not runs:
        raise DelrecError(f"no recurring run named {name!r} in experiment {experiment!r}")
    for run in runs:
        client.delete_recurring_run(run.recurring_run_id)
    return [run.recurring_run_id for run in runs]


def format_recurring_runs(client: Any, runs: list[Any]) -> str:
    """One line per recurring run: name, mode, cron, pipeline version (by name where it resolves), id."""
    from kfp_server_api import ApiException

    names: dict[str, str] = {}
    lines = [f"{'name':<24} {'mode':<8} {'cron':<16} {'version':<32} id"]
    for run in runs:
        ref = run.pipeline_version_reference
        version = ref.pipeline_version_id if ref is not None else "(inline spec)"
        if ref is not None and version not in names:
            try:
                names[version] = client.get_pipeline_version(ref.pipeline_id, version).display_name
            except ApiException:  # the version was deleted since: its id is all there is
                names[version] = version
        cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else "-"
        lines.append(
            f"{run.display_name:<24} {run.mode:<8} {cron:<16} {names.get(version, version):<32} "
            f"{run.recurring_run_id}"
        )
    return "\n".join(lines)
