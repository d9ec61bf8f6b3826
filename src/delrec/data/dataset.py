"""The Dataset artifact: the files the preprocess stage writes and every later stage reads.

Layout of a dataset folder (all ids are contiguous ints; item 0 is reserved for padding):

- ``items.parquet``: item_id (1..N), raw_id, title
- ``users.parquet``: user (0..U-1), raw_id, group (``train``/``valid``/``test`` under the ``user`` split,
  ``all`` under ``loo``)
- ``train_sequences.parquet``: user, items -- the only interactions a model may train on
- ``train.parquet``, ``valid.parquet``, ``test.parquet``: examples (user, history, target); ``history``
  is the most recent ``max_history`` items before the target, oldest first (a held-out user's whole
  history under the ``user`` split: it is all the artifact knows of that user)
- ``candidates.parquet``: split, row, user, candidates -- the fixed candidate set (target included,
  shuffled) of every validation and test example; ``row`` indexes the split's examples
- ``stats.json`` and ``manifest.json``
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from delrec import layout
from delrec.artifacts import read_manifest
from delrec.errors import DelrecError

PRODUCER = layout.PREPROCESS
SPLITS = ("train", "valid", "test")
EVAL_SPLITS = ("valid", "test")


@dataclass
class Examples:
    """Examples of one split: ``histories[i]`` (oldest first) -> ``targets[i]`` for ``users[i]``."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def left_padded(histories, max_len: int) -> np.ndarray:
    """Item sequences as an (n, max_len) int64 matrix, left-padded with 0, keeping the most recent items."""
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, hist in enumerate(histories):
        tail = hist[-max_len:]
        if len(tail):
            out[i, max_len - len(tail) :] = tail
    return out


@dataclass
class Dataset:
    """A loaded dataset folder."""

    path: Path
    name: str
    domain: str
    titles: list[str]  # titles[item_id]; titles[0] is "" (padding)
    raw_item_ids: list[str]
    train_sequences: list[np.ndarray]  # per user (index = user id); empty for held-out users
    examples: dict[str, Examples]
    candidates: dict[str, np.ndarray]  # split -> (len(examples[split]), num_candidates)
    manifest: dict

    @property
    def num_items(self) -> int:
        """Number of real items (ids 1..num_items)."""
        return len(self.titles) - 1

    @property
    def num_users(self) -> int:
        return len(self.train_sequences)


def _list_array(arrays: list[np.ndarray]) -> pa.Array:
    """A list<int32> array built from offsets and one flat buffer (no Python loop over the values)."""
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def _examples_table(examples: Examples) -> pa.Table:
    return pa.table(
        {
            "user": pa.array(examples.users, pa.int32()),
            "history": _list_array(examples.histories),
            "target": pa.array(examples.targets, pa.int32()),
        }
    )


