"""benchmarks/delrec_ml100k.py: what it reuses from an earlier run in the same --work folder."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

from delrec import layout
from delrec.artifacts import write_manifest
from delrec.errors import DelrecError


def test_a_stage_is_reused_only_when_made_with_the_settings_asked_for(tmp_path):
    bench = load_benchmark("delrec_ml100k")
    data, model = tmp_path / "data", tmp_path / "delrec"
    data.mkdir()
    write_manifest(data, producer=layout.PREPROCESS, config={"dataset": "ml-100k"})
    ran = []

    def train():
        model.mkdir()
        write_manifest(model, producer=layout.FINETUNE, config={"seed": 42}, inputs={"dataset": data})
        ran.append("train")

    def stage(seed: int) -> float | None:
        return bench.run_stage(
            "finetune",
            model,
            train,
            producer=layout.FINETUNE,
            config={"seed": seed},
            inputs={"dataset": data},
        )

    assert stage(42) is not None and ran == ["train"]  # nothing there: it runs, timed
    assert stage(42) is None and ran == ["train"]  # same settings: reused, untimed
    with pytest.raises(DelrecError, match="config.seed.*seed=42, this run asks for seed=7"):
        stage(7)
    assert ran == ["train"]  # the older output is neither served nor replaced
