"""Evaluate: every model on the same candidate sets, report files, input checks, the CLI."""

from __future__ import annotations

import json
import shutil

import pytest

from delrec.artifacts import file_sha256
from delrec.cli import main
from delrec.distill import DistillConfig, distill
from delrec.errors import DelrecError
from delrec.evaluate import EvaluateConfig, evaluate
from delrec.finetune import FinetuneConfig, finetune
from delrec.teachers import TeacherConfig, train_teacher

TINY = dict(backbone="tiny-llama", device="cpu", bf16=False, history_items=6)


@pytest.fixture(scope="module")
def runs(synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train_teacher(
        synthetic_dir,
        TeacherConfig(model="sasrec", hidden=16, inner=32, layers=1, max_epochs=2, device="cpu"),
        root / "teacher",
    )
    distill(
        synthetic_dir,
        root / "teacher",
        DistillConfig(**TINY, soft_tokens=8, steps=2, batch_size=2, eval_examples=4),
        root / "distill",
    )
    ft = FinetuneConfig(
        **TINY, init_r=8, target_r=4, steps=3, batch_size=2, warmup_steps=1, lr=1e-2, eval_examples=4
    )
    finetune(synthetic_dir, ft, root / "delrec", distill_dir=root / "distill")
    finetune(synthetic_dir, ft, root / "ablation")
    return root


def test_reports_every_model_on_the_same_candidates(synthetic_dir, runs, tmp_path):
    out = tmp_path / "eval"
    config = EvaluateConfig(**{k: TINY[k] for k in ("backbone", "device", "bf16")}, bootstrap_samples=50)
    flat = evaluate(synthetic_dir, runs / "teacher", config, out, runs / "delrec", runs / "ablation")
    for model in ("delrec", "teacher", "ablation", "zero_shot"):
        for metric in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR"):
            assert 0.0 <= flat[f"{model}_{metric}"] <= 1.0
    # The teacher re-scored here agrees with its own stage's figures on the same candidate sets.
    teacher = json.loads((runs / "teacher" / "metrics.json").read_text())["metrics"]
    for metric in ("HR@1", "HR@5", "NDCG@5", "MRR"):
        assert flat[f"teacher_{metric}"] == pytest.approx(teacher[f"test_cand_{metric}"])
    saved = json.loads((out / "metrics.json").read_text())
    low, high = saved["models"]["delrec"]["ci95"]["HR@5"]
    assert low <= flat["delrec_HR@5"] <= high
    report = (out / "report.md").read_text()
    assert "| DELRec |" in report and "| Untuned LLM |" in report and "metrics.png" in report
    assert (out / "metrics.png").stat().st_size > 1000 and (out / "ranks.parquet").is_file()


def test_catalogue_universe_and_first_token_scoring(synthetic_dir, runs, tmp_path):
    config = EvaluateConfig(
        **{k: TINY[k] for k in ("backbone", "device", "bf16")},
        universe="catalogue",
        scoring="first",
        max_examples=5,
        catalogue_chunk=25,
        zero_shot=False,
        bootstrap_samples=20,
    )
    flat = evaluate(synthetic_dir, runs / "teacher", config, tmp_path / "eval", runs / "delrec")
    assert "delrec_HR@1" in flat and "teacher_HR@10" in flat and "zero_shot_HR@1" not in flat


def test_refuses_an_ablation_on_other_base_weights(synthetic_dir, runs, tmp_path):
    other = tmp_path / "ablation"
    shutil.copytree(runs / "ablation", other)
    prompt = json.loads((other / "prompt.json").read_text())
    (other / "prompt.json").write_text(json.dumps({**prompt, "backbone_fingerprint": "0" * 16}))
    manifest = json.loads((other / "manifest.json").read_text())  # re-signed: past the integrity check
    size, sha = (other / "prompt.json").stat().st_size, file_sha256(other / "prompt.json")
    manifest["files"]["prompt.json"] = {"sha256": sha, "size": size}
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DelrecError, match="other base weights"):
        evaluate(
            synthetic_dir,
            runs / "teacher",
            EvaluateConfig(device="cpu", backbone="tiny-llama"),
            tmp_path / "e",
            runs / "delrec",
            other,
        )
    with pytest.raises(DelrecError, match="soft prompt"):
        evaluate(
            synthetic_dir,
            runs / "teacher",
            EvaluateConfig(device="cpu", backbone="tiny-llama"),
            tmp_path / "e",
            runs / "ablation",
        )
    assert not (tmp_path / "e").exists()


