"""KFP lightweight components, one module per pipeline stage.

Each body imports and calls the delrec library and nothing else: the container image (or, locally,
the current virtual environment) has delrec installed, so ``packages_to_install`` is empty. Inputs
and outputs are typed KFP artifacts; every stage logs its metrics (and its wall time) with
``log_metric`` so they show in the KFP UI, and writes them as JSON into its Metrics artifact's file
(kfp.local's cache serves no task an output of which has no file; the local run's table reads it).
Each output artifact's metadata holds ``content_fingerprint``, a hash of its files: kfp.local's cache
keys of downstream tasks see what a stage consumed, and the local cache checks a hit's files against it
(a cluster's cache key holds an input artifact's identity, not its metadata).
"""

from components.distill import distill
from components.evaluate import evaluate
from components.finetune import finetune
from components.prepare import prepare
from components.preprocess import preprocess
from components.publish import publish
from components.recommend import recommend
from components.train_teacher import train_teacher

__all__ = [
    "distill",
    "evaluate",
    "finetune",
    "prepare",
    "preprocess",
    "publish",
    "recommend",
    "train_teacher",
]
