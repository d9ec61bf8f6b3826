"""What ``pipeline.py run`` prints: the metrics tables, the stage table with each task's time, and one
line naming the task that failed."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

from delrec.pipeline_cache import VerifiedCache

# Display names, in the order the tables list them: kfp.local's task names (the graph's order), then
# the models of evaluate's metrics.json.
LABELS = {
    "prepare": "prepare",
    "preprocess": "preprocess",
    "train-teacher": "train_teacher",
    "distill": "distill",
    "finetune": "finetune",
    "finetune-2": "finetune (ablation)",
    "evaluate": "evaluate",
    "publish": "publish",
    "delrec": "DELRec",
    "teacher": "teacher",
    "popularity": "popularity",
    "ablation": "LLM, no soft prompt",
    "prompt_only": "LLM, untuned + soft prompt",
    "zero_shot": "LLM, untuned",
    "catalogue_teacher": "teacher",
    "catalogue_delrec": "teacher + DELRec rerank",
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TaskClock(logging.Filter):
    """Times each kfp.local task from its "Executing task" and "finished" log records (the whole
    subprocess: interpreter start, imports and the stage itself) and notes which were cache hits."""

    START = re.compile(r"Executing task '([^']+)'")
    END = re.compile(r"Task '([^']+)' finished with status")
    HIT = re.compile(r"Task '?([^' ]+?)'? cache hit \(key=([0-9a-f]+)\)")

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.hit_keys: dict[str, str] = {}
        """task -> the (shortened) key of the cache entry that served it"""

    def filter(self, record: logging.LogRecord) -> bool:
        message = ANSI.sub("", str(record.msg))
        if match := self.START.search(message):
            self.started[match[1]] = record.created
        elif (match := self.END.search(message)) and match[1] not in self.seconds:
            self.seconds[match[1]] = record.created - self.started.get(match[1], record.created)
        elif match := self.HIT.search(message):
            self.seconds[match[1]] = 0.0
            self.hit_keys[match[1]] = match[2]
        return True


class StageRow(NamedTuple):
    """One line of the run's stage table."""

    task: str
    status: str
    """ran | cached"""
    seconds: float
    """in this run: the task's process, or (cached) next to nothing"""
    stage_seconds: float | None
    """inside the stage function when it ran (the ``wall_seconds`` of its Metrics artifact)"""
    ran_in: str
    """the run folder that produced the outputs"""


def _read_metrics(path: str | Path) -> dict[str, float]:
    """A stage's Metrics artifact file (JSON); empty where it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def stage_rows(clock: TaskClock, cache: VerifiedCache | None, run_dir: Path | None) -> list[StageRow]:
    """Each task of a finished kfp.local run: ran or cached, its time, and its stage's own time."""
    rows = []
    rank = {task: i for i, task in enumerate(LABELS)}
    for task, seconds in sorted(clock.seconds.items(), key=lambda item: rank.get(item[0], len(rank))):
        if task in clock.hit_keys and cache is not None:
            key = clock.hit_keys[task]
            outputs = next((o for k, o in cache.hits.items() if k.startswith(key)), {})
            metrics = outputs.get("metrics")
            uri = Path(metrics.uri) if metrics is not None else None
            status = "cached"
        else:
            uri = run_dir / task / "metrics" if run_dir is not None else None
            status = "ran"
        wall = _read_metrics(uri).get("wall_seconds") if uri is not None else None
        ran_in = uri.parents[1].name if uri is not None else (run_dir.name if run_dir else "")
        rows.append(StageRow(task, status, seconds, wall, ran_in))
    return rows


def format_stage_table(rows: Sequence[StageRow], total: float) -> str:
    """The stage table: task, ran or cached, time in this run (and share), time inside the stage."""
    lines = [f"{'task':<20} {'status':<7} {'this run':>9} {'share':>6}   {'in stage':>9}  ran in"]
    for row in rows:
        label = LABELS.get(row.task, row.task)
        inside = f"{row.stage_seconds:7.1f} s" if row.stage_seconds is not None else f"{'':9}"
        share = 100 * row.seconds / total if total > 0 else 0.0
        lines.append(
            f"{label:<20} {row.status:<7} {row.seconds:7.1f} s {share:5.1f}%   {inside}  {row.ran_in}"
        )
    return "\n".join(lines)


def _metric_order(name: str) -> tuple[int, int]:
    """HR@k, then NDCG@k, then MRR, each by k: the paper's order, not the alphabet's."""
    family, _, k = name.partition("@")
    return {"HR": 0, "NDCG": 1, "MRR": 2}.get(family, 3), int(k) if k.isdigit() else 0


