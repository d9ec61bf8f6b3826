"""The commands of ``pipeline.py``: compile, run (kfp.local, here), submit and schedule (a KFP server).

pipeline.py keeps the graph and its options and hands them over as a :class:`Graph`; nothing here
imports it, so the commands are tested against any graph, and the options class stays where the graph
that reads it is defined.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delrec import checkpoints, layout
from delrec.errors import DelrecError
from delrec.pipeline_cache import CACHE_DIR, VerifiedCache, code_fingerprint
from delrec.pipeline_report import (
    LastError,
    TaskClock,
    failure_line,
    format_evaluation,
    format_stage_table,
    stage_rows,
)
from delrec.pipeline_schedule import (
    delete_recurring_runs,
    ensure_version,
    experiment_id,
    format_recurring_runs,
    recurring_runs,
    replace_recurring_run,
)

SCHEDULE_ACTIONS = ("create", "list", "delete")
CHECKPOINTS_DIR = ".checkpoints"
"""the training tasks' checkpoints of ``pipeline.py run``, under the local pipeline root"""
LOCAL_RUN_ID = "local"


def local_run_id(checkpoint_root: Path, code: str) -> str:
    """The run id under which ``pipeline.py run``'s training tasks checkpoint: ``local-<code>``, the
    fingerprint of the library code and installed packages. A task killed under other code never resumes
    from its state: the output would mix two versions' training, and the cache would keep it under the
    new code's key. Checkpoints of other code versions are removed (only that code could resume them)."""
    run_id = f"{LOCAL_RUN_ID}-{code}"
    for other in sorted(checkpoint_root.glob(f"{LOCAL_RUN_ID}*")):
        if other.name != run_id and other.is_dir():
            print(f"removing {other}: checkpoints of other library code or packages")
            shutil.rmtree(other)
    return run_id


@dataclass(frozen=True)
class Graph:
    """What the commands need from pipeline.py."""

    name: str
    """the pipeline's name (on a KFP server too)"""
    build: Callable[[Any], Callable[..., Any]]
    """options (None: the defaults) -> the pipeline function"""
    compile: Callable[[Path, Any, Any], Path]
    """(out, options, run-parameter defaults; None: the defaults) -> the compiled YAML written"""
    arguments: Callable[..., tuple[Any, dict[str, Any]]]
    """(preset, data=None, overrides=()) -> (options, run arguments), validated"""
    compiled: Path
    """the committed compiled YAML"""
    root: Path
    """the checkout, which a relative local pipeline root is under"""
    default_preset: str
    description: str
    """the --help text"""


