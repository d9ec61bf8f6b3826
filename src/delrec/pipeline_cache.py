"""The task cache of ``pipeline.py run`` (kfp.local): kfp's file-backed cache with each entry checked."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from kfp import dsl
from kfp.local.cache import LocalCache

import delrec
from delrec.artifacts import temp_file
from delrec.store import local_fingerprint

# kfp.local's task cache, under the local pipeline root: the entries name artifacts in the run folders
# beside them, so `make clean` (which removes local_outputs) clears both at once.
CACHE_DIR = ".kfp_cache"

log = logging.getLogger("pipeline")


class VerifiedCache(LocalCache):
    """kfp.local's file-backed task cache (same key: component, image, command, inputs, env), with
    each entry checked when read.

    kfp's own cache treats an unreadable entry or a missing artifact as a miss, but serves an entry of
    the wrong shape as an error and one whose artifact files changed as a hit. Here an entry carries
    a checksum of itself, each artifact with a ``content_fingerprint`` (written by the stages) is
    hashed again, a Metrics file must still hold its metadata, and any failure is a miss (logged),
    never an error. ``hits`` keeps what each hit served (key -> outputs), for the run's table.
    ``refresh``: every read misses (each task runs), and what the task writes replaces its entry
    (``--no-cache``).
    """

    def __init__(self, cache_root: str, code: str = "", refresh: bool = False) -> None:
        super().__init__(cache_root)
        self.code, self.refresh = code, refresh
        self.hits: dict[str, dict[str, Any]] = {}

    def compute_key(
        self,
        component_name: str,
        image: str,
        full_command: list[str],
        arguments: dict[str, Any],
        env_vars: dict[str, str] | None = None,
        custom_cache_key: str | None = None,
    ) -> str:
        # Locally the image name stays put while the library under it changes: the library's own
        # fingerprint stands in for the immutable image tag a cluster run is compiled with.
        env = {**(env_vars or {}), "DELREC_CODE_FINGERPRINT": self.code}
        return super().compute_key(component_name, image, full_command, arguments, env, custom_cache_key)

    @staticmethod
    def _checksum(serialized: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(serialized, sort_keys=True).encode()).hexdigest()

    def put(self, key: str, outputs: dict[str, Any]) -> None:
        serialized = self._serialize_outputs(outputs)
        entry = json.dumps({"outputs": serialized, "sha256": self._checksum(serialized)})
        # Atomic: a concurrent reader or a killed run never sees half an entry.
        fd, tmp = temp_file(".entry-", self.cache_root, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(entry)
        os.replace(tmp, self._entry_path(key))

    def get(self, key: str) -> dict[str, Any] | None:
        path = Path(self._entry_path(key))
        if self.refresh or not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            if entry["sha256"] != self._checksum(entry["outputs"]):
                raise ValueError("checksum mismatch")
            outputs = self._deserialize_outputs(entry["outputs"])  # raises if an artifact is gone
            for value in outputs.values():
                for artifact in value if isinstance(value, list) else [value]:
                    expected = getattr(artifact, "metadata", {}).get("content_fingerprint")
                    if expected and local_fingerprint(artifact.path) != expected:
                        raise ValueError(f"the files of {artifact.uri} changed since")
                    # A Metrics output's metadata is its metrics (no room for a fingerprint): its file
                    # is written from them (components/evaluate.py), so the two must still agree.
                    if isinstance(artifact, dsl.Metrics) and json.loads(Path(artifact.path).read_text()) != (
                        artifact.metadata
                    ):
                        raise ValueError(f"the metrics file {artifact.uri} changed since")
        except Exception as exc:  # whatever is wrong with an entry, running the task again repairs it
            log.warning("cache entry %s unusable (%s): a miss", path.name, exc)
            return None
        self.hits[key] = outputs
        return outputs


def code_fingerprint() -> str:
    """A hash of the delrec library's sources (``*.py``: compiled files come and go), which the
    components import, and of the installed packages' versions and Python's (an upgraded torch or
    transformers may change a stage's output: on a cluster the image tag covers them, here this does)."""
    import importlib.metadata
    import sys

    package = Path(delrec.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    installed = sorted(
        f"{dist.metadata['Name']}=={dist.version}" for dist in importlib.metadata.distributions()
    )
    digest.update("\n".join([sys.version, *installed]).encode())
    return digest.hexdigest()[:16]
