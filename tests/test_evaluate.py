"""Evaluate: every model on the same candidate sets, report files, input checks, the CLI."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import shared_dataset, with_prompt_fields

from delrec import evaluate as evaluate_module
from delrec.cli import main
from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.distill import DistillConfig, distill
from delrec.errors import DelrecError
from delrec.evaluate import (
    REPORTED,
    EvaluateConfig,
    evaluate,
    learning_curves,
    popularity_ranks,
    reranked_target_ranks,
    teacher_topk,
)
from delrec.finetune import FinetuneConfig, finetune
from delrec.metrics import metrics_from_ranks, target_ranks
from delrec.popularity import fit_prior_weight, item_counts, log_counts, with_prior

TINY = dict(backbone="tiny-llama", device="cpu", bf16=False, history_items=6)


def test_reports_every_model_on_the_same_candidates(synthetic_dir, tiny_runs, tmp_path):
    out = tmp_path / "eval"
    config = EvaluateConfig(**{k: TINY[k] for k in ("backbone", "device", "bf16")}, bootstrap_samples=50)
    flat = evaluate(
        synthetic_dir,
        tiny_runs / "teacher",
        config,
        out,
        tiny_runs / "delrec",
        tiny_runs / "ablation",
        distill_dir=tiny_runs / "distill",
    )
    for model in ("delrec", "teacher", "popularity", "ablation", "zero_shot"):
        for metric in REPORTED:
            assert 0.0 <= flat[f"{model}_{metric}"] <= 1.0
    # The teacher re-scored here agrees with its own stage's figures on the same candidate sets.
    teacher = json.loads((tiny_runs / "teacher" / "metrics.json").read_text())["metrics"]
    for metric in ("HR@1", "HR@5", "NDCG@5", "MRR"):
        assert flat[f"teacher_{metric}"] == pytest.approx(teacher[f"test_cand_{metric}"])
    saved = json.loads((out / "metrics.json").read_text())
    low, high = saved["models"]["delrec"]["ci95"]["HR@5"]
    assert low <= flat["delrec_HR@5"] <= high
    # Paired differences: DELRec minus every other model, for every reported metric, also flat.
    for other in ("ablation", "zero_shot", "teacher", "popularity"):
        for metric in REPORTED:
            cell = saved["paired"][f"delrec_minus_{other}"][metric]
            assert cell["diff"] == pytest.approx(flat[f"delrec_{metric}"] - flat[f"{other}_{metric}"])
            assert flat[f"delrec_minus_{other}_{metric}_lo"] == cell["lo"] <= cell["diff"] <= cell["hi"]
            assert flat[f"delrec_minus_{other}_{metric}_hi"] == cell["hi"]
    report = (out / "report.md").read_text()
    for row in ("| DELRec |", "| Untuned LLM |", "| Popularity |", "metrics.png", "curves.png"):
        assert row in report
    assert (
        "| difference |" in report
        and "| DELRec - LLM w/o soft prompt | " in report.split("| difference |")[1]
    )
    assert "prompt_only_HR@1" not in flat  # off unless asked for: it costs a model's scoring
    assert (out / "metrics.png").stat().st_size > 1000 and (out / "ranks.parquet").is_file()
    # Learning curves of distill's two tasks and both finetunes, as data and drawn.
    curves = json.loads((out / "curves.json").read_text())
    assert set(curves) == {"distill_ta", "distill_rps", "finetune_delrec", "finetune_ablation"}
    assert [s for s, _ in curves["finetune_delrec"]["loss"]] == [1, 2, 3]
    assert curves["finetune_delrec"]["valid"][0][0] == 0 and curves["distill_rps"]["valid"]
    assert (out / "curves.png").stat().st_size > 1000
    # The whole-catalogue protocol: the teacher alone matches its own stage's full-ranking figure; DELRec
    # reranks the teacher's top 20, so a target outside it keeps the teacher's rank.
    assert flat["catalogue_teacher_HR@10"] == pytest.approx(teacher["test_HR@10"])
    assert flat["catalogue_teacher_NDCG@10"] == pytest.approx(teacher["test_NDCG@10"])
    assert flat["catalogue_delrec_minus_teacher_HR@10"] == pytest.approx(
        flat["catalogue_delrec_HR@10"] - flat["catalogue_teacher_HR@10"]
    )
    ranks = pq.read_table(out / "ranks.parquet").to_pydict()
    outside = [t >= 20 for t in ranks["catalogue_teacher"]]
    assert any(outside) and not all(outside)
    delrec, teacher_ranks = np.array(ranks["catalogue_delrec"]), np.array(ranks["catalogue_teacher"])
    assert (delrec[outside] == teacher_ranks[outside]).all()
    assert (delrec[~np.array(outside)] < 20).all()
    assert saved["catalogue"]["target_in_topk"] == pytest.approx(1 - np.mean(outside))
    assert "## The whole catalogue: the teacher retrieves, DELRec reranks" in report
    assert "| Teacher + DELRec rerank |" in report


def test_reranking_reorders_only_the_teachers_top_k():
    # items 1..6 (column 0 is padding); the teacher prefers 6 > 5 > 4 > 3 > 2 > 1
    item_scores = np.array([[-np.inf, 1, 2, 3, 4, 5, 6]] * 3, dtype=np.float64)
    topk = teacher_topk(item_scores, 3)
    assert topk.tolist() == [[6, 5, 4]] * 3
    # the LLM reverses the teacher's top 3: 4 > 5 > 6
    llm = np.array([[0.1, 0.2, 0.9]] * 3)
    targets = np.array([4, 6, 2])
    # 4: first after reranking; 6: third; 2 is outside the top 3 and keeps the teacher's rank (4, 0-based)
    assert reranked_target_ranks(item_scores, topk, llm, targets).tolist() == [0, 2, 4]


def test_a_target_tied_into_the_top_k_by_item_id_is_not_moved_by_the_rerank():
    # Items 3, 4 and 5 tie for the second place; the top 2 holds 3 by its lower id. The teacher ranks a
    # tied target below the others (rank 3, 0-based), so a rerank that puts it first gains by a tie.
    item_scores = np.array([[-np.inf, 1, 2, 5, 5, 5, 6]] * 2)
    topk = teacher_topk(item_scores, 2)
    assert topk.tolist() == [[6, 3]] * 2
    llm = np.array([[0.1, 0.9]] * 2)  # the LLM prefers the second of the top 2
    targets = np.array([3, 6])
    assert evaluate_module.retrieved(item_scores, topk, targets).tolist() == [False, True]
    assert reranked_target_ranks(item_scores, topk, llm, targets).tolist() == [3, 1]


def test_the_rerank_scores_only_retrieved_targets_and_ranks_as_reranking_every_example(
    synthetic_dir, synthetic, tiny_runs, tmp_path, monkeypatch
):
    config = EvaluateConfig(
        **{k: TINY[k] for k in ("backbone", "device", "bf16")}, bootstrap_samples=20, zero_shot=False
    )
    rows = evaluate_module._chosen_rows(synthetic, config, synthetic_dir)
    teacher_scores = evaluate_module._teacher_scores(synthetic, tiny_runs / "teacher", "test", rows)
    topk = teacher_topk(teacher_scores, config.rerank_k)
    scored, everyone = [], {}
    score = evaluate_module._LLMRanker.candidate_scores

    def spy(self, backbone, soft, prompt_config, candidates, desc):
        if desc == "DELRec rerank":  # also score every example's top K, as a rerank of all would
            scored.append(self.rows)
            all_rows = evaluate_module._LLMRanker(self.dataset, self.config, "test", rows)
            everyone["scores"] = score(all_rows, backbone, soft, prompt_config, topk, desc)
        return score(self, backbone, soft, prompt_config, candidates, desc)

    monkeypatch.setattr(evaluate_module._LLMRanker, "candidate_scores", spy)
    evaluate(synthetic_dir, tiny_runs / "teacher", config, tmp_path / "eval", tiny_runs / "delrec")
    ranks = pq.read_table(tmp_path / "eval" / "ranks.parquet").to_pydict()
    retrieved = np.array(ranks["catalogue_teacher"]) < config.rerank_k
    assert 0 < retrieved.sum() < len(rows)
    assert np.array_equal(scored[0], rows[retrieved])
    targets = synthetic.examples["test"].targets[rows]
    expected = reranked_target_ranks(teacher_scores, topk, everyone["scores"], targets)
    assert ranks["catalogue_delrec"] == expected.tolist()


def test_the_report_states_chance_for_its_candidates_and_draws_intervals_that_miss_their_value(tmp_path):
    from delrec.evaluate import write_report

    # A percentile interval of few resamples can lie wholly above its value (seen with 10 resamples).
    results = {
        "delrec": {"metrics": dict.fromkeys(REPORTED, 0.2), "ci95": dict.fromkeys(REPORTED, (0.25, 0.45))}
    }
    meta = {"dataset": "d", "split": "test", "examples": 5, "universe": "candidates", "candidates": 10}
    meta |= {"scoring": "mean", "backbone": "b", "teacher": "SASRec"}
    write_report(tmp_path, results, meta)
    assert "Chance level of HR@1 with 10 candidates: 0.100." in (tmp_path / "report.md").read_text()
    assert (tmp_path / "metrics.png").stat().st_size > 0
    write_report(tmp_path, results, meta | {"universe": "catalogue", "candidates": None})
    assert "Chance level" not in (tmp_path / "report.md").read_text()


def test_popularity_ranks_by_training_interactions(synthetic):
    counts = item_counts(synthetic)
    assert counts[0] == 0 and counts.sum() == sum(len(s) for s in synthetic.train_sequences)
    rows = np.arange(len(synthetic.examples["test"]))
    ranks = popularity_ranks(synthetic, "test", rows)
    cands = synthetic.candidates["test"]
    target_count = counts[synthetic.examples["test"].targets]
    # Pessimistic ties: the target's rank counts every other candidate seen at least as often.
    assert ranks.tolist() == ((counts[cands] >= target_count[:, None]).sum(axis=1) - 1).tolist()


@pytest.mark.shared_data
def test_popularity_on_ml100k_matches_the_issue_figures(tmp_path):
    """Popularity on ML-100K's stored candidates (loo split, seed 42): the yardstick the LLM must beat."""
    source = shared_dataset("ml-100k")
    preprocess(PreprocessConfig(dataset="ml-100k", source=str(source)), tmp_path / "ml-100k")
    dataset = load_dataset(tmp_path / "ml-100k")
    expected = {"test": (0.235, 0.665), "valid": (0.280, 0.683)}
    for split, (hr1, hr5) in expected.items():
        rows = np.arange(len(dataset.examples[split]))
        assert len(rows) == 943
        metrics = metrics_from_ranks(popularity_ranks(dataset, split, rows))
        assert (round(metrics["HR@1"], 3), round(metrics["HR@5"], 3)) == (hr1, hr5), split


