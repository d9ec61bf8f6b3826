"""Evaluation: DELRec, the teacher, popularity, the no-soft-prompt ablation and the untuned LLM on the same
candidates, with paired intervals of DELRec's differences and the stages' learning curves."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from delrec.images import cpu_image


@dsl.component(base_image=cpu_image(), packages_to_install=[], install_kfp_package=False)
def evaluate(
    config: dict,
    dataset: Input[Dataset],
    teacher: Input[Model],
    delrec: Input[Model],
    ablation: Input[Model],
    evaluation: Output[Artifact],
    report: Output[Markdown],
    report_html: Output[HTML],
    metrics: Output[Metrics],
    distill: Input[Model] = None,
) -> dict:
    """Run ``delrec.evaluate.evaluate``; publish its report as Markdown and HTML (with the charts inline).

    ``distill`` (optional) only adds distill's learning curves to the report.
    Returns the flat metrics (the quality gate of the publish step reads them).
    """
    import base64
    import html
    import json
    import shutil
    import time
    from pathlib import Path

    from delrec.evaluate import EvaluateConfig
    from delrec.evaluate import evaluate as run
    from delrec.store import local_fingerprint

    started = time.perf_counter()
    config = EvaluateConfig.from_dict(config, source="evaluate config")
    result = run(
        dataset.path,
        teacher.path,
        config,
        evaluation.path,
        delrec.path,
        ablation_dir=ablation.path,
        distill_dir=distill.path if distill is not None else None,
    )
    flat = {k: float(v) for k, v in result.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for name, value in {**flat, "wall_seconds": time.perf_counter() - started}.items():
        metrics.log_metric(name, value)
    # A file as well as the metadata: kfp.local never serves a task from its cache when an output
    # artifact has no file, and the local run's table reads the metrics from it.
    Path(metrics.path).write_text(json.dumps(metrics.metadata, indent=2, sort_keys=True) + "\n")
    folder = Path(evaluation.path)
    shutil.copyfile(folder / "report.md", report.path)
    images = "".join(
        f'<p><img alt="{html.escape(png.name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}"/></p>'
        for png in sorted(folder.glob("*.png"))
    )
    body = html.escape((folder / "report.md").read_text())
    Path(report_html.path).write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>DELRec report</title></head>"
        f"<body><pre>{body}</pre>{images}</body></html>\n"
    )
    # Downstream cache keys and the local cache's check of a hit see what is inside each output.
    for output in (evaluation, report, report_html):
        output.metadata["content_fingerprint"] = local_fingerprint(output.path)
    return flat