def cmd_run(args: argparse.Namespace, graph: Graph) -> int:
    from kfp import local
    from kfp.local import cache as kfp_cache

    options, arguments = graph.arguments(args.preset, args.data, args.params)
    # --pipeline-root is where the user is; the preset's local_root is under the checkout.
    root = (
        Path(args.pipeline_root).resolve()
        if args.pipeline_root
        else (graph.root / options.local_root).resolve()
    )
    root.mkdir(parents=True, exist_ok=True)
    # Locally a failure is a bug or bad input, not a preempted node: fail at once, no backoff. Each run
    # writes a new run folder, so the training tasks checkpoint under the root instead, as one run per
    # code version: a killed run's training stage resumes in the next (its run key decides; another
    # config restarts, and so does other code).
    options = options.model_copy(update={"retries": 0, "checkpoint_root": str(root / CHECKPOINTS_DIR)})
    (root / CHECKPOINTS_DIR).mkdir(exist_ok=True)  # before the run's new folder is looked for below
    cache_root = root / CACHE_DIR
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(root),
        raise_on_error=True,
        enable_caching=True,
        cache_root=str(cache_root),
    )
    # kfp.local builds its cache lazily from this singleton; ours checks each entry it serves. With
    # --no-cache every task runs and its entry is written anew, so a stale entry is replaced, not kept.
    code = code_fingerprint()
    cache = VerifiedCache(str(cache_root), code=code, refresh=args.no_cache)
    kfp_cache._cache_singleton, kfp_cache._cache_singleton_root = cache, str(cache_root)
    # Locally the Kubernetes settings and images mean nothing; kfp warns about each, twice per task.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner")
    warnings.filterwarnings("ignore", message=".*custom or non-Python base image")
    print(
        f"kfp.local run of preset {args.preset} under {root} (Kubernetes settings and images are not used here; "
        + (
            f"--no-cache: every task runs and refreshes {cache_root})"
            if args.no_cache
            else f"cache: {cache_root})"
        )
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
    os.environ[checkpoints.ENV_RUN_ID] = local_run_id(root / CHECKPOINTS_DIR, code)  # tasks inherit it
    try:
        result = graph.build(options)(**arguments)
    except RuntimeError as exc:  # kfp.local: a task failed (its traceback is above)
        raise DelrecError(failure_line(exc, errors.last)) from None
    finally:
        os.environ.pop(checkpoints.ENV_RUN_ID, None)
        sys.stdout = errors.stream
        root_logger.removeFilter(clock)
        root_logger.setLevel(level)
    total = time.perf_counter() - started
    # A run where every task is a cache hit may leave no folder of its own.
    run_dir = next(iter(sorted({p for p in root.iterdir() if p.is_dir()} - before)), None)
    evaluation = Path(result.outputs["evaluation"].path)
    report = json.loads((evaluation / layout.METRICS_JSON).read_text())
    print("\n" + format_evaluation(report))
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


def cmd_compile(args: argparse.Namespace, graph: Graph) -> int:
    if not args.out.endswith((".yaml", ".yml")):  # what KFP's compiler writes
        raise DelrecError(f"--out must name a .yaml file, got {args.out!r}")
    # The preset's values become the compiled run parameters' defaults.
    options, defaults = graph.arguments(args.preset) if args.preset else (None, None)
    print(graph.compile(Path(args.out), options, defaults))
    return 0


def _client(host: str):
    import kfp

    return kfp.Client(host=host)


def cmd_submit(args: argparse.Namespace, graph: Graph) -> int:
    options, arguments = graph.arguments(args.preset, args.data, args.params)
    client = _client(args.host)
    result = client.create_run_from_pipeline_func(
        graph.build(options),
        arguments=arguments,
        run_name=args.run_name,
        experiment_name=args.experiment,
        pipeline_root=args.pipeline_root,
    )
    print(f"submitted run {result.run_id}")
    return 0


def cmd_schedule(args: argparse.Namespace, graph: Graph) -> int:
    fields = args.cron.split()
    if len(fields) != 6:
        raise DelrecError(
            f"--cron {args.cron!r} has {len(fields)} fields; KFP takes 6, seconds first "
            "(e.g. '0 0 3 * * *' for 03:00 every day)"
        )
    options, arguments = graph.arguments(args.preset, args.data, args.params)
    client = _client(args.host)
    experiment = client.create_experiment(args.experiment)
    with tempfile.TemporaryDirectory() as tmp:
        package = graph.compile(Path(tmp) / "pipeline.yaml", options, arguments)
        pipeline_id, version_id, version, created = ensure_version(client, package, graph.name)
    print(f"pipeline {graph.name} version {version} ({'uploaded' if created else 'already there'})")
    job = replace_recurring_run(
        client,
        experiment.experiment_id,
        args.job_name,
        cron_expression=args.cron,
        params=arguments,
        pipeline_id=pipeline_id,
        version_id=version_id,
        pipeline_root=args.pipeline_root,
        max_concurrency=1,
        no_catchup=True,
    )
    print(f"scheduled recurring run {args.job_name} {job.recurring_run_id} ({args.cron})")
    return 0


def cmd_schedule_list(args: argparse.Namespace, graph: Graph) -> int:
    client = _client(args.host)
    runs = recurring_runs(client, experiment_id(client, args.experiment))
    print(format_recurring_runs(client, runs) if runs else f"no recurring runs in {args.experiment}")
    return 0


def cmd_schedule_delete(args: argparse.Namespace, graph: Graph) -> int:
    for run_id in delete_recurring_runs(_client(args.host), args.experiment, args.name):
        print(f"deleted recurring run {args.name} {run_id}")
    return 0


def build_parser(graph: Graph) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline.py",
        description=graph.description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="write the compiled pipeline YAML (committed)")
    p.add_argument(
        "--out", default=str(graph.compiled), help=f"where to write the YAML (default {graph.compiled})"
    )
    p.add_argument(
        "--preset",
        help="bake this preset's stage configs (the run parameters' defaults) and its pipeline: section "
        f"(Kubernetes settings) into the spec (default: {graph.default_preset}'s stage configs and the default "
        "pipeline options)",
    )
    p.set_defaults(handler=cmd_compile)

    def run_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--preset",
            default=graph.default_preset,
            help=f"configs/NAME.yaml (default {graph.default_preset})",
        )
        p.add_argument(
            "--data",
            help="dataset source: a local copy (path) or s3:// URI (default: the preset's source, else the "
            "dataset's download)",
        )
        p.add_argument(
            "params",
            nargs="*",
            metavar="param=value",
            help="overrides: section.field=value, a run parameter, gpus=N, ... (see pipeline.py --help)",
        )

    def server_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", required=True, help="KFP API URL, e.g. http://localhost:8080")
        p.add_argument("--experiment", default="delrec", help="KFP experiment (default delrec)")

    p = sub.add_parser("run", help="run the whole pipeline here with kfp.local")
    run_args(p)
    p.add_argument(
        "--pipeline-root",
        help="local pipeline root, relative to the current folder (default: the preset's local_root, under "
        "the checkout)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every task and refresh its cache entry (by default an unchanged task reuses its outputs; "
        "cache: the pipeline root's "
        f"{CACHE_DIR}, e.g. local_outputs/ml-100k/{CACHE_DIR}; make clean-cache empties it)",
    )
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("submit", help="submit on a Kubeflow Pipelines server")
    server_args(p)
    p.add_argument("--pipeline-root", help="e.g. s3://mlpipeline/delrec (default: the server's)")
    run_args(p)
    p.add_argument("--run-name", help="the run's display name (default: KFP's)")
    p.set_defaults(handler=cmd_submit)

    schedule = sub.add_parser(
        "schedule",
        help="schedule on a Kubeflow Pipelines server: [create] (the default), list, delete NAME",
        description="create (the action when none is given: `schedule --host URL --cron ...`) uploads the "
        "pipeline version of this code once and replaces the recurring run of that name; list and delete "
        "act on the experiment's recurring runs.",
    )
    actions = schedule.add_subparsers(dest="action", required=True)
    p = actions.add_parser(
        "create", help="upload this code's pipeline version, then create or replace the recurring run"
    )
    server_args(p)
    p.add_argument("--pipeline-root", help="e.g. s3://mlpipeline/delrec (default: the server's)")
    run_args(p)
    p.add_argument("--cron", required=True, help="6 fields, seconds first")
    p.add_argument(
        "--job-name",
        default="delrec-retrain",
        help="the recurring run's name, replaced if it exists (default delrec-retrain)",
    )
    p.set_defaults(handler=cmd_schedule)
    p = actions.add_parser("list", help="the experiment's recurring runs")
    server_args(p)
    p.set_defaults(handler=cmd_schedule_list)
    p = actions.add_parser("delete", help="delete the recurring run(s) of this name")
    server_args(p)
    p.add_argument("name", help="the recurring run's name (--job-name of schedule)")
    p.set_defaults(handler=cmd_schedule_delete)
    return parser


def main(graph: Graph, argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `schedule --host ... --cron ...` (no action) stays what it always was: create.
    if argv[:1] == ["schedule"] and (len(argv) == 1 or argv[1] not in (*SCHEDULE_ACTIONS, "-h", "--help")):
        argv.insert(1, "create")
    args = build_parser(graph).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args, graph)
    except DelrecError as exc:
        print(f"pipeline.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = (
            "; finished tasks are cached and a killed one resumes: run it again"
            if args.command == "run"
            else ""
        )
        print(f"pipeline.py {args.command}: interrupted{again}", file=sys.stderr)
        return 130
    except Exception as exc:
        if not getattr(args, "host", None) or not isinstance(exc, _server_errors()):
            raise
        reason = getattr(exc, "reason", None) or exc
        print(f"pipeline.py {args.command}: error: the KFP server at {args.host}: {reason}", file=sys.stderr)
        return 2


def _server_errors() -> tuple[type[BaseException], ...]:
    """What a KFP client raises for an unreachable, wrong or refusing server (not a bug of ours)."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    return (urllib3.exceptions.HTTPError, ApiException, ConnectionError)