def _read_list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<int> column as a list of numpy arrays, without a Python loop over the values."""
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int64)
    return np.split(values, offsets[1:-1]) if len(column) else []


def write_dataset_files(
    folder: Path,
    *,
    titles: list[str],
    raw_item_ids: list[str],
    raw_user_ids: list[str],
    user_groups: list[str],
    train_sequences: list[np.ndarray],
    examples: dict[str, Examples],
    candidates: dict[str, np.ndarray],
) -> None:
    """Write every Parquet file of a dataset folder (the caller writes stats and manifest)."""
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array(np.arange(1, len(titles) + 1), pa.int32()),
                "raw_id": pa.array(raw_item_ids, pa.string()),
                "title": pa.array(titles, pa.string()),
            }
        ),
        folder / layout.ITEMS,
    )
    pq.write_table(
        pa.table(
            {
                "user": pa.array(np.arange(len(raw_user_ids)), pa.int32()),
                "raw_id": pa.array(raw_user_ids, pa.string()),
                "group": pa.array(user_groups, pa.string()),
            }
        ),
        folder / layout.USERS,
    )
    pq.write_table(
        pa.table(
            {
                "user": pa.array(np.arange(len(train_sequences)), pa.int32()),
                "items": _list_array(train_sequences),
            }
        ),
        folder / layout.TRAIN_SEQUENCES,
    )
    for split in SPLITS:
        pq.write_table(_examples_table(examples[split]), folder / f"{split}.parquet")
    parts = []
    for split in EVAL_SPLITS:
        cands = candidates[split]
        parts.append(
            pa.table(
                {
                    "split": pa.array([split] * len(cands), pa.string()),
                    "row": pa.array(np.arange(len(cands)), pa.int32()),
                    "user": pa.array(examples[split].users, pa.int32()),
                    "candidates": _list_array(list(cands)),
                }
            )
        )
    pq.write_table(pa.concat_tables(parts), folder / layout.CANDIDATES)


def _int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


# The columns every reader relies on, and the type each must have.
_SCHEMAS: dict[str, dict[str, tuple[str, object]]] = {
    layout.ITEMS: {"title": ("string", _is_str), "raw_id": ("string", _is_str)},
    layout.TRAIN_SEQUENCES: {"items": ("list<int>", _int_list)},
    **{
        f"{split}.parquet": {
            "user": ("integer", pa.types.is_integer),
            "history": ("list<int>", _int_list),
            "target": ("integer", pa.types.is_integer),
        }
        for split in SPLITS
    },
    layout.CANDIDATES: {
        "split": ("string", _is_str),
        "row": ("integer", pa.types.is_integer),
        "candidates": ("list<int>", _int_list),
    },
}


def _read_checked(path: Path) -> pa.Table:
    """Read one Parquet file of a dataset folder and check its columns' names and types."""
    try:
        table = pq.read_table(path)
    except (FileNotFoundError, pa.ArrowInvalid, OSError) as exc:
        raise DelrecError(f"missing or unreadable dataset file ({exc})", path=path) from exc
    for name, (kind, ok) in _SCHEMAS[path.name].items():
        if name not in table.column_names:
            raise DelrecError(
                f"missing column (found: {', '.join(table.column_names)})", path=path, field=name
            )
        if not ok(table.schema.field(name).type):  # type: ignore[operator]
            raise DelrecError(f"expected {kind}, got {table.schema.field(name).type}", path=path, field=name)
    return table


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Load a dataset folder written by the preprocess stage, checking its manifest, files and columns."""
    path = Path(path)
    manifest = read_manifest(path, producer=PRODUCER)
    items = _read_checked(path / layout.ITEMS)
    seq_table = _read_checked(path / layout.TRAIN_SEQUENCES)
    examples = {}
    for split in SPLITS:
        table = _read_checked(path / f"{split}.parquet")
        examples[split] = Examples(
            users=table.column("user").to_numpy().astype(np.int64),
            histories=_read_list_column(table, "history"),
            targets=table.column("target").to_numpy().astype(np.int64),
        )
    cand_path = path / layout.CANDIDATES
    cand_table = _read_checked(cand_path)
    candidates = {}
    for split in EVAL_SPLITS:
        part = cand_table.filter(pa.compute.equal(cand_table.column("split"), split))
        rows = part.column("row").to_numpy()
        lists = _read_list_column(part, "candidates")
        if len({len(c) for c in lists}) > 1:
            raise DelrecError(
                f"{split}: candidate lists of different lengths", path=cand_path, field="candidates"
            )
        matrix = np.stack(lists) if lists else np.zeros((0, 0), dtype=np.int64)
        order = np.argsort(rows)
        if len(rows) != len(examples[split]) or not np.array_equal(rows[order], np.arange(len(rows))):
            raise DelrecError(
                f"candidate rows do not match the {len(examples[split])} {split} examples",
                path=cand_path,
                field="row",
            )
        candidates[split] = matrix[order]
    titles = [""] + items.column("title").to_pylist()
    return Dataset(
        path=path,
        name=manifest.get("dataset", path.name),
        domain=manifest.get("domain", "items"),
        titles=titles,
        raw_item_ids=[""] + items.column("raw_id").to_pylist(),
        train_sequences=_read_list_column(seq_table, "items"),
        examples=examples,
        candidates=candidates,
        manifest=manifest,
    )
