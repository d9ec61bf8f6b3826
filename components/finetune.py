"""LLM fine-tuning (DELRec stage 2): Dataset + frozen soft prompt -> AdaLoRA Model. Runs on a GPU.

Without ``soft_prompt`` it trains the ablation: the same LLM and config, no soft prompt. ``teacher`` is
read only with ``teacher_kd`` > 0 (its scores of each training example's candidates).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from delrec.images import gpu_image


@dsl.component(base_image=gpu_image(), packages_to_install=[], install_kfp_package=False)
def finetune(
    config: dict,
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    soft_prompt: Input[Model] | None = None,
    teacher: Input[Model] | None = None,
    backbone_key: str = "",
):
    """Run ``delrec.finetune.finetune`` and log its metrics.

    In a pipeline run it checkpoints to the run's workspace in the object store (its endpoint from the
    delrec-object-store ConfigMap), so a retried pod resumes (``delrec.checkpoints``). With more than one
    GPU it runs torchrun ranks in this pod, or submits a TrainJob (``delrec.launch``: the pipeline says
    which through the environment). ``backbone_key`` is only there to change the cache key (as distill's).
    """
    import json
    import time
    from pathlib import Path

    from delrec.checkpoints import location_from_env
    from delrec.finetune import FinetuneConfig
    from delrec.finetune import finetune as run
    from delrec.launch import Artifact, Launch
    from delrec.store import local_fingerprint

    started = time.perf_counter()
    # The pipeline says where to checkpoint through the environment (a run id among the inputs would
    # change the cache key of every run); delrec.store reads its endpoint from there too (ConfigMap).
    config = FinetuneConfig.from_dict(config, source="finetune config")
    launch = Launch.from_env()
    if launch.in_process:
        result = run(
            dataset.path,
            config,
            model.path,
            distill_dir=soft_prompt.path if soft_prompt else None,
            teacher_dir=teacher.path if teacher else None,
            checkpoint=location_from_env(),
        )
    else:
        inputs = {
            "data": Artifact(dataset.path, dataset.uri),
            "distill": Artifact(soft_prompt.path, soft_prompt.uri) if soft_prompt else None,
            "teacher": Artifact(teacher.path, teacher.uri) if teacher else None,
        }
        result = launch.run(
            "finetune", config.model_dump(mode="json"), inputs, Artifact(model.path, model.uri)
        )
    result = {
        k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for name, value in {**result, "wall_seconds": time.perf_counter() - started}.items():
        metrics.log_metric(name, value)
    # A file as well as the metadata: kfp.local never serves a task from its cache when an output
    # artifact has no file, and the local run's table reads the metrics from it.
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2, sort_keys=True) + "\n")
    model.metadata.update(
        result, soft_prompt=soft_prompt is not None, content_fingerprint=local_fingerprint(model.path)
    )