def test_cli_runs_the_stage_and_reports_bad_config(synthetic_dir, runs, tmp_path, capsys):
    args = [
        "evaluate",
        "--data",
        str(synthetic_dir),
        "--teacher",
        str(runs / "teacher"),
        "--delrec",
        str(runs / "delrec"),
    ]
    args += ["--out", str(tmp_path / "eval"), "--backbone", "tiny-llama", "--device", "cpu", "--no-bf16"]
    assert (
        main([*args, "--set", "max_examples=4", "--set", "zero_shot=false", "--set", "bootstrap_samples=20"])
        == 0
    )
    assert "delrec_HR@1" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--set", "scoring=best"]) == 2
    assert "scoring" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_delrec_beats_chance_on_synthetic(synthetic_dir, runs, tmp_path):
    """After stage 2 a tiny random Llama ranks the synthetic test targets first far above 1/20.

    The synthetic titles name their theme and users mostly stay in one theme, so the model can learn
    to prefer candidates whose title words appear in the history. ~40 s on one thread.
    """
    small = dict(TINY, history_items=4)
    distill(
        synthetic_dir,
        runs / "teacher",
        DistillConfig(**small, soft_tokens=8, steps=3, batch_size=4, eval_examples=4),
        tmp_path / "d",
    )
    config = FinetuneConfig(
        **small,
        init_r=32,
        target_r=8,
        steps=160,
        batch_size=8,
        warmup_steps=16,
        lr=2e-2,
        eval_every=1000,
        eval_examples=8,
    )
    finetune(synthetic_dir, config, tmp_path / "ft", distill_dir=tmp_path / "d")
    eval_config = EvaluateConfig(
        **{k: TINY[k] for k in ("backbone", "device", "bf16")}, zero_shot=False, batch_size=16
    )
    flat = evaluate(synthetic_dir, runs / "teacher", eval_config, tmp_path / "eval", tmp_path / "ft")
    low = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]["delrec"]["ci95"]["HR@1"][0]
    print(f"tiny DELRec test HR@1 {flat['delrec_HR@1']:.4f} (95% CI low {low:.4f})")
    assert flat["delrec_HR@1"] >= 0.12 and low > 0.05, flat


def test_adapters_load_and_unload_cleanly(synthetic, runs):
    from delrec.evaluate import _load_adapter, _unload_adapter
    from delrec.llm.backbone import load_backbone
    from delrec.llm.scoring import score_all
    from delrec.llm.templates import PromptBuilder

    backbone = load_backbone(str(runs / "ablation" / "backbone"), device="cpu", autocast=False)
    builder = PromptBuilder(
        backbone, synthetic.titles, domain="movies", teacher="", n_soft=0, history_items=6
    )
    test = synthetic.examples["test"]
    prompts = [
        builder.stage2(test.histories[i], synthetic.candidates["test"][i], soft=False) for i in range(3)
    ]
    answers = [[builder.answer(int(c)) for c in synthetic.candidates["test"][i]] for i in range(3)]
    base = score_all(backbone, None, prompts, answers)
    _load_adapter(backbone, runs / "ablation")
    tuned = score_all(backbone, None, prompts, answers)
    _unload_adapter(backbone)
    assert abs(tuned - base).max() > 1e-5  # the fine-tuned adapter is in use
    assert abs(score_all(backbone, None, prompts, answers) - base).max() == 0  # and gone again
