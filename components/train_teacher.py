"""Teacher training: Dataset -> teacher Model (weights, config, top-k export)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from delrec.images import cpu_image


@dsl.component(base_image=cpu_image(), packages_to_install=[], install_kfp_package=False)
def train_teacher(
    config: dict,
    dataset: Input[Dataset],
    teacher: Output[Model],
    metrics: Output[Metrics],
):
    """Run ``delrec.teachers.train_teacher`` and log its metrics.

    In a pipeline run it checkpoints to the run's workspace in the object store (its endpoint from the
    delrec-object-store ConfigMap), so a retried pod resumes (``delrec.checkpoints``).
    """
    import json
    import time
    from pathlib import Path

    from delrec.checkpoints import location_from_env
    from delrec.store import local_fingerprint
    from delrec.teachers import TeacherConfig
    from delrec.teachers import train_teacher as run

    started = time.perf_counter()
    # The pipeline says where to checkpoint through the environment (a run id among the inputs would
    # change the cache key of every run); delrec.store reads its endpoint from there too (ConfigMap).
    config = TeacherConfig.from_dict(config, source="teacher config")
    result = run(dataset.path, config, teacher.path, checkpoint=location_from_env())
    result = {
        k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for name, value in {**result, "wall_seconds": time.perf_counter() - started}.items():
        metrics.log_metric(name, value)
    # A file as well as the metadata: kfp.local never serves a task from its cache when an output
    # artifact has no file, and the local run's table reads the metrics from it.
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2, sort_keys=True) + "\n")
    teacher.metadata.update(result, content_fingerprint=local_fingerprint(teacher.path))
