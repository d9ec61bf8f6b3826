"""Artifact folders: atomic writes and the manifest every stage output carries.

Each stage writes its output folder under a temporary name next to the destination and renames it
into place only when everything is written, so a failed or killed stage never leaves a partial
artifact; temporary folders of killed runs are swept on the next run. An existing folder is replaced
only if it is a delrec output (it holds our manifest and only the files that manifest lists). Every
folder holds ``manifest.json`` (schema version, producer stage, config hash, the ids of its inputs, row
counts, the sha256 and size of each file) so a later stage refuses a wrong, stale or corrupted input
with a clear message naming the file instead of training on it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from delrec import __version__, layout
from delrec.errors import DelrecError

log = logging.getLogger(__name__)

SCHEMA_VERSION = layout.SCHEMA_VERSION
MANIFEST = layout.MANIFEST


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


# --------------------------------------------------------------------------- output folders

# Outputs the user allowed to replace although they are not ours (``--force``); see allow_replace.
_FORCED: set[Path] = set()
# Temporary folders this process is writing right now: never swept as stale.
_ACTIVE: set[Path] = set()
# A temporary folder of another host (say a killed pod on a shared volume) is stale after this long;
# one of this host is stale as soon as its process is gone.
STALE_AFTER_S = 3600.0


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once, at import: the umask can only be read by setting it, which other threads would see meanwhile.
_UMASK = _read_umask()


def temp_dir(prefix: str, parent: str | os.PathLike) -> Path:
    """A new temporary folder in ``parent``, with the permissions ``mkdir`` would give it: ``mkdtemp``
    makes it private (0700), and an artifact renamed from it would be unreadable to the user's team on a
    shared volume."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_UMASK)
    return path


