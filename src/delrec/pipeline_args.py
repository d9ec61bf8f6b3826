"""The override grammar of ``pipeline.py run|submit|schedule``: a preset, ``--data`` and ``param=value``
items -> the graph's options and the run's arguments, every stage config validated before anything runs.

``param=value`` takes ``section.field=value`` (``teacher.max_epochs=5``, ``pipeline.gpus=0``), a flat run
parameter (``delrec.config.RUN_PARAMETERS``: ``distill_steps=5``, ``backbone=...``), an option that is a
run parameter (``publish_to=s3://models``), ``source=PATH``, ``teacher=gru4rec``, or a field name that
stage configs share (``seed=7`` sets it in every stage that has it). Values are parsed as YAML.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from delrec.config import RUN_PARAMETERS, STAGES, StageConfig, config_class, load_preset
from delrec.errors import DelrecError
from delrec.store import QualityGate, is_s3_uri


def pipeline_arguments(
    preset: str,
    data: str | None = None,
    overrides: Sequence[str] = (),
    *,
    options_class: type[StageConfig],
    option_run_params: Sequence[str] = (),
    compile_time_options: Sequence[str] = (),
) -> tuple[Any, dict[str, Any]]:
    """Options and run arguments from a preset, ``--data`` and ``param=value`` overrides (validated).

    ``options_class`` validates the preset's ``pipeline:`` section (the graph's options);
    ``option_run_params`` are options that are run parameters too (their defaults come from the options),
    ``compile_time_options`` options settable as ``name=value`` that are baked into the compiled spec.

    The fields of ``delrec.config.RUN_PARAMETERS`` become flat run parameters (their stage dicts lose
    them); the source's fingerprint is the pipeline's own first task, taken when the run starts.
    """
    sections = load_preset(preset)
    pipeline_section = dict(sections.get("pipeline", {}))
    configs = {stage: dict(sections.get(stage, {})) for stage in STAGES}
    run_params: dict[str, Any] = {}
    option_fields = set(options_class.model_fields)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DelrecError(f"expected param=value, got {item!r}")
        value = yaml.safe_load(raw) if raw else ""
        if "." in key:
            section, _, field = key.partition(".")
            if section == "pipeline":
                pipeline_section[field] = value
            elif section in configs:
                configs[section][field] = value
            else:
                raise DelrecError(
                    f"{item!r}: unknown section {section!r}; expected one of {[*STAGES, 'pipeline']}"
                )
        elif key == "source":
            configs["preprocess"]["source"] = raw  # a path or URI, never YAML
        elif key in option_run_params:
            run_params[key] = value
            if key in option_fields:
                pipeline_section[key] = value
        elif key in compile_time_options:
            pipeline_section[key] = value
        elif key == "teacher":  # short for teacher_model
            configs["teacher"]["model"] = value
        elif key in RUN_PARAMETERS:
            for stage, field in RUN_PARAMETERS[key]:
                configs[stage][field] = value
        else:
            hit = [s for s in STAGES if key in config_class(s).model_fields]
            if not hit:
                raise DelrecError(f"{item!r}: no stage config has a field {key!r}")
            for stage in hit:
                configs[stage][key] = value
    options = options_class.from_dict(pipeline_section, source=f"preset {preset}: pipeline")
    QualityGate.from_dict(run_params.get("gate", options.gate))
    publish_to = run_params.get("publish_to", options.publish_to)
    if publish_to and not is_s3_uri(publish_to):
        raise DelrecError(f"publish_to must be an s3://bucket[/prefix] URI, got {publish_to!r}")
    if data:
        configs["preprocess"]["source"] = str(Path(data).resolve()) if not data.startswith("s3://") else data
    validated = {  # fail now, not an hour into the run
        stage: config_class(stage).from_dict(configs[stage], source=f"preset {preset}: {stage}")
        for stage in STAGES
    }
    for name, fields in RUN_PARAMETERS.items():
        values = {getattr(validated[stage], field) for stage, field in fields}
        if len(values) > 1:
            where = ", ".join(f"{stage}.{field}" for stage, field in fields)
            raise DelrecError(f"{where} differ ({sorted(map(str, values))}): set {name}=... for all of them")
        (value,) = values
        run_params[name] = "" if value is None else value
        for stage, field in fields:
            configs[stage].pop(field, None)  # the run parameter decides: no second, ignored copy
    arguments: dict[str, Any] = {f"{stage}_config": configs[stage] for stage in STAGES}
    for name in option_run_params:
        run_params.setdefault(name, getattr(options, name))
    arguments.update(run_params)
    return options, arguments
