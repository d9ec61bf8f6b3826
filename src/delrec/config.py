"""Typed stage configs and YAML presets.

Each stage owns one pydantic config class (``PreprocessConfig`` in ``delrec.data``,
``TeacherConfig`` in ``delrec.teachers``, ...). A preset in ``configs/NAME.yaml`` has one section
per stage; unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from delrec.artifacts import config_hash
from delrec.errors import DelrecError

STAGES = ("preprocess", "teacher", "distill", "finetune", "evaluate")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs"


class StageConfig(BaseModel):
    """Base of every stage config: strict keys, a stable hash, loading from a dict with clear errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed_not_negative(cls, value: int) -> int:
        # numpy's generators refuse negative seeds, deep inside a stage: refuse them up front.
        if value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        return value

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> Self:
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
            )
            raise DelrecError(f"invalid {cls.__name__}: {problems}", path=source) from None

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))

    @classmethod
    def default_help(cls, field: str) -> str:
        """``(default X)`` for a CLI option's help, read from the field so the two never disagree (a
        default of None is explained by the field's description)."""
        info = cls.model_fields[field]
        if info.default is None and info.description:
            meaning = " ".join(info.description.split(";")[0].split()).removeprefix("None: ")
            return f"(default: {meaning})"
        return f"(default {info.default})"


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (``demo``, ``ml-100k`` ...) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise DelrecError("preset file not found", path=path)
        return path
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise DelrecError(f"unknown preset {str(name_or_path)!r}; known presets: {', '.join(known)}")
    return candidate


def load_preset(name_or_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Load a preset as raw per-stage sections (each stage validates its own section).

    ``extends: NAME`` starts from another preset: a field this file gives replaces the base's value
    (whole, for a mapping such as ``resources``), a field it leaves out keeps it.
    """
    return _load_preset(preset_path(name_or_path), ())


def _load_preset(path: Path, seen: tuple[Path, ...]) -> dict[str, dict[str, Any]]:
    if path.resolve() in seen:
        chain = " -> ".join(p.name for p in (*seen, path.resolve()))
        raise DelrecError(f"presets extend each other in a loop ({chain})", path=path, field="extends")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DelrecError(f"not valid YAML ({exc})", path=path) from exc
    if not isinstance(data, dict):
        raise DelrecError("expected a mapping of stage sections", path=path)
    base_name = data.pop("extends", None)
    unknown = set(data) - set(STAGES) - {"pipeline"}
    if unknown:
        raise DelrecError(
            f"unknown section(s) {sorted(unknown)}; expected {list(STAGES)}, 'pipeline' and 'extends'",
            path=path,
        )
    for key, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise DelrecError(f"expected a mapping of fields, got {value!r}", path=path, field=key)
    sections = {key: dict(value or {}) for key, value in data.items()}
    if base_name is None:
        return sections
    if not isinstance(base_name, str):
        raise DelrecError(f"expected a preset name, got {base_name!r}", path=path, field="extends")
    base = _load_preset(preset_path(base_name), (*seen, path.resolve()))
    return {key: {**base.get(key, {}), **sections.get(key, {})} for key in {*base, *sections}}


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """One stage's whole config dict from a JSON or YAML file (JSON is YAML), as the pipeline passes it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DelrecError(f"cannot read the config file ({exc.strerror or exc})", path=path) from None
    except yaml.YAMLError as exc:
        raise DelrecError(f"not valid JSON or YAML ({exc})", path=path) from None
    if not isinstance(data, dict):
        raise DelrecError("expected a mapping of config fields", path=path)
    return data


def layers_named(preset: str | None, config_file: str | None, command_line: bool) -> str:
    """Where a CLI's config came from, for its error messages: ``preset demo + command line``."""
    parts = [f"preset {preset}" if preset else "", config_file or "", "command line" if command_line else ""]
    return " + ".join(part for part in parts if part) or "defaults"


def parse_assignments(items: list[str], option: str = "--set") -> dict[str, Any]:
    """``["lr=0.01", "steps=5"]`` -> ``{"lr": 0.01, "steps": 5}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DelrecError(f"{option} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


# The fields a team changes from run to run, as flat pipeline parameters (typed, and readable in the KFP
# UI's run form and run comparison): parameter -> the (stage, field) pairs it sets. The rest of each
# stage config stays in its dict parameter.
RUN_PARAMETERS: dict[str, tuple[tuple[str, str], ...]] = {
    "source": (("preprocess", "source"),),
    "teacher_model": (("teacher", "model"),),
    "backbone": (("distill", "backbone"), ("finetune", "backbone"), ("evaluate", "backbone")),
    "distill_steps": (("distill", "steps"),),
    "distill_batch_size": (("distill", "batch_size"),),
    "finetune_steps": (("finetune", "steps"),),
    "finetune_batch_size": (("finetune", "batch_size"),),
    "evaluate_batch_size": (("evaluate", "batch_size"),),
}


def apply_run_parameters(
    configs: dict[str, dict[str, Any]], params: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Stage configs with the run parameters' fields set: a run parameter wins over its stage dict.

    An empty string or 0 leaves the stage's value (no source: the dataset's default download; steps and
    batch sizes are at least 1), so a component's defaults can mean "the dict's".
    """
    unknown = set(params) - set(RUN_PARAMETERS)
    if unknown:
        raise DelrecError(f"unknown run parameter(s) {sorted(unknown)}; expected {list(RUN_PARAMETERS)}")
    merged = {stage: dict(configs.get(stage) or {}) for stage in STAGES}
    for name, value in params.items():
        if value in ("", 0):
            continue
        for stage, field in RUN_PARAMETERS[name]:
            merged[stage][field] = value
    return merged


# Where each stage's config class lives (validated before anything runs).
CONFIG_CLASSES = {
    "preprocess": ("delrec.data", "PreprocessConfig"),
    "teacher": ("delrec.teachers", "TeacherConfig"),
    "distill": ("delrec.distill", "DistillConfig"),
    "finetune": ("delrec.finetune", "FinetuneConfig"),
    "evaluate": ("delrec.evaluate", "EvaluateConfig"),
}


def config_class(stage: str) -> type[StageConfig]:
    """The config class of a pipeline stage (imported on use: the LLM stages pull in torch)."""
    module, name = CONFIG_CLASSES[stage]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise DelrecError(
            f"stage {stage!r} is not available in this delrec ({module}.{name}: {exc})"
        ) from None
