"""Publish: push the model bundle to object storage; move ``latest`` only if the quality gate passes."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from delrec.images import cpu_image


@dsl.component(base_image=cpu_image(), packages_to_install=[], install_kfp_package=False)
def publish(
    metrics: dict,
    preprocess_config: dict,
    teacher_config: dict,
    distill_config: dict,
    finetune_config: dict,
    evaluate_config: dict,
    model: Input[Model],
    soft_prompt: Input[Model],
    evaluation: Input[Artifact],
    destination: str,
    pipeline_name: str,
    run_id: str,
    gate: dict,
    run_name: str = "",
) -> NamedTuple("PublishOutputs", [("uri", str), ("passed", bool)]):
    """Upload model + soft prompt + evaluation + the stage configs to ``<destination>/<pipeline>/<run_id>/``.

    ``run_id`` is the KFP job id (never empty, unique per run, unlike the run name of a recurring run);
    ``run_name`` is only recorded in the bundle index. ``latest`` moves only if this run beats the teacher
    and the published champion (``delrec.store.QualityGate``).

    (The configs come as separate parameters: kfp.local cannot pass a dict literal built from pipeline
    parameters.)
    """
    import json
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from delrec.store import QualityGate, S3Store, publish_bundle

    # Endpoint and TLS from the DELREC_S3_* environment (pipeline.py's s3_config_map), keys from a secret.
    store = S3Store.from_env()
    configs = {
        "preprocess": preprocess_config,
        "teacher": teacher_config,
        "distill": distill_config,
        "finetune": finetune_config,
        "evaluate": evaluate_config,
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "configs.json").write_text(json.dumps(configs, indent=2, sort_keys=True) + "\n")
        index = publish_bundle(
            store,
            {
                "model": model.path,
                "soft_prompt": soft_prompt.path,
                "evaluation": evaluation.path,
                "configs": tmp,
            },
            base=destination,
            pipeline=pipeline_name,
            run=run_id,
            metrics=metrics,
            gate=QualityGate.from_dict(gate),
            extra={"run_name": run_name},
        )
    print(index["gate"]["verdict"])
    return namedtuple("PublishOutputs", ["uri", "passed"])(index["uri"], index["gate"]["passed"])