def format_metrics_table(models: dict[str, dict[str, float]]) -> str:
    """``{model: {metric: value}}`` (evaluate's metrics.json ``models``) as a models x metrics table."""
    names = dict.fromkeys(m for row in models.values() for m in row)
    columns = sorted(names, key=_metric_order)
    order = [m for m in LABELS if m in models] + [m for m in models if m not in LABELS]
    models = {m: models[m] for m in order}
    width = max(len(LABELS.get(m, m)) for m in models)
    lines = [" | ".join([f"{'model':<{width}}", *(f"{c:>8}" for c in columns)])]
    lines.append("-" * len(lines[0]))
    for model, row in models.items():
        cells = [f"{row[c]:>8.4f}" if c in row else f"{'':>8}" for c in columns]
        lines.append(" | ".join([f"{LABELS.get(model, model):<{width}}", *cells]))
    return "\n".join(lines)


def format_paired_table(paired: dict[str, dict[str, dict[str, float]]]) -> str:
    """evaluate's metrics.json ``paired`` section: one model minus another, difference [95% interval].

    A ``*`` marks an interval that excludes 0 (the paired bootstrap tells the two models apart).
    """
    # "<a>_minus_<b>" -> "DELRec - LLM, untuned"
    rows = {
        " - ".join(LABELS.get(m, m) for m in name.split("_minus_")): cells for name, cells in paired.items()
    }
    columns = sorted(dict.fromkeys(m for cells in rows.values() for m in cells), key=_metric_order)
    width = max(len(label) for label in rows)
    lines = [" | ".join([f"{'':<{width}}", *(f"{c:^24}" for c in columns)])]
    lines.append("-" * len(lines[0]))
    for label, cells in rows.items():
        out = []
        for c in columns:
            cell = cells[c]
            mark = "*" if cell["lo"] > 0 or cell["hi"] < 0 else " "
            out.append(f"{cell['diff']:+.3f} [{cell['lo']:+.3f}, {cell['hi']:+.3f}]{mark}")
        lines.append(" | ".join([f"{label:<{width}}", *out]))
    return "\n".join(lines)


def format_evaluation(report: dict) -> str:
    """evaluate's metrics.json as the run prints it: the candidate tables, then the whole-catalogue ones."""
    meta = report.get("meta", {})
    parts = [
        f"== DELRec metrics: {meta.get('dataset', '?')} {meta.get('split', '?')} split, "
        f"{meta.get('examples', '?')} examples, ranked within {meta.get('universe', '?')} ==",
        format_metrics_table({m: r["metrics"] for m, r in report["models"].items()}),
    ]
    if report.get("paired"):
        parts += [
            "\n== DELRec minus each model: difference [paired 95% bootstrap interval], * excludes 0 ==",
            format_paired_table(report["paired"]),
        ]
    if catalogue := report.get("catalogue"):
        parts += [
            f"\n== whole catalogue: the teacher alone vs the teacher's top {catalogue['k']} reranked by DELRec "
            f"(the target is in that top {catalogue['k']} for {100 * catalogue['target_in_topk']:.1f}% of users) ==",
            format_metrics_table({f"catalogue_{m}": r["metrics"] for m, r in catalogue["models"].items()}),
        ]
        if catalogue.get("paired"):
            parts += ["", format_paired_table(catalogue["paired"]).replace("DELRec - ", "rerank - ")]
    return "\n".join(parts)


class LastError:
    """A stdout wrapper that passes everything through and keeps the last exception line a task printed
    (kfp.local prints each task's output, traceback included, to stdout)."""

    LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(?P<name>[A-Za-z_]\w*(?:Error|Exception)): (?P<why>.+)$")

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.last, self._partial = stream, "", ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if match := self.LINE.match(ANSI.sub("", line).strip()):
                self.last = f"{match['name']}: {match['why']}"
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def failure_line(error: RuntimeError, why: str) -> str:
    """One line for a failed kfp.local run: the task, the reason, and what a newcomer can do."""
    message = ANSI.sub("", str(error))
    task = re.search(r"Inner task failed: '([^']+)'", message)
    name = LABELS.get(task[1], task[1]) if task else "a task"
    # The network hint only where the network failed: a parse error of a local copy needs its log.
    downloading = re.search(r"download failed|cannot download|URLError|object store failed", why or message)
    hint = (
        "no network? run on a local copy: make run DATA=path/to/ml-100k"
        if name == "preprocess" and downloading
        else "its log is above"
    )
    return f"task {name} failed: {why or message}; {hint}"
