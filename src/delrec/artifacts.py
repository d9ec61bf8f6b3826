"""Artifact folders: atomic writes and the manifest every stage output carries.

Each stage writes its output folder under a temporary name next to the destination and renames it
into place only when everything is written, so a failed or killed stage never leaves a partial
artifact. Every folder holds ``manifest.json`` (schema version, producer stage, config hash, the
manifests of its inputs, row counts) so a later stage refuses a wrong or stale input with a clear
message instead of training on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from delrec import __version__
from delrec.errors import DelrecError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def config_hash(config: Mapping[str, Any]) -> str:
    """A short, stable hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    On any exception the temporary folder is removed and ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not overwrite:
        raise DelrecError("already exists (pass overwrite to replace it)", path=out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Swap via a second rename so ``out`` is never missing for long nor half-written.
            old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_manifest(
    folder: str | os.PathLike,
    *,
    producer: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    rows: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` into ``folder``; ``inputs`` maps a role to an input artifact folder."""
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "producer": producer,
        "delrec_version": __version__,
        "config": dict(config),
        "config_hash": config_hash(config),
        "inputs": {role: read_manifest(path)["id"] for role, path in (inputs or {}).items()},
        "rows": dict(rows or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    # The id identifies this exact output: producer, config and the ids of its inputs.
    manifest["id"] = config_hash(
        {k: manifest[k] for k in ("producer", "config_hash", "inputs", "rows", "created")}
    )
    write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | os.PathLike, *, producer: str | None = None) -> dict[str, Any]:
    """Read and check an artifact's manifest; raise a clear error if it is missing or of the wrong kind."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DelrecError(
            f"no {MANIFEST}: not a delrec artifact folder (expected the output of a delrec stage)",
            path=folder,
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DelrecError(f"unreadable JSON ({exc})", path=path) from exc
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DelrecError(
            f"schema version {version!r}, this delrec reads version {SCHEMA_VERSION}",
            path=path,
            field="schema_version",
        )
    if producer is not None and manifest.get("producer") != producer:
        raise DelrecError(
            f"produced by {manifest.get('producer')!r}, expected the output of {producer!r}",
            path=path,
            field="producer",
        )
    return manifest


def require_same_input(
    folder: str | os.PathLike, role: str, expected: str | os.PathLike, *, producer: str | None = None
) -> dict[str, Any]:
    """Check that artifact ``folder`` was built from the artifact at ``expected`` (its ``role`` input).

    This is how, say, the distill stage refuses a teacher trained on another dataset.
    """
    manifest = read_manifest(folder, producer=producer)
    expected_id = read_manifest(expected)["id"]
    got = manifest["inputs"].get(role)
    if got != expected_id:
        raise DelrecError(
            f"was built from {role} {got!r}, but the {role} given is {expected_id!r} ({expected}); "
            "re-run the stage on the matching input",
            path=Path(folder) / MANIFEST,
            field=f"inputs.{role}",
        )
    return manifest


# Resumable stages keep their training state in ``<out>.partial/state.pt``, next to (not inside) the
# atomically written output; it survives a killed run and is removed once the output is in place.
CHECKPOINT = "state.pt"


def partial_dir(out: str | os.PathLike) -> Path:
    """The checkpoint folder of the stage writing ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def save_checkpoint(partial: Path, state: dict[str, Any]) -> None:
    """Write a training state atomically; ``state["run_key"]`` identifies the run it belongs to."""
    import torch

    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, partial / CHECKPOINT)


def load_checkpoint(
    partial: Path, run_key: Mapping[str, str], *, map_location: Any = "cpu", weights_only: bool = True
) -> dict[str, Any] | None:
    """The saved state if it belongs to this exact run (same ``run_key``: config and inputs), else None.

    An unreadable checkpoint or one of another run is ignored with a warning: the run starts afresh.
    """
    import torch

    path = partial / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # a corrupt checkpoint is not worth failing the run for
        log.warning("ignoring unreadable checkpoint %s (%s); starting afresh", path, exc)
        return None
    if state.get("run_key") != dict(run_key):
        log.warning("ignoring checkpoint %s: it belongs to another run (config or inputs differ)", path)
        return None
    log.info("resuming from %s", path)
    return state
