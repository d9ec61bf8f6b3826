"""Save and load the fine-tuned peft adapter so that the adapter evaluated is exactly the one trained.

Two things in peft 0.21 get in the way with AdaLoRA:

- AdaLoRA's ``rank_pattern`` is not LoRA's (module-name pattern -> rank) but parameter name ->
  per-row keep mask (``model.layers.0.self_attn.q_proj.lora_E: [True, False, ...]``). When
  ``PeftModel.from_pretrained`` injects the adapter, peft's generic check reads it as LoRA patterns,
  finds no module named ``...lora_E`` and warns that every key "did not match any targeted module
  and was ignored". The warning is wrong (AdaLoRA's loader does resize the modules by the pattern),
  but it drowns any real problem, so ``load_adapter`` injects without the pattern and resizes itself.
- ``save_pretrained`` drops the rows the *last* rank allocation masked. Between allocations
  (``delta_t`` > 1 with no final fixed-budget phase, ``tfinal`` = 0) the optimiser moves masked rows
  again, so the saved adapter would lack rows the trained one uses. ``save_adapter`` keeps exactly the
  rows whose singular value is non-zero in memory: a zero row adds nothing, any other row is kept.
  A module AdaLoRA pruned to rank 0 is saved with 0-row factors, which peft (0.21) takes for FSDP
  shards saved before gathering and warns about; ``save_adapter`` logs the pruned modules instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from delrec.errors import DelrecError

ADAPTER_NAME = "default"
log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_wrap():
    """peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model:
    a FutureWarning in every stage's log that says nothing about the run."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def save_adapter(peft_model, folder: str | os.PathLike) -> None:
    """``peft_model.save_pretrained(folder)``, with AdaLoRA's kept rows taken from the weights in memory."""
    config = peft_model.peft_config[ADAPTER_NAME]
    pruned: list[str] = []
    if config.peft_type == "ADALORA" and config.rank_pattern is not None:
        suffix = f"lora_E.{ADAPTER_NAME}"
        config.rank_pattern = {
            name.removesuffix(f".{ADAPTER_NAME}"): (param.detach().view(-1) != 0).tolist()
            for name, param in peft_model.base_model.model.named_parameters()
            if name.endswith(suffix)
        }
        pruned = [name.removesuffix(".lora_E") for name, keep in config.rank_pattern.items() if not any(keep)]
    with warnings.catch_warnings():
        # With whole factors in memory, a 0-row factor in the file comes from a rank-0 pattern, not a shard.
        if pruned and all(
            param.dim() == 2 and param.numel() > 0
            for name, param in peft_model.named_parameters()
            if ".lora_A." in name or ".lora_B." in name
        ):
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        peft_model.save_pretrained(folder)
    if pruned:
        log.info(
            "AdaLoRA pruned %d of %d adapted modules to rank 0 (saved as 0-row factors): %s",
            len(pruned),
            len(config.rank_pattern),
            ", ".join(pruned[:4]) + (", ..." if len(pruned) > 4 else ""),
        )


def load_adapter(model: torch.nn.Module, folder: str | os.PathLike):
    """The base ``model`` wrapped with the saved adapter in ``folder``, in eval mode, frozen.

    Every saved tensor must load into a module of its shape; a missing or unexpected adapter
    tensor is an error, not a warning.
    """
    from peft import PeftConfig, PeftModel, load_peft_weights, set_peft_model_state_dict

    folder = Path(folder)
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    pattern = config.rank_pattern if config.peft_type == "ADALORA" else None  # LoRA's means other things
    if pattern is not None:
        config.rank_pattern = None  # injected at init_r without peft's LoRA-pattern check ...
    with quiet_wrap():
        peft_model = PeftModel(model, config, ADAPTER_NAME)
    if pattern is not None:  # ... then cut to the saved rows, as peft's own loader does
        peft_model.base_model.resize_modules_by_rank_pattern(pattern, ADAPTER_NAME)
    device = next(model.parameters()).device
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(folder), device=str(device)))
    missing = [k for k in result.missing_keys if "lora_" in k and ".ranknum." not in k]
    if missing or result.unexpected_keys:
        raise DelrecError(
            f"adapter does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}",
            path=folder,
        )
    config.rank_pattern = pattern
    peft_model.eval()
    return peft_model
