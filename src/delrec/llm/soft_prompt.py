"""The soft prompt: n learned token embeddings spliced into a prompt's input embeddings at its marker."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from delrec import layout
from delrec.errors import DelrecError

SoftInit = Literal["normal", "vocab"]


class SoftPrompt(nn.Module):
    """``n_tokens`` x ``dim`` trainable embeddings.

    ``init="normal"`` draws N(0, 1) (the paper's); ``init="vocab"`` copies the embeddings of randomly
    chosen vocabulary tokens, which starts the prompt at the scale of real words.
    """

    def __init__(self, n_tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_tokens, dim))

    @property
    def n_tokens(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def initialised(
        cls, n_tokens: int, embeddings: nn.Embedding, init: SoftInit = "normal", seed: int = 0
    ) -> SoftPrompt:
        prompt = cls(n_tokens, embeddings.weight.shape[1])
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if init == "normal":
                prompt.weight.copy_(torch.randn(prompt.weight.shape, generator=gen))
            elif init == "vocab":
                rows = torch.randint(0, embeddings.weight.shape[0], (n_tokens,), generator=gen)
                prompt.weight.copy_(embeddings.weight.detach().float().cpu()[rows])
            else:
                raise DelrecError(
                    f"unknown soft prompt init {init!r}; expected normal or vocab", field="soft_init"
                )
        return prompt.to(embeddings.weight.device)

    def splice(self, embeds: torch.Tensor, soft_mask: torch.Tensor) -> torch.Tensor:
        """Replace the ``soft_mask`` positions of ``embeds`` (B, T, D) with the soft tokens, in order.

        Every row of ``soft_mask`` (B, T) holds either no True or exactly ``n_tokens`` contiguous ones.
        """
        counts = soft_mask.sum(dim=1)
        if not bool(((counts == 0) | (counts == self.n_tokens)).all()):
            raise ValueError(
                f"each prompt must hold 0 or {self.n_tokens} soft positions, got {counts.tolist()}"
            )
        rows = int((counts > 0).sum())
        if rows == 0:
            return embeds
        soft = self.weight.to(embeds.dtype).repeat(rows, 1)
        out = embeds.clone()
        out[soft_mask] = soft
        return out

    def save(self, folder: str | os.PathLike, **meta) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.weight.detach().float().cpu().contiguous()}, folder / layout.SOFT_PROMPT_WEIGHTS
        )
        config = {"n_tokens": self.n_tokens, "dim": self.weight.shape[1], **meta}
        (folder / layout.SOFT_PROMPT_JSON).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike, device: torch.device | str = "cpu") -> SoftPrompt:
        path = Path(folder) / layout.SOFT_PROMPT_WEIGHTS
        if not path.is_file():
            raise DelrecError(f"no {path.name}: expected the output of the distill stage", path=folder)
        weight = load_file(path)["weight"]
        prompt = cls(*weight.shape)
        with torch.no_grad():
            prompt.weight.copy_(weight)
        return prompt.to(device)