def temp_file(prefix: str, parent: str | os.PathLike, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``parent``, with the permissions ``open`` would give the file (not 0600)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    os.chmod(name, 0o666 & ~_UMASK)
    return fd, name


def _absolute(path: str | os.PathLike) -> Path:
    """``path`` made absolute without resolving symbolic links (``..`` folded)."""
    return Path(os.path.abspath(os.fspath(path)))


def local_path(location: str | os.PathLike) -> Path | None:
    """The real path a plain path, ``~/...`` or ``file://`` URL names (``~`` expanded, symbolic links
    resolved); None for any other URL (``s3://``, ``https://``)."""
    text = os.fspath(location)
    if text.startswith("file://"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        text = url2pathname(urlparse(text).path)
    elif "://" in text:
        return None
    return Path(os.path.realpath(os.path.expanduser(text)))


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a manifest a delrec stage wrote (any schema version)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get(layout.M_PRODUCER) in layout.PRODUCERS


def _foreign_files(folder: Path) -> list[str]:
    """Files under ``folder``, a delrec output, that its manifest does not list (say the user's notes)."""
    files = json.loads((folder / MANIFEST).read_text()).get(layout.M_FILES)
    own = {MANIFEST, *(files if isinstance(files, dict) else ())}
    return sorted(
        rel
        for entry in folder.rglob("*")
        if (entry.is_symlink() or not entry.is_dir())
        and (rel := entry.relative_to(folder).as_posix()) not in own
    )


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out(
    out: str | os.PathLike, *, force: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Path:
    """Check that a stage may write (and replace) the folder ``out``; return it as an absolute path.

    ``out`` may be new, an empty folder or the output of a delrec stage (it holds our manifest and only
    the files that manifest lists). Any other existing folder is refused unless ``force``; ``force``
    never allows replacing a folder named in ``protect`` (the stage's inputs, say the raw source, as
    paths, ``~/...`` or ``file://`` URLs, compared after resolving symbolic links) or a folder holding
    one, nor the current folder. A file, a symbolic link or a path below a file is always refused.
    """
    if not os.fspath(out).strip():
        raise DelrecError("empty output path", field="out")
    path = _absolute(out)
    cwd = _absolute(os.getcwd())
    if _is_within(cwd, path):
        raise DelrecError(
            "is the current folder or holds it: give a new folder for the output", path=out, field="out"
        )
    if path.is_symlink():
        raise DelrecError("is a symbolic link: give the real folder", path=out, field="out")
    if path.exists() and not path.is_dir():
        raise DelrecError(
            "exists and is not a folder: give a folder path for the output", path=out, field="out"
        )
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DelrecError(f"{ancestor} is a file, not a folder", path=out, field="out")
    real = Path(os.path.realpath(path))
    for other in protect:
        other_path = local_path(other)
        if other_path is not None and _is_within(other_path, real):
            raise DelrecError(
                f"would replace the input {other}: write the output somewhere else", path=out, field="out"
            )
    if path.is_dir() and any(path.iterdir()):
        if not is_ours(path):
            problem = f"exists and is not a delrec output (no {MANIFEST})"
        elif foreign := _foreign_files(path):
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            problem = f"holds files that are not part of the delrec output ({shown})"
        else:
            return path
        if not force:
            raise DelrecError(
                f"{problem}: refusing to replace it; give a new folder (or pass --force to replace it)",
                path=out,
                field="out",
            )
        log.warning("--force: replacing %s, which %s", out, problem)
    return path


def allow_replace(out: str | os.PathLike) -> None:
    """Let :func:`atomic_dir` replace ``out`` even if it is not ours (the CLI's ``--force``)."""
    _FORCED.add(_absolute(out))


def _tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) from a temporary name ``.<out>.tmp-<host>-<pid>-<random>``; None if it has none."""
    tail = name.split(layout.TMP_TAG, 1)[-1] if layout.TMP_TAG in name else name.split(layout.OLD_TAG, 1)[-1]
    host, _, rest = tail.rpartition("-")[0].rpartition("-")
    try:
        return host, int(rest)
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove the temporary folders a killed run left beside ``out``; returns what was removed.

    A folder of this host is stale once its process is gone (or is this process but not in use); one of
    another host, or of an unknown owner, once it is older than :data:`STALE_AFTER_S`.
    """
    out = _absolute(out)
    if not out.parent.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for prefix in (f".{out.name}{layout.TMP_TAG}", f".{out.name}{layout.OLD_TAG}"):
        for entry in out.parent.glob(glob.escape(prefix) + "*"):
            if entry in _ACTIVE or entry.is_symlink():
                continue
            owner = _tmp_owner(entry.name)
            try:
                age = now - entry.lstat().st_mtime
            except FileNotFoundError:
                continue
            if owner is not None and owner[0] == _safe_host():
                stale = owner[1] == os.getpid() or not _pid_alive(owner[1])
            else:
                stale = age > STALE_AFTER_S
            if stale:
                log.info("removing %s, left by a run that was killed", entry)
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _safe_host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike, *, force: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    ``out`` is checked first (:func:`check_out`: an existing folder is replaced only if it is a delrec
    output) and again just before the swap. On any exception the temporary folder and any parent folder
    this call created are removed, and ``out`` is left as it was. Stale temporary folders of killed runs
    are swept first.
    """
    force = force or _absolute(out) in _FORCED
    path = check_out(out, force=force, protect=protect)
    sweep_stale(path)
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".{path.name}{layout.TMP_TAG}{_safe_host()}-{os.getpid()}-"
        tmp = temp_dir(tag, path.parent)
        _ACTIVE.add(tmp)
        yield tmp
        check_out(out, force=force, protect=protect)  # nothing appeared there meanwhile
        if path.exists():
            # Swap via a second rename so ``out`` is never missing for long nor half-written.
            old = path.with_name(f".{path.name}{layout.OLD_TAG}{_safe_host()}-{os.getpid()}-{time.time_ns()}")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first; only if still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        if tmp is not None:
            _ACTIVE.discard(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(f".{path.name}.", path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(obj, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` except the manifest itself."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(folder).as_posix()] = {
                "sha256": file_sha256(path),
                "size": path.stat().st_size,
            }
    return files


def write_manifest(
    folder: str | os.PathLike,
    *,
    producer: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str | os.PathLike] | None = None,
    rows: Mapping[str, int] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` into ``folder``; ``inputs`` maps a role to an input artifact folder.

    Call it last: it records the sha256 and size of every file already in ``folder``, which every
    reader verifies.
    """
    folder = Path(folder)
    manifest: dict[str, Any] = {
        layout.M_SCHEMA: SCHEMA_VERSION,
        layout.M_PRODUCER: producer,
        layout.M_VERSION: __version__,
        layout.M_CONFIG: dict(config),
        layout.M_CONFIG_HASH: config_hash(config),
        layout.M_INPUTS: {role: read_manifest(path)[layout.M_ID] for role, path in (inputs or {}).items()},
        layout.M_ROWS: dict(rows or {}),
        layout.M_CREATED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    manifest[layout.M_FILES] = _hash_files(folder)
    # The id identifies this exact output: producer, config, the ids of its inputs and its content.
    manifest[layout.M_ID] = config_hash(
        {k: manifest[k] for k in ("producer", "config_hash", "inputs", "rows", "created", "files")}
    )
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


# (folder, relative path) -> (size, mtime_ns, inode, sha256) of files already verified in this process:
# a stage reads the manifest of an input several times but hashes each file once.
_VERIFIED: dict[tuple[Path, str], tuple[int, int, int, str]] = {}


def verify_files(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Check every file the manifest lists against its recorded size and sha256; name the first bad one."""
    folder = _absolute(folder)
    files = manifest.get(layout.M_FILES)
    where = folder / MANIFEST
    if not isinstance(files, dict):
        raise DelrecError("no file list: cannot verify this artifact", path=where, field=layout.M_FILES)
    for rel, entry in files.items():
        field = f"{layout.M_FILES}.{rel}"
        target = _absolute(folder / rel)
        if not isinstance(entry, dict) or not _is_within(target, folder) or target == folder:
            raise DelrecError("malformed file entry", path=where, field=field)
        try:
            info = target.stat()
        except OSError:
            raise DelrecError("missing: the artifact is incomplete", path=target, field=field) from None
        if info.st_size != entry.get("size"):
            raise DelrecError(
                f"size {info.st_size} bytes, the manifest records {entry.get('size')}: "
                "the file is truncated or was changed",
                path=target,
                field=field,
            )
        key = (folder, rel)
        stamp = (info.st_size, info.st_mtime_ns, info.st_ino)
        cached = _VERIFIED.get(key)
        digest = cached[3] if cached is not None and cached[:3] == stamp else file_sha256(target)
        if digest != entry.get("sha256"):
            _VERIFIED.pop(key, None)
            raise DelrecError(
                "sha256 does not match the manifest: the file is corrupt or was changed",
                path=target,
                field=field,
            )
        _VERIFIED[key] = (*stamp, digest)


def read_manifest(
    folder: str | os.PathLike, *, producer: str | None = None, verify: bool = True
) -> dict[str, Any]:
    """Read and check an artifact's manifest and (``verify``) every file it lists.

    Raises a clear error if the manifest is missing, of the wrong kind or version, or a file is missing,
    truncated or changed.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DelrecError(
            f"no {MANIFEST}: not a delrec artifact folder (expected the output of a delrec stage)",
            path=folder,
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DelrecError(f"unreadable JSON ({exc})", path=path) from exc
    if not isinstance(manifest, dict):
        raise DelrecError("expected a JSON object", path=path)
    version = manifest.get(layout.M_SCHEMA)
    if version != SCHEMA_VERSION:
        raise DelrecError(
            f"schema version {version!r}, this delrec reads version {SCHEMA_VERSION}"
            " (re-run the stage that wrote it)",
            path=path,
            field=layout.M_SCHEMA,
        )
    if producer is not None and manifest.get(layout.M_PRODUCER) != producer:
        raise DelrecError(
            f"produced by {manifest.get(layout.M_PRODUCER)!r}, expected the output of {producer!r}",
            path=path,
            field=layout.M_PRODUCER,
        )
    if verify:
        verify_files(folder, manifest)
    return manifest


def require_same_input(
    folder: str | os.PathLike, role: str, expected: str | os.PathLike, *, producer: str | None = None
) -> dict[str, Any]:
    """Check that artifact ``folder`` was built from the artifact at ``expected`` (its ``role`` input).

    This is how, say, the distill stage refuses a teacher trained on another dataset.
    """
    manifest = read_manifest(folder, producer=producer)
    expected_id = read_manifest(expected)[layout.M_ID]
    got = manifest[layout.M_INPUTS].get(role)
    if got != expected_id:
        raise DelrecError(
            f"was built from {role} {got!r}, but the {role} given is {expected_id!r} ({expected}); "
            "re-run the stage on the matching input",
            path=Path(folder) / MANIFEST,
            field=f"inputs.{role}",
        )
    return manifest


def check_reusable(
    folder: str | os.PathLike,
    *,
    producer: str,
    config: Mapping[str, Any] | None,
    inputs: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Check that the artifact in ``folder`` is what ``producer`` would make now from ``config`` (as the
    stage records it) and ``inputs`` (role -> artifact folder), so that a caller may reuse it instead
    of running the stage again. Returns its manifest. ``config`` None compares only the kind and the
    inputs (an artifact brought from another run, whatever its settings).

    Raises a clear error naming the first config field or input that differs: a run that asks for
    other settings must never be served an older output under its name.
    """
    manifest = read_manifest(folder, producer=producer)
    where = Path(folder) / MANIFEST
    redo = "use another output folder, or delete this one to run the stage again"
    stored = manifest[layout.M_CONFIG]
    wanted = stored if config is None else json.loads(json.dumps(dict(config)))  # as the manifest holds it
    absent = object()
    for key in sorted(set(stored) | set(wanted)):
        was, now = stored.get(key, absent), wanted.get(key, absent)
        if was != now:
            shown = ["(not set)" if v is absent else repr(v) for v in (was, now)]
            raise DelrecError(
                f"was made with {key}={shown[0]}, this run asks for {key}={shown[1]}: {redo}",
                path=where,
                field=f"{layout.M_CONFIG}.{key}",
            )
    roles = dict(inputs or {})
    for role in sorted(set(manifest[layout.M_INPUTS]) - set(roles)):
        raise DelrecError(
            f"was made from a {role} input this run does not give: {redo}",
            path=where,
            field=f"{layout.M_INPUTS}.{role}",
        )
    for role, path in roles.items():
        require_same_input(folder, role, path)
    return manifest


# Resumable stages keep their training state in ``<out>.partial/state.pt``, next to (not inside) the
# atomically written output; it survives a killed run and is removed once the output is in place.
CHECKPOINT = layout.CHECKPOINT

# What a checkpoint may hold: it is loaded with ``weights_only=True``, which refuses anything else.
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str = "state") -> None:
    import torch

    if isinstance(value, _PLAIN) or isinstance(value, torch.Tensor):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _PLAIN):
                raise TypeError(f"checkpoint key {where}[{key!r}] is a {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint value {where} is a {type(value).__name__}: store tensors and plain types only"
    )


def partial_dir(out: str | os.PathLike) -> Path:
    """The checkpoint folder of the stage writing ``out``."""
    out = Path(out)
    return out.with_name(out.name + layout.PARTIAL_SUFFIX)


def save_checkpoint(partial: Path, state: dict[str, Any]) -> None:
    """Write a training state atomically; ``state["run_key"]`` identifies the run it belongs to.

    Only tensors and plain types (dict, list, tuple, str, numbers, bool, None) are allowed, so that
    :func:`load_checkpoint` can read it without running any code from the file.
    """
    import torch

    _check_plain(state)
    partial.mkdir(parents=True, exist_ok=True)
    tmp = partial / layout.CHECKPOINT_TMP
    torch.save(state, tmp)
    os.replace(tmp, partial / CHECKPOINT)


def load_checkpoint(
    partial: Path, run_key: Mapping[str, str], *, map_location: Any = "cpu"
) -> dict[str, Any] | None:
    """The saved state if it belongs to this exact run (same ``run_key``: config and inputs), else None.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain types only, so a crafted
    file cannot run code. Its run key is checked before anything else in it is used. An unreadable
    checkpoint or one of another run is ignored with a warning: the run starts afresh.
    """
    import torch

    path = partial / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt or foreign checkpoint is not worth failing the run for
        log.warning("ignoring unreadable checkpoint %s (%s); starting afresh", path, exc)
        return None
    if not isinstance(state, dict) or state.get("run_key") != dict(run_key):
        log.warning("ignoring checkpoint %s: it belongs to another run (config or inputs differ)", path)
        return None
    log.info("resuming from %s", path)
    return state
