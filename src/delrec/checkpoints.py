"""Where a resumable stage keeps its training state, and how it survives the machine it ran on.

Locally a stage checkpoints into ``<out>.partial/`` beside its output, and a killed run started again
resumes there. In a Kubeflow pod that folder lies on the pod's own disk: a retried pod would start from
step 0. So the pipeline gives each training task a workspace in the object store, one prefix per run and
task (``<root>/<KFP run id>/<task>``): the stage copies each checkpoint there as it writes it, restores it
on start, and removes it once its output is in place. The run key inside the checkpoint (config and
inputs) still decides whether it may be resumed at all.

The pipeline says "checkpoint here" through the environment (:data:`ENV_ROOT`, :data:`ENV_RUN_ID`,
:data:`ENV_TASK`, read by :func:`location_from_env`), not through component inputs: KFP's cache key
holds every input value, and a run id among them would make every run a cache miss.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from delrec import layout
from delrec.artifacts import load_checkpoint, partial_dir, save_checkpoint
from delrec.errors import DelrecError
from delrec.store import S3Store, is_s3_uri, join_uri, parse_uri

log = logging.getLogger(__name__)

ENV_ROOT = "DELREC_CHECKPOINT_ROOT"
"""``s3://bucket/prefix`` under which the pipeline's training tasks keep their checkpoints"""
ENV_RUN_ID = "DELREC_RUN_ID"
"""the KFP run id (the pipeline sets it from the pod's ``pipeline/runid`` label)"""
ENV_TASK = "DELREC_TASK"
"""the task's name in the graph, so two tasks of one run never share a checkpoint"""


def location_from_env() -> str | None:
    """``<root>/<run id>/<task>`` from the environment the pipeline sets; None: keep ``<out>.partial``.

    The root is an ``s3://`` prefix on a cluster, or an absolute local folder (``pipeline.py run`` sets
    one under its pipeline root, and the run id ``local-<code fingerprint>``, so that a killed local run
    resumes in the next, whose outputs go to a new run folder, if the code is the same). Without a run
    id (kfp.local applies the task's plain environment but no pod labels) or, for an ``s3://`` root,
    without an object-store endpoint, the checkpoints stay beside the output.
    """
    root = os.environ.get(ENV_ROOT, "")
    if not root:
        return None
    if not is_s3_uri(root) and not os.path.isabs(root):
        raise DelrecError(
            f"expected s3://bucket[/prefix] or an absolute folder, got {root!r}", field=ENV_ROOT
        )
    run_id, task = os.environ.get(ENV_RUN_ID, ""), os.environ.get(ENV_TASK, "")
    if not run_id:
        log.info(
            "%s is set but no %s (not a KFP pod): checkpoints stay beside the output", ENV_ROOT, ENV_RUN_ID
        )
        return None
    if not task:
        raise DelrecError(f"{ENV_ROOT} and {ENV_RUN_ID} are set but not {ENV_TASK}", field=ENV_TASK)
    if not is_s3_uri(root):
        return os.path.join(root, run_id, task)
    if not os.environ.get("DELREC_S3_ENDPOINT"):
        log.warning(
            "no object-store endpoint (DELREC_S3_ENDPOINT): checkpoints stay on this pod's disk, so a "
            "retried pod starts from step 0 (set it in the delrec-object-store ConfigMap)"
        )
        return None
    return join_uri(root, run_id, task)


STAGE_FILES = (layout.CHECKPOINT, layout.CHECKPOINT_TMP, layout.BACKBONE_DIR)
"""what a stage writes into its checkpoint folder: the training state (and its temporary name) and, for a
tiny test backbone, its weights"""


@dataclass(frozen=True)
class Checkpoints:
    """A stage's checkpoint folder, mirrored to an ``s3://`` prefix when ``remote`` is set.

    Build it with :meth:`for_output`. The stage reads and writes :attr:`folder` (it may keep other files
    there that it can rebuild, as finetune does with the tiny test backbone); only the training state
    (``state.pt``) travels to ``remote``.
    """

    folder: Path
    remote: str | None = None
    store: S3Store | None = None
    owned: bool = True
    """the folder is the stage's own ``<out>.partial`` (removed whole once done); False for a folder the
    user named, which may hold other files: only what the stage wrote there is removed"""

    @classmethod
    def for_output(cls, out: str | os.PathLike, where: str | os.PathLike | None = None) -> Checkpoints:
        """The checkpoints of the stage writing ``out``: ``where`` is a local folder, an ``s3://`` prefix
        (mirrored from ``<out>.partial``), or None (``<out>.partial``, the default of every stage)."""
        if where is None or str(where) == "":
            return cls(partial_dir(out))
        if is_s3_uri(str(where)):
            parse_uri(str(where))  # a clear error for a malformed URI, before any training
            return cls(partial_dir(out), str(where), S3Store.from_env())
        return cls(Path(where).expanduser(), owned=False)

    def _remote_state(self) -> str:
        return join_uri(self.remote or "", layout.CHECKPOINT)

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` (see :func:`delrec.artifacts.save_checkpoint`) and copy it to ``remote``.

        A failed copy costs only the resume point, not the run: it is logged and training goes on.
        """
        save_checkpoint(self.folder, state)
        if self.store is not None:
            try:
                self.store.put_file(self.folder / layout.CHECKPOINT, self._remote_state())
            except Exception as exc:
                log.warning(
                    "checkpoint not copied to %s (%s): a retry would resume from an older one",
                    self.remote,
                    exc,
                )

    def load(self, run_key: Mapping[str, str], *, map_location: Any = "cpu") -> dict[str, Any] | None:
        """The saved state of this exact run, from ``remote`` if it holds one, else from :attr:`folder`."""
        if self.store is not None and self.store.exists(self._remote_state()):
            log.info("restoring the checkpoint %s", self._remote_state())
            self.store.get_file(self._remote_state(), self.folder / layout.CHECKPOINT)
        return load_checkpoint(self.folder, run_key, map_location=map_location)

    def clear(self) -> None:
        """Remove the checkpoint (the stage's output is in place): what the stage wrote, never more.

        ``<out>.partial`` goes whole; from a folder the user named, and from ``remote`` (a prefix that may
        hold other objects, such as published models), only the files of :data:`STAGE_FILES`.
        """
        if self.owned:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            for name in STAGE_FILES:
                path = self.folder / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if self.store is not None and self.store.exists(self._remote_state()):
            self.store.remove(self._remote_state())
