"""Preprocess: raw dataset (URL, local path or s3:// URI) -> Dataset artifact."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from delrec.images import cpu_image


@dsl.component(base_image=cpu_image(), packages_to_install=[], install_kfp_package=False)
def preprocess(
    config: dict,
    dataset: Output[Dataset],
    metrics: Output[Metrics],
    source: str = "",
    source_fingerprint: str = "",
):
    """Run ``delrec.data.preprocess``; ``source`` (if set: a path, URL or ``s3://`` URI) overrides the config's.

    ``source_fingerprint`` (a hash of a local source's contents) is only there to change the cache key
    when the files behind an unchanged path change.
    """
    import json
    import time
    from pathlib import Path

    from delrec.data import PreprocessConfig
    from delrec.data import preprocess as run
    from delrec.data.download import redact_url
    from delrec.store import local_fingerprint

    started = time.perf_counter()
    settings = dict(config)
    if source:
        settings["source"] = source
    stats = run(PreprocessConfig.from_dict(settings, source="preprocess config"), dataset.path)
    seconds = time.perf_counter() - started
    flat = {"users": stats["users"], "items": stats["items"], "interactions": stats["interactions"]}
    flat.update({f"examples/{split}": n for split, n in stats["examples"].items()})
    for name, value in {**flat, "wall_seconds": seconds}.items():
        metrics.log_metric(name, float(value))
    # A file as well as the metadata: kfp.local never serves a task from its cache when an output
    # artifact has no file, and the local run's table reads the metrics from it.
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2, sort_keys=True) + "\n")
    dataset.metadata.update(flat)
    dataset.metadata.update(
        source=redact_url(str(settings.get("source") or "")),  # no credentials in KFP metadata
        fingerprint=source_fingerprint,
        content_fingerprint=local_fingerprint(dataset.path),
    )
