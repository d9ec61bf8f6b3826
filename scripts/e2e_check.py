"""The checks of scripts/e2e-kind.sh that need kfp or the object store.

    e2e_check.py wait --host URL --run-id ID [--timeout S]   exit 0 if the run succeeded; else name the
                                                             failed tasks and exit 1
    e2e_check.py bundle --registry s3://bucket/prefix --run-id ID
                                                             exit 0 if the run's published bundle is
                                                             complete and holds the gate's metrics

The object store comes from DELREC_S3_ENDPOINT and the DELREC_S3_* credentials, as everywhere in delrec.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

BUNDLE_PARTS = ("model", "soft_prompt", "evaluation")


def wait(host: str, run_id: str, timeout: int, client: Any = None) -> int:
    """Wait for the run to finish; 0 if it succeeded, else 1 with its state and failed tasks on stderr."""
    if client is None:
        import kfp

        client = kfp.Client(host=host)
    run = client.wait_for_run_completion(run_id, timeout=timeout)
    state = str(run.state)
    print(f"run {run_id}: {state}")
    if state == "SUCCEEDED":
        return 0
    tasks = (run.run_details.task_details if run.run_details else None) or []
    failed = [t.display_name for t in tasks if str(t.state) == "FAILED"]
    print(
        f"e2e: run {run_id} ended {state}; failed tasks: {', '.join(failed) or 'none named'}", file=sys.stderr
    )
    return 1


def check_bundle(registry: str, run_id: str, store: Any = None) -> int:
    """0 if ``<registry>/delrec/<run_id>/bundle.json`` exists, every file it lists is there, and its
    metrics hold finite values for the gate's candidate and baseline; else 1 saying what is missing."""
    from delrec.store import BUNDLE_INDEX, S3Store, join_uri

    store = store or S3Store.from_env()
    run_uri = join_uri(registry, "delrec", run_id)
    if not store.exists(join_uri(run_uri, BUNDLE_INDEX)):
        print(f"e2e: no {BUNDLE_INDEX} under {run_uri}", file=sys.stderr)
        return 1
    index = store.get_json(join_uri(run_uri, BUNDLE_INDEX))
    present = set(store.list(run_uri))
    problems = [f"no {part} files" for part in BUNDLE_PARTS if not index["files"].get(part)]
    problems += [
        f"{part}/{name} listed but absent"
        for part, files in index["files"].items()
        for name in files
        if f"{part}/{name}" not in present
    ]
    metrics, gate = index.get("metrics", {}), index.get("gate", {})
    for key in (gate.get("candidate"), gate.get("baseline")):
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"metric {key} is {value!r}")
    if problems:
        print(f"e2e: bundle {run_uri}: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"bundle {run_uri}: {len(present)} files, gate passed: {gate.get('passed')}")
    for key in sorted(metrics):
        print(f"  {key}: {metrics[key]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wait")
    p.add_argument("--host", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--timeout", type=int, default=3600)
    p = sub.add_parser("bundle")
    p.add_argument("--registry", required=True)
    p.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    if args.command == "wait":
        return wait(args.host, args.run_id, args.timeout)
    return check_bundle(args.registry, args.run_id)


if __name__ == "__main__":
    sys.exit(main())
