"""benchmarks/seeds.py: DELRec's differences over benchmark runs that differ only in stage 2's seed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import load_benchmark

from delrec import layout
from delrec.artifacts import write_manifest
from delrec.errors import DelrecError

FINETUNE_CONFIG = {"lr": 3e-4, "steps": 100, "popularity_prior_train": 0.8}


def _artifact(folder: Path, producer: str, config: dict, inputs: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    write_manifest(folder, producer=producer, config=config, inputs=inputs)
    return folder


@pytest.fixture
def upstream(tmp_path) -> dict[str, Path]:
    """The data, teacher and soft prompt every seed's run shares."""
    data = _artifact(tmp_path / "data", layout.PREPROCESS, {"dataset": "ml-100k"})
    teacher = _artifact(tmp_path / "teacher", layout.TRAIN_TEACHER, {"model": "sasrec"}, {"dataset": data})
    distill = _artifact(tmp_path / "distill", layout.DISTILL, {"steps": 60}, {"dataset": data})
    return {"dataset": data, "teacher": teacher, "distill": distill}


def _run(work: Path, upstream: dict, seed: int, ranks: dict, ablation_config: dict | None = None) -> Path:
    """A benchmark --work folder: both finetunes trained with ``seed``, and evaluate's ranks."""
    delrec = _artifact(work / "delrec", layout.FINETUNE, {**FINETUNE_CONFIG, "seed": seed}, upstream)
    ablation_config = {**FINETUNE_CONFIG, "seed": seed, **(ablation_config or {})}
    ablation = _artifact(work / "ablation", layout.FINETUNE, ablation_config, upstream)
    eval_dir = work / "eval"
    eval_dir.mkdir()
    pq.write_table(pa.table({"row": list(range(len(ranks["delrec"]))), **ranks}), eval_dir / layout.RANKS)
    inputs = {**upstream, "delrec": delrec, "ablation": ablation}
    write_manifest(
        eval_dir, producer=layout.EVALUATE, config={"split": "test", "zero_shot": seed == 1}, inputs=inputs
    )
    return work


def _ranks(delrec: list[int], ablation: list[int]) -> dict:
    return {"delrec": delrec, "ablation": ablation, "popularity": [1, 1, 1, 1], "teacher": [0, 0, 0, 1]}


def test_each_seeds_differences_and_their_mean_over_seeds(upstream, tmp_path):
    # seed 1: DELRec hits all 4 users, the ablation 2; seed 2: both hit 2 users
    one = _run(tmp_path / "w1", upstream, 1, _ranks([0, 0, 0, 0], [0, 0, 3, 3]))
    two = _run(tmp_path / "w2", upstream, 2, _ranks([0, 0, 5, 5], [0, 0, 3, 3]))
    out = tmp_path / "seeds.json"
    summary = load_benchmark("seeds").main([str(one), str(two), "--samples", "200", "--json", str(out)])
    assert [row["seed"] for row in summary["per_seed"]] == [1, 2]
    assert [row["HR@1"]["delrec"] for row in summary["per_seed"]] == [1.0, 0.5]
    assert [row["paired"]["ablation"]["HR@1"]["diff"] for row in summary["per_seed"]] == [0.5, 0.0]
    mean = summary["over_seeds"]["ablation"]["HR@1"]
    assert mean["diff"] == pytest.approx(0.25)
    assert mean["lo"] <= 0.0 and mean["hi"] >= 0.5  # the seeds disagree: the interval spans both
    between = summary["between_seeds"]["ablation"]["HR@1"]  # two seeds: 1 degree of freedom, t = 12.706
    assert between["diff"] == pytest.approx(0.25) and between["sd"] == pytest.approx(0.5**0.5 / 2)
    assert between["hi"] - 0.25 == pytest.approx(12.706 * 0.25)
    assert summary["over_seeds"]["teacher"]["HR@1"]["diff"] == pytest.approx(0.75 - 0.75)
    assert json.loads(out.read_text()) == summary


def test_runs_that_differ_in_more_than_the_seed_are_refused(upstream, tmp_path):
    script = load_benchmark("seeds")
    one = _run(tmp_path / "w1", upstream, 1, _ranks([0] * 4, [1] * 4))
    other_lr = _run(tmp_path / "w2", upstream, 2, _ranks([0] * 4, [1] * 4), {"lr": 1e-3})
    with pytest.raises(DelrecError, match=r"w2/ablation: field 'config.lr'"):
        script.main([str(one), str(other_lr)])
    same_seed = _run(tmp_path / "w3", upstream, 1, _ranks([0] * 4, [1] * 4))
    with pytest.raises(DelrecError, match=r"w3: field 'seed'.*same seed as"):
        script.main([str(one), str(same_seed)])


def test_the_t_interval_over_seeds_uses_students_quantile_at_any_number_of_seeds():
    t_interval = load_benchmark("seeds").t_interval
    three = t_interval([1.0, 2.0, 3.0])  # sd 1, t(2 df) = 4.303
    assert (three["diff"], three["sd"]) == (2.0, 1.0)
    assert three["hi"] - 2.0 == pytest.approx(4.303 / 3**0.5)
    # past the table (30 df) the expansion carries on from it: t(31 df) = 2.0395, t(60 df) = 2.0003
    for n, t in ((32, 2.0395), (61, 2.0003)):
        values = [0.0, 1.0] * (n // 2) + [0.5] * (n % 2)
        got = t_interval(values)
        assert (got["hi"] - got["diff"]) / (got["sd"] / n**0.5) == pytest.approx(t, abs=2e-4)
