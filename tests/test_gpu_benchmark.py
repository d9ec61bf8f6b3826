"""benchmarks/gpu_delrec.py runs end to end on CPU with a tiny model (the GPU run uses the same code)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import load_benchmark

from delrec.errors import DelrecError


def test_gpu_recipe_runs_on_cpu_with_a_tiny_model(tmp_path):
    script = load_benchmark("gpu_delrec")
    args = [
        "--dataset", "synthetic", "--backbone", "tiny-llama", "--device", "cpu", "--work", str(tmp_path / "w"),
        "--soft-tokens", "4", "--distill-steps", "2", "--finetune-steps", "6", "--batch-size", "2",
        "--init-r", "4", "--eval-examples", "10", "--teacher-epochs", "1", "--json", str(tmp_path / "f.json"),
        "--set", "finetune.adalora_init=orthogonal",
    ]  # fmt: skip
    figures = script.main([*args, "--set", "finetune.lr=0.003"])
    assert set(figures["stages"]) == {"preprocess", "teacher", "distill", "finetune", "ablation", "evaluate"}
    # the LLM stages ran forwards through the backbone, so their FLOP counts are positive
    assert all(figures["stages"][s]["tflop"] > 0 for s in ("distill", "finetune", "ablation", "evaluate"))
    assert 0 <= figures["metrics"]["delrec_HR@1"] <= 1
    assert "prompt_only_minus_zero_shot_HR@1_lo" in figures["metrics"]  # stage 1 alone, paired
    assert json.loads((tmp_path / "f.json").read_text())["stages"] == figures["stages"]
    # --set reached the stage's config (the next GPU run tries the CPU preset's stage-2 recipe this way)
    trained = json.loads((tmp_path / "w" / "delrec" / "manifest.json").read_text())["config"]
    assert (trained["lr"], trained["adalora_init"]) == (0.003, "orthogonal")
    # the report draws all four learning curves, distill's two tasks included
    curves = json.loads((tmp_path / "w" / "evaluate" / "curves.json").read_text())
    assert set(curves) == {"distill_rps", "distill_ta", "finetune_delrec", "finetune_ablation"}

    # the same run again reuses every stage; one that asks for another stage-2 lr is refused, not served
    # the older model
    again = script.main([*args, "--set", "finetune.lr=0.003"])
    assert all(stage == {"reused": True} for stage in again["stages"].values())
    assert again["metrics"] == figures["metrics"]
    with pytest.raises(DelrecError, match="config.lr"):
        script.main([*args, "--set", "finetune.lr=0.001"])
    assert json.loads((tmp_path / "w" / "delrec" / "manifest.json").read_text())["config"]["lr"] == 0.003


def test_gpu_recipe_refuses_an_override_of_an_unknown_stage(tmp_path, capsys):
    script = load_benchmark("gpu_delrec")
    try:
        script.main(["--backbone", "tiny-llama", "--work", str(tmp_path / "w"), "--set", "teacher.lr=1"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("an unknown stage in --set was accepted")
    assert "teacher.lr" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_the_mfu_flop_count_stays_below_torchs_count_of_the_same_scoring(synthetic, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    from delrec.llm.scoring import score_all
    from delrec.llm.tasks import answers_of, stage2_instance
    from delrec.llm.templates import PromptBuilder, PromptSettings

    script = load_benchmark("gpu_delrec")
    for name in ("delrec.llm.backbone", "delrec.distill", "delrec.finetune", "delrec.evaluate"):
        module = importlib.import_module(name)  # instrument() patches these: restored after the test
        monkeypatch.setattr(module, "stage_backbone", module.stage_backbone)
    counter = script.TokenCounter()
    script.instrument(counter)
    backbone = script.backbone_module.stage_backbone(
        "tiny-llama", None, titles=synthetic.titles, device="cpu", autocast=False
    )
    builder = PromptBuilder.for_dataset(backbone, synthetic, teacher="", n_soft=0, settings=PromptSettings())
    test, candidates = synthetic.examples["test"], synthetic.candidates["test"]
    batch = [
        stage2_instance(
            builder, test.histories[i], int(test.targets[i]), candidates=candidates[i], soft=False
        )
        for i in range(4)
    ]
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        score_all(backbone, None, [inst.prompt for inst in batch], answers_of(builder, batch), batch_size=4)
    # It leaves out attention and most logits, so it may count less, never more (MFU is not flattered).
    assert 0.8 * flops.get_total_flops() <= counter.flops() <= flops.get_total_flops()
