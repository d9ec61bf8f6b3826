"""The three teacher models, in plain PyTorch: SASRec, GRU4Rec and Caser.

Every model reads left-padded item-id sequences (item 0 = padding, the most recent item last) and
scores items by a dot product with the item embedding table (shared between input and output, as
RecBole and the SASRec paper do). SASRec and GRU4Rec are causal, so one forward pass gives the
representation after every prefix of the window (``seq2seq = True``): training uses all positions at
once. Caser only sees its last ``window`` items and gives one representation per sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where a position sees only itself, earlier items and no padding."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (
            t.view(batch, length, self.heads, hidden // self.heads).transpose(1, 2)
            for t in self.qkv(x).split(hidden, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, hidden))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, hidden: int, heads: int, inner: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads, dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.mlp(self.ln2(x))


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley, 2018)."""

    seq2seq = True

    def __init__(
        self, num_items: int, max_len: int, hidden: int, layers: int, heads: int, inner: int, dropout: float
    ):
        super().__init__()
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        # Positions count back from the most recent item, which always sits at max_len - 1.
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, inner, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.apply(_init_weights)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, L) item ids -> (batch, L, hidden): position i represents the prefix ending at i."""
        length = seq.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        real = seq > 0
        positions = torch.arange(self.max_len - length, self.max_len, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(positions)
        x = self.drop(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        # Each position may attend to earlier real items, and always to itself (so a padding
        # position has a non-empty row and no NaN appears; its output is never used).
        allowed = (causal & real[:, None, None, :]) | torch.eye(length, dtype=torch.bool, device=seq.device)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln_f(x)

    def item_weights(self) -> torch.Tensor:
        return self.item_emb.weight


class GRU4Rec(nn.Module):
    """Session-based recommendation with a GRU (Hidasi et al., 2016; RecBole's variant)."""

    seq2seq = True

    def __init__(self, num_items: int, hidden: int, rnn_hidden: int, layers: int, dropout: float):
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, rnn_hidden, num_layers=layers, batch_first=True)
        self.out = nn.Linear(rnn_hidden, hidden)
        nn.init.xavier_normal_(self.item_emb.weight)
        _zero_padding(self.item_emb)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, L) item ids -> (batch, L, hidden): position i represents the prefix ending at i."""
        length = seq.shape[1]
        # Rotate each row so its items start at position 0: the GRU then reads no padding before
        # them (padding moves to the end, after every real item, where it changes nothing).
        pads = (seq == 0).sum(dim=1, keepdim=True)
        steps = torch.arange(length, device=seq.device)
        to_front = (steps + pads) % length
        hidden, _ = self.gru(self.drop(self.item_emb(seq.gather(1, to_front))))
        back = ((steps - pads) % length).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.out(hidden.gather(1, back))

    def item_weights(self) -> torch.Tensor:
        return self.item_emb.weight


class Caser(nn.Module):
    """Convolutional sequence embedding (Tang & Wang, 2018) over the last ``window`` items.

    Vertical filters weight the window's positions; horizontal filters of every height 1..window
    detect union-level patterns and are max-pooled over time. No user embedding: the model then
    also works for users it never saw in training (the ``user`` split).
    """

    seq2seq = False

    def __init__(
        self, num_items: int, hidden: int, window: int, vertical: int, horizontal: int, dropout: float
    ):
        super().__init__()
        self.window = window
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        # The paper's convolutions written as linear maps (same function, much faster backward on CPU):
        # a vertical filter mixes the window's positions; a horizontal filter of height h reads h
        # consecutive item embeddings at a time.
        self.vertical = nn.Linear(window, vertical)
        self.horizontal = nn.ModuleList(
            nn.Linear(height * hidden, horizontal) for height in range(1, window + 1)
        )
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(vertical * hidden + horizontal * window, hidden)
        nn.init.normal_(self.item_emb.weight, std=1.0 / hidden)
        _zero_padding(self.item_emb)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(batch, L) item ids, left-padded -> (batch, hidden) from the last ``window`` items."""
        seq = seq[:, -self.window :]
        if seq.shape[1] < self.window:
            seq = F.pad(seq, (self.window - seq.shape[1], 0))
        emb = self.item_emb(seq)  # (batch, window, hidden)
        vertical = self.vertical(emb.transpose(1, 2)).flatten(1)  # (batch, hidden * n_v)
        horizontal = []
        for height, linear in enumerate(self.horizontal, start=1):
            # (batch, window - height + 1, height * hidden): every run of ``height`` items
            runs = emb.unfold(1, height, 1).transpose(2, 3).flatten(2)
            horizontal.append(F.relu(linear(runs)).amax(dim=1))  # max-pool over time
        return F.relu(self.fc(self.drop(torch.cat([vertical, *horizontal], dim=1))))

    def item_weights(self) -> torch.Tensor:
        return self.item_emb.weight


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        _zero_padding(module)


def _zero_padding(embedding: nn.Embedding) -> None:
    """Re-initialisers overwrite the padding row; put it back to zero (its gradient stays zero)."""
    with torch.no_grad():
        embedding.weight[embedding.padding_idx].zero_()


def last_hidden(model: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """The representation after each (left-padded) sequence's most recent item: (batch, hidden)."""
    out = model(seq)
    return out[:, -1] if model.seq2seq else out