def test_missing_histories_only_drop_their_curves(tiny_runs, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "history.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="delrec.evaluate"):
        curves = learning_curves(
            {"distill": tmp_path / "absent", "delrec": tiny_runs / "delrec", "ablation": broken}
        )
    assert set(curves) == {"finetune_delrec"}
    assert "absent" in caplog.text and "broken" in caplog.text


def test_catalogue_universe_ranks_every_item_with_first_token_scoring(
    synthetic_dir, synthetic, tiny_runs, tmp_path, monkeypatch
):
    """``universe="catalogue"`` scores every catalogue item for each example (in chunks) with the
    configured reduction, and DELRec's ranks are the target's among all items less the history."""
    calls = []
    real = evaluate_module.score_all

    def recording(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append((kwargs["desc"], kwargs["reduction"], len(args[3][0]), scores))
        return scores

    monkeypatch.setattr(evaluate_module, "score_all", recording)
    listed = []
    stage2 = evaluate_module.PromptBuilder.stage2

    def listing(self, history, candidates, **kwargs):
        listed.append(np.asarray(candidates))
        return stage2(self, history, candidates, **kwargs)

    monkeypatch.setattr(evaluate_module.PromptBuilder, "stage2", listing)
    config = EvaluateConfig(
        **{k: TINY[k] for k in ("backbone", "device", "bf16")},
        universe="catalogue",
        scoring="first",
        max_examples=5,
        catalogue_chunk=25,
        zero_shot=False,
        bootstrap_samples=20,
    )
    flat = evaluate(synthetic_dir, tiny_runs / "teacher", config, tmp_path / "eval", tiny_runs / "delrec")
    assert "delrec_HR@1" in flat and "teacher_HR@10" in flat and "zero_shot_HR@1" not in flat
    meta = json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]
    assert (meta["universe"], meta["scoring"]) == ("catalogue", "first")
    assert {reduction for _, reduction, _, _ in calls} == {"first"}
    # DELRec's catalogue passes (not the rerank of the teacher's top K): chunks of 25 covering all items.
    chunks = [
        (width, scores)
        for desc, _, width, scores in calls
        if desc.startswith("DELRec ") and "rerank" not in desc
    ]
    num_items = synthetic.num_items
    assert [width for width, _ in chunks] == [min(25, num_items - s) for s in range(0, num_items, 25)]
    item_scores = np.concatenate([scores for _, scores in chunks], axis=1)  # columns = items 1..N
    # Only the first token counts: titles that start with the same word score the same.
    first_words = np.array([title.split()[0] for title in synthetic.titles[1:]])
    for word in set(first_words):
        same = item_scores[:, first_words == word]
        assert (same == same[:, :1]).all()
    assert len(set(first_words)) > 1 and len(np.unique(item_scores[0])) > 1
    ranks = pq.read_table(tmp_path / "eval" / "ranks.parquet").to_pydict()
    examples = synthetic.examples["test"]
    expected = []
    for row, scores in zip(ranks["row"], item_scores, strict=True):
        scores = scores.astype(np.float64)
        scores[examples.histories[row] - 1] = -np.inf  # the user's own history is never recommended
        expected.append(int((scores >= scores[examples.targets[row] - 1]).sum()) - 1)
    assert ranks["delrec"] == expected
    # Ranks past the 20-candidate universe: these really are catalogue ranks.
    assert max(ranks["delrec"]) >= 20 and max(ranks["teacher"]) >= 20
    # The prompts list the teacher's top 20, not the stored candidates (each holds its target).
    rows = np.asarray(ranks["row"])
    teacher_scores = evaluate_module._teacher_scores(synthetic, tiny_runs / "teacher", "test", rows)
    assert np.array_equal(np.stack(listed[: len(rows)]), teacher_topk(teacher_scores, 20))


def test_each_model_is_scored_as_it_was_fine_tuned_unless_the_config_says(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    """DELRec trained with ``sum`` is scored with ``sum`` (so are its rerank and the untuned LLM, its
    reference), the ablation with its own ``mean``; ``scoring`` in the config overrides both."""
    delrec_dir = with_prompt_fields(tiny_runs / "delrec", tmp_path / "delrec", scoring="sum")
    used = []
    real = evaluate_module.score_all

    def recording(*args, **kwargs):
        used.append((kwargs["desc"].split()[0], kwargs["reduction"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "score_all", recording)
    base = {k: TINY[k] for k in ("backbone", "device", "bf16")} | {"max_examples": 6, "bootstrap_samples": 20}
    args = (synthetic_dir, tiny_runs / "teacher")
    evaluate(*args, EvaluateConfig(**base), tmp_path / "eval", delrec_dir, tiny_runs / "ablation")
    # "DELRec" covers the rerank of the teacher's top K too (desc "DELRec rerank").
    assert set(used) == {("DELRec", "sum"), ("ablation", "mean"), ("zero-shot", "sum")}
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["meta"]["scoring"] == "sum"
    used.clear()
    config = EvaluateConfig(**base, scoring="mean")
    evaluate(*args, config, tmp_path / "eval2", delrec_dir, tiny_runs / "ablation")
    assert {reduction for _, reduction in used} == {"mean"}


def test_refuses_an_ablation_on_other_base_weights(synthetic_dir, tiny_runs, tmp_path):
    other = with_prompt_fields(tiny_runs / "ablation", tmp_path / "ablation", backbone_fingerprint="0" * 16)
    with pytest.raises(DelrecError, match="other base weights"):
        evaluate(
            synthetic_dir,
            tiny_runs / "teacher",
            EvaluateConfig(device="cpu", backbone="tiny-llama"),
            tmp_path / "e",
            tiny_runs / "delrec",
            other,
        )
    with pytest.raises(DelrecError, match="soft prompt"):
        evaluate(
            synthetic_dir,
            tiny_runs / "teacher",
            EvaluateConfig(device="cpu", backbone="tiny-llama"),
            tmp_path / "e",
            tiny_runs / "ablation",
        )
    assert not (tmp_path / "e").exists()


def test_refuses_a_teacher_other_than_the_one_delrec_was_distilled_from(synthetic_dir, tiny_runs, tmp_path):
    from delrec.teachers import TeacherConfig, train_teacher

    tiny = dict(hidden=16, inner=32, layers=1, max_epochs=1, device="cpu")
    train_teacher(synthetic_dir, TeacherConfig(model="gru4rec", **tiny), tmp_path / "gru4rec")
    train_teacher(synthetic_dir, TeacherConfig(model="sasrec", seed=7, **tiny), tmp_path / "sasrec")
    config = EvaluateConfig(device="cpu", backbone="tiny-llama")
    runs = {"delrec_dir": tiny_runs / "delrec", "distill_dir": tiny_runs / "distill"}
    with pytest.raises(
        DelrecError, match="distilled from a SASRec teacher, but the teacher given is a GRU4Rec"
    ):
        evaluate(synthetic_dir, tmp_path / "gru4rec", config, tmp_path / "e", tiny_runs / "delrec")
    with pytest.raises(DelrecError, match="was built from teacher") as caught:  # same kind, another model
        evaluate(synthetic_dir, tmp_path / "sasrec", config, tmp_path / "e", **runs)
    assert caught.value.field == "inputs.teacher"
    from delrec.distill import DistillConfig, distill

    tiny_llm = dict(backbone="tiny-llama", device="cpu", bf16=False, history_items=6, eval_examples=4)
    distill(
        synthetic_dir,
        tiny_runs / "teacher",
        DistillConfig(**tiny_llm, soft_tokens=8, steps=1),
        tmp_path / "d2",
    )
    with pytest.raises(DelrecError, match="was built from distill"):  # curves of another soft prompt
        evaluate(
            synthetic_dir,
            tiny_runs / "teacher",
            config,
            tmp_path / "e",
            runs["delrec_dir"],
            distill_dir=tmp_path / "d2",
        )
    assert not (tmp_path / "e").exists()


def test_cli_runs_the_stage_and_reports_bad_config(synthetic_dir, tiny_runs, tmp_path, capsys):
    args = [
        "evaluate",
        "--data",
        str(synthetic_dir),
        "--teacher",
        str(tiny_runs / "teacher"),
        "--delrec",
        str(tiny_runs / "delrec"),
    ]
    args += ["--out", str(tmp_path / "eval"), "--backbone", "tiny-llama", "--device", "cpu", "--no-bf16"]
    assert (
        main([*args, "--set", "max_examples=4", "--set", "zero_shot=false", "--set", "bootstrap_samples=20"])
        == 0
    )
    assert "delrec_HR@1" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--set", "scoring=best"]) == 2
    assert "scoring" in capsys.readouterr().err
    # The error names every layer the config came from, not only the preset.
    assert main([*args, "--preset", "demo", "--set", "scoring=best"]) == 2
    assert "error: preset demo + command line: invalid EvaluateConfig: scoring" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_delrec_beats_chance_on_synthetic(synthetic_dir, tiny_runs, tmp_path):
    """After stage 2 a tiny random Llama ranks the synthetic test targets first far above 1/20.

    The synthetic titles name their theme and users mostly stay in one theme, so the model can learn
    to prefer candidates whose title words appear in the history. ~40 s on one thread.
    """
    small = dict(TINY, history_items=4)
    distill(
        synthetic_dir,
        tiny_runs / "teacher",
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
    flat = evaluate(synthetic_dir, tiny_runs / "teacher", eval_config, tmp_path / "eval", tmp_path / "ft")
    low = json.loads((tmp_path / "eval" / "metrics.json").read_text())["models"]["delrec"]["ci95"]["HR@1"][0]
    print(f"tiny DELRec test HR@1 {flat['delrec_HR@1']:.4f} (95% CI low {low:.4f})")
    assert flat["delrec_HR@1"] >= 0.12 and low > 0.05, flat


def test_adapters_load_and_unload_cleanly(synthetic, tiny_runs):
    from delrec.evaluate import _unload_adapter, load_finetuned_adapter
    from delrec.llm.backbone import load_backbone
    from delrec.llm.scoring import score_all
    from delrec.llm.templates import PromptBuilder, PromptSettings

    backbone = load_backbone(str(tiny_runs / "ablation" / "backbone"), device="cpu", autocast=False)
    builder = PromptBuilder(
        backbone,
        synthetic.titles,
        domain="movies",
        teacher="",
        n_soft=0,
        settings=PromptSettings(history_items=6),
    )
    test = synthetic.examples["test"]
    prompts = [
        builder.stage2(test.histories[i], synthetic.candidates["test"][i], soft=False) for i in range(3)
    ]
    answers = [[builder.answer(int(c)) for c in synthetic.candidates["test"][i]] for i in range(3)]
    base = score_all(backbone, None, prompts, answers)
    load_finetuned_adapter(backbone, tiny_runs / "ablation")
    tuned = score_all(backbone, None, prompts, answers)
    _unload_adapter(backbone)
    assert abs(tuned - base).max() > 1e-5  # the fine-tuned adapter is in use
    assert abs(score_all(backbone, None, prompts, answers) - base).max() == 0  # and gone again


def test_evaluated_adapter_is_the_trained_one(synthetic_dir, tiny_runs, tmp_path, monkeypatch, recwarn):
    """evaluate's ranks on finetune's validation examples are those of the fine-tuned model in memory,
    with AdaLoRA rows pruned, and peft does not warn that the rank pattern was ignored; the popularity
    prior saved is the one fitted on those examples' scores, and evaluate adds it."""
    import delrec.finetune as finetune_module
    from delrec.llm.scoring import score_all
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.templates import PromptBuilder, PromptSettings

    trained = {}

    def keep_backbone(*args, **kwargs):
        trained["backbone"] = stage_backbone(*args, **kwargs)
        return trained["backbone"]

    stage_backbone = finetune_module.stage_backbone
    monkeypatch.setattr(finetune_module, "stage_backbone", keep_backbone)
    config = FinetuneConfig(
        **TINY,
        init_r=8,
        target_r=2,
        steps=8,
        tinit=1,
        tfinal=2,
        batch_size=2,
        lr=5e-2,
        warmup_steps=1,
        popularity_prior=True,
    )
    finetune(
        synthetic_dir, config.model_copy(update={"eval_examples": 12}), tmp_path / "ft", tiny_runs / "distill"
    )
    pattern = json.loads((tmp_path / "ft" / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
    assert not all(all(rows) for rows in pattern.values())  # rows were pruned: the case that warned

    eval_config = EvaluateConfig(
        **{k: TINY[k] for k in ("backbone", "device", "bf16")}, split="valid", zero_shot=False
    )
    recwarn.clear()
    evaluate(synthetic_dir, tiny_runs / "teacher", eval_config, tmp_path / "eval", tmp_path / "ft")
    assert not [w for w in recwarn if "did not match any targeted module" in str(w.message)]
    evaluated = pq.read_table(tmp_path / "eval" / "ranks.parquet").column("delrec").to_numpy()

    data = load_dataset(synthetic_dir)
    backbone = trained["backbone"]  # the peft model as training left it
    soft = SoftPrompt.load(tmp_path / "ft", backbone.device)
    prompt = json.loads((tmp_path / "ft" / "prompt.json").read_text())
    builder = PromptBuilder(
        backbone,
        data.titles,
        domain=data.domain,
        teacher=prompt["teacher"],
        n_soft=soft.n_tokens,
        settings=PromptSettings(history_items=6),
    )
    valid, cands = data.examples["valid"], data.candidates["valid"][:12]
    prompts = [builder.stage2(valid.histories[i], cands[i], soft=True) for i in range(12)]
    answers = [[builder.answer(int(c)) for c in row] for row in cands]
    scores = score_all(backbone, soft, prompts, answers, reduction="mean", skip=builder.answer_skip)
    targets = (cands == valid.targets[:12, None]).argmax(axis=1)
    logc = log_counts(data)
    weight = fit_prior_weight(scores, cands, targets, logc)
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert prompt["popularity_weight"] == metrics["popularity_weight"] == pytest.approx(weight, abs=1e-6)
    in_memory = target_ranks(with_prior(scores, cands, logc, weight), targets)
    assert evaluated[:12].tolist() == in_memory.tolist()
    assert float((evaluated[:12] == 0).mean()) == metrics["valid_hr1_with_prior"]
    assert float((target_ranks(scores, targets) == 0).mean()) == metrics["valid_hr1"]


def test_a_models_popularity_prior_moves_its_scores_and_not_the_untuned_llms(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    weighted = with_prompt_fields(tiny_runs / "delrec", tmp_path / "delrec", popularity_weight=3.0)
    llm_scores = {}
    real = evaluate_module.score_all

    def recording(*args, **kwargs):
        llm_scores[kwargs["desc"]] = real(*args, **kwargs)
        return llm_scores[kwargs["desc"]]

    monkeypatch.setattr(evaluate_module, "score_all", recording)
    config = EvaluateConfig(**{k: TINY[k] for k in ("backbone", "device", "bf16")}, rerank_k=0)
    evaluate(synthetic_dir, tiny_runs / "teacher", config, tmp_path / "eval", weighted)
    data = load_dataset(synthetic_dir)
    cands = data.candidates["test"]
    targets = (cands == data.examples["test"].targets[:, None]).argmax(axis=1)
    ranks = pq.read_table(tmp_path / "eval" / "ranks.parquet")
    prior = with_prior(llm_scores["DELRec"], cands, log_counts(data), 3.0)
    assert ranks.column("delrec").to_numpy().tolist() == target_ranks(prior, targets).tolist()
    untuned = target_ranks(llm_scores["zero-shot"], targets)
    assert ranks.column("zero_shot").to_numpy().tolist() == untuned.tolist()
    assert "DELRec weight 3.000; the untuned LLM has none" in (tmp_path / "eval" / "report.md").read_text()


def test_the_soft_prompt_alone_is_scored_on_the_untuned_llm_and_paired_against_it(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    """prompt_only: DELRec's soft prompt on the backbone with no adapter and no popularity prior (the prior
    is fitted in stage 2), paired against the untuned LLM: what stage 1 alone carries into the LLM."""
    weighted = with_prompt_fields(tiny_runs / "delrec", tmp_path / "delrec", popularity_weight=3.0)
    calls = {}
    real = evaluate_module.score_all

    def recording(backbone, soft, *args, **kwargs):
        scores = real(backbone, soft, *args, **kwargs)
        adapted = any("lora_" in name for name, _ in backbone.model.named_modules())
        calls[kwargs["desc"]] = (soft is not None, adapted, scores)
        return scores

    monkeypatch.setattr(evaluate_module, "score_all", recording)
    config = EvaluateConfig(
        **{k: TINY[k] for k in ("backbone", "device", "bf16")}, rerank_k=0, prompt_only=True
    )
    flat = evaluate(synthetic_dir, tiny_runs / "teacher", config, tmp_path / "eval", weighted)
    assert calls["DELRec"][:2] == (True, True) and calls["zero-shot"][:2] == (False, False)
    assert calls["soft prompt only"][:2] == (True, False)
    assert abs(calls["soft prompt only"][2] - calls["zero-shot"][2]).max() > 1e-4  # the prompt is in use
    data = load_dataset(synthetic_dir)
    cands = data.candidates["test"]
    targets = (cands == data.examples["test"].targets[:, None]).argmax(axis=1)
    ranks = pq.read_table(tmp_path / "eval" / "ranks.parquet")
    alone = target_ranks(calls["soft prompt only"][2], targets)  # no prior, though DELRec's weight is 3
    assert ranks.column("prompt_only").to_numpy().tolist() == alone.tolist()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for metric in REPORTED:
        cell = saved["paired"]["prompt_only_minus_zero_shot"][metric]
        assert cell["diff"] == pytest.approx(flat[f"prompt_only_{metric}"] - flat[f"zero_shot_{metric}"])
        assert flat[f"prompt_only_minus_zero_shot_{metric}_lo"] == cell["lo"]
    assert "delrec_minus_prompt_only" in saved["paired"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| Untuned LLM + soft prompt - Untuned LLM |" in report
    assert "| DELRec - Untuned LLM + soft prompt |" in report


def _tiny_base(tiny_runs):
    """A fresh copy of the tiny test backbone's model, for an adapter to wrap."""
    from delrec.llm.backbone import load_backbone

    return load_backbone(str(tiny_runs / "ablation" / "backbone"), device="cpu", autocast=False).model


def test_saved_adalora_adapter_keeps_rows_moved_after_the_last_allocation(tiny_runs, tmp_path):
    """Between rank allocations the optimiser moves masked rows again: the saved adapter must keep them."""
    from peft import AdaLoraConfig, get_peft_model

    from delrec.adapter_io import load_adapter, save_adapter

    config = AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, tinit=1, tfinal=0, target_modules=["q_proj", "v_proj"]
    )
    model = get_peft_model(_tiny_base(tiny_runs), config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)  # every row in use, as after an optimiser step
    # The last allocation masked rows 0 and 1 of every matrix; training moved them since.
    model.peft_config["default"].rank_pattern = {
        name.removesuffix(".default"): [False, False, True, True]
        for name, _ in model.base_model.model.named_parameters()
        if name.endswith("lora_E.default")
    }
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "plain")
    save_adapter(model, tmp_path / "kept")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not match any targeted module")
        plain, kept = (
            load_adapter(_tiny_base(tiny_runs), tmp_path / "plain"),
            load_adapter(_tiny_base(tiny_runs), tmp_path / "kept"),
        )
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - trained).abs().max() > 1e-3  # peft's save drops used rows
        torch.testing.assert_close(kept(input_ids=ids).logits, trained, rtol=0, atol=1e-5)


def test_an_adalora_module_pruned_to_rank_0_saves_without_a_shard_warning_and_loads_exactly(
    tiny_runs, tmp_path, caplog
):
    """Rank pruning can take every row of a module (as on ML-100K at 500 steps): peft then warns of FSDP
    shards saved before gathering. Nothing is wrong, so the pruned modules are logged instead."""
    from peft import AdaLoraConfig, get_peft_model
    from peft.utils.warning import PeftWarning

    from delrec.adapter_io import load_adapter, save_adapter

    config = AdaLoraConfig(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2, target_modules=["v_proj"])
    model = get_peft_model(_tiny_base(tiny_runs), config).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3)
        singular = [p for n, p in model.named_parameters() if n.endswith("lora_E.default")]
        singular[0].zero_()  # the allocator masked every row of the first module
    model.peft_config["default"].rank_pattern = {}
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="delrec.adapter_io"):
        warnings.simplefilter("error", PeftWarning)
        save_adapter(model, tmp_path / "pruned")
    assert f"pruned 1 of {len(singular)} adapted modules to rank 0" in caplog.text
    with torch.no_grad():
        loaded = load_adapter(_tiny_base(tiny_runs), tmp_path / "pruned")
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=0, atol=1e-5)
    assert [tuple(p.shape) for n, p in loaded.named_parameters() if n.endswith("lora_E.default")][0] == (0, 1)


def test_a_lora_adapter_loads_exactly(tiny_runs, tmp_path):
    from peft import LoraConfig, get_peft_model

    from delrec.adapter_io import load_adapter, save_adapter

    model = get_peft_model(_tiny_base(tiny_runs), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # B starts at 0: make the adapter change the output
    ids = torch.arange(3, 19).view(2, 8)
    save_adapter(model, tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(
            load_adapter(_tiny_base(tiny_runs), tmp_path / "lora")(input_ids=ids).logits,
            model(input_ids=ids).logits,
            rtol=0,
            atol=1e-5,
        )


def test_in_the_catalogue_every_model_excludes_what_the_teacher_excludes(tmp_path):
    # Histories cut to 3 items: a user's earlier training items lie outside the history. The teacher
    # excludes them from its ranking; popularity (and the LLMs) must rank among the same items.
    from test_teachers import _quick

    from delrec.metrics import target_ranks
    from delrec.teachers import train_teacher

    data = tmp_path / "data"
    preprocess(
        PreprocessConfig(dataset="synthetic", synthetic_users=40, synthetic_items=30, max_history=3), data
    )
    train_teacher(data, _quick("gru4rec", max_epochs=1), tmp_path / "teacher")
    dataset = load_dataset(data)
    rows = np.arange(len(dataset.examples["test"]))
    teacher = evaluate_module._teacher_scores(dataset, tmp_path / "teacher", "test", rows)
    excluded = np.isneginf(teacher[:, 1:])
    histories = dataset.examples["test"].histories
    assert excluded.sum() > sum(len(h) for h in histories)  # more than the histories: the test can tell
    counts = item_counts(dataset)[1:].astype(float)
    expected = target_ranks(
        np.where(excluded, -np.inf, counts[None, :]), dataset.examples["test"].targets - 1
    )
    ranks = popularity_ranks(dataset, "test", rows, "catalogue")
    np.testing.assert_array_equal(ranks, expected)
