"""The artifact layout: every file and folder name a stage writes or reads, producer ids, manifest fields.

One module so that a writer and its readers can never disagree on a name. Stages import the names
from here; nothing else in the package spells them out.
"""

from __future__ import annotations

# ---- every artifact folder
MANIFEST = "manifest.json"
SCHEMA_VERSION = 2
"""2: the manifest records each file's sha256 and size (``files``); version 1 folders are refused."""

# Manifest fields.
M_SCHEMA = "schema_version"
M_PRODUCER = "producer"
M_ID = "id"
M_INPUTS = "inputs"
M_FILES = "files"
"""``{relative path: {"sha256": ..., "size": ...}}`` of every file in the folder but the manifest"""
M_CONFIG = "config"
M_CONFIG_HASH = "config_hash"
M_ROWS = "rows"
M_CREATED = "created"
M_VERSION = "delrec_version"

# ---- producer ids (the ``producer`` field of each stage's manifest)
PREPROCESS = "preprocess"
TRAIN_TEACHER = "train_teacher"
DISTILL = "distill"
FINETUNE = "finetune"
EVALUATE = "evaluate"
RECOMMEND = "recommend"
PRODUCERS = (PREPROCESS, TRAIN_TEACHER, DISTILL, FINETUNE, EVALUATE, RECOMMEND)

# ---- files shared by several stages
METRICS_JSON = "metrics.json"
HISTORY_JSON = "history.json"
STATS_JSON = "stats.json"
CONFIG_JSON = "config.json"

# ---- dataset (preprocess)
ITEMS = "items.parquet"
USERS = "users.parquet"
TRAIN_SEQUENCES = "train_sequences.parquet"
CANDIDATES = "candidates.parquet"

# ---- teacher
TEACHER_WEIGHTS = "model.safetensors"
TOPK = "topk.parquet"

# ---- distill / finetune
PROMPT_JSON = "prompt.json"
ADAPTER = "adapter"
SOFT_PROMPT_WEIGHTS = "soft_prompt.safetensors"
SOFT_PROMPT_JSON = "soft_prompt.json"
BACKBONE_DIR = "backbone"
"""a tiny test backbone travels with the artifacts in this folder, so later stages use its weights"""
BACKBONE_JSON = "backbone.json"
"""a saved backbone's name and weights fingerprint, beside its weights and tokenizer"""

# ---- evaluate
RANKS = "ranks.parquet"
CURVES_JSON = "curves.json"
RECOMMENDATIONS = "recommendations"  # recommend: a folder of part-NNNNN.parquet

# ---- resumable stages: ``<out>.partial/state.pt`` next to (not inside) the output
PARTIAL_SUFFIX = ".partial"
CHECKPOINT = "state.pt"
CHECKPOINT_TMP = CHECKPOINT + ".tmp"  # written first, then renamed to CHECKPOINT

# ---- temporary names beside an output (``.<name>.tmp-<host>-<pid>-<random>``), cleaned when stale
TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
