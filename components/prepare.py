"""Prepare: the run parameters applied to the stage configs, and keys of the source and backbone as they are now.

Never served from a cache (the pipeline disables it): it lists the source and a backbone folder at run
time, so a scheduled run whose data and weights did not change is a cache hit from preprocess on, and
one with new data retrains (new weights in the backbone's folder: the LLM stages run again).
"""

from typing import NamedTuple

from kfp import dsl

from delrec.images import cpu_image


@dsl.component(base_image=cpu_image(), packages_to_install=[], install_kfp_package=False)
def prepare(
    preprocess_config: dict,
    teacher_config: dict,
    distill_config: dict,
    finetune_config: dict,
    evaluate_config: dict,
    source: str = "",
    teacher_model: str = "",
    backbone: str = "",
    distill_steps: int = 0,
    distill_batch_size: int = 0,
    finetune_steps: int = 0,
    finetune_batch_size: int = 0,
    evaluate_batch_size: int = 0,
    publish_to: str = "",
) -> NamedTuple(
    "Prepared",
    [
        ("source_fingerprint", str),
        ("backbone_key", str),
        ("preprocess_config", dict),
        ("teacher_config", dict),
        ("distill_config", dict),
        ("finetune_config", dict),
        ("evaluate_config", dict),
    ],
):
    """Each stage config with the run parameters set (``delrec.config.apply_run_parameters``: a run
    parameter wins over its stage dict; an empty string or 0 leaves the dict's value), and
    ``delrec.store.source_fingerprint`` of the resulting source (S3 ETags, or file hashes), and
    ``delrec.llm.backbone.weights_key`` of the LLM stages' backbone (a local folder's file listing).
    A backbone that cannot load (``delrec.llm.backbone.check_backbone``), or object-store credentials
    that later tasks need and did not get (``delrec.store.require_credentials``), fail the run here."""
    from collections import namedtuple

    from delrec.config import apply_run_parameters
    from delrec.llm.backbone import check_backbone, weights_key
    from delrec.store import require_credentials, source_fingerprint

    require_credentials(publish_to)

    params = {
        "source": source,
        "teacher_model": teacher_model,
        "backbone": backbone,
        "distill_steps": distill_steps,
        "distill_batch_size": distill_batch_size,
        "finetune_steps": finetune_steps,
        "finetune_batch_size": finetune_batch_size,
        "evaluate_batch_size": evaluate_batch_size,
    }
    configs = apply_run_parameters(
        {
            "preprocess": preprocess_config,
            "teacher": teacher_config,
            "distill": distill_config,
            "finetune": finetune_config,
            "evaluate": evaluate_config,
        },
        params,
    )
    fingerprint = source_fingerprint(configs["preprocess"].get("source"))
    print(f"source fingerprint: {fingerprint or '(none: no source to list)'}")
    # A stage config without a backbone has the built-in default: nothing to list.
    backbones = {configs[stage].get("backbone", "") for stage in ("distill", "finetune", "evaluate")}
    for name in sorted(backbones):
        check_backbone(name)  # a typo fails now, not after preprocess and the teacher
    backbone_key = "".join(weights_key(name) for name in sorted(backbones))
    fields = ["source_fingerprint", "backbone_key", *(f"{stage}_config" for stage in configs)]
    return namedtuple("Prepared", fields)(fingerprint, backbone_key, *configs.values())
