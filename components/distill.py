"""Pattern distillation (DELRec stage 1): Dataset + teacher -> soft prompt Model. Runs on a GPU."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from delrec.images import gpu_image


@dsl.component(base_image=gpu_image(), packages_to_install=[], install_kfp_package=False)
def distill(
    config: dict,
    dataset: Input[Dataset],
    teacher: Input[Model],
    soft_prompt: Output[Model],
    metrics: Output[Metrics],
    backbone_key: str = "",
):
    """Run ``delrec.distill.distill`` (TA + RPS soft-prompt training) and log its metrics.

    In a pipeline run it checkpoints to the run's workspace in the object store (its endpoint from the
    delrec-object-store ConfigMap), so a retried pod resumes (``delrec.checkpoints``). With more than one
    GPU it runs torchrun ranks in this pod, or submits a TrainJob (``delrec.launch``: the pipeline says
    which through the environment). ``backbone_key`` (``delrec.llm.backbone.weights_key``) is only there
    to change the cache key when the weights behind an unchanged backbone path change.
    """
    import json
    import time
    from pathlib import Path

    from delrec.checkpoints import location_from_env
    from delrec.distill import DistillConfig
    from delrec.distill import distill as run
    from delrec.launch import Artifact, Launch
    from delrec.store import local_fingerprint

    started = time.perf_counter()
    # The pipeline says where to checkpoint through the environment (a run id among the inputs would
    # change the cache key of every run); delrec.store reads its endpoint from there too (ConfigMap).
    config = DistillConfig.from_dict(config, source="distill config")
    launch = Launch.from_env()
    if launch.in_process:
        result = run(dataset.path, teacher.path, config, soft_prompt.path, checkpoint=location_from_env())
    else:
        inputs = {"data": Artifact(dataset.path, dataset.uri), "teacher": Artifact(teacher.path, teacher.uri)}
        out = Artifact(soft_prompt.path, soft_prompt.uri)
        result = launch.run("distill", config.model_dump(mode="json"), inputs, out)
    result = {
        k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for name, value in {**result, "wall_seconds": time.perf_counter() - started}.items():
        metrics.log_metric(name, value)
    # A file as well as the metadata: kfp.local never serves a task from its cache when an output
    # artifact has no file, and the local run's table reads the metrics from it.
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2, sort_keys=True) + "\n")
    soft_prompt.metadata.update(result, content_fingerprint=local_fingerprint(soft_prompt.path))
