"""delrec recommend: the teacher retrieves, DELRec reranks, Parquet shards that resume."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import load_benchmark, with_prompt_fields
from test_store import BUCKET, moto_endpoint, store  # noqa: F401, E402 (fixtures)

from delrec import layout
from delrec.artifacts import read_manifest, write_manifest
from delrec.cli import main
from delrec.data import load_dataset
from delrec.errors import DelrecError
from delrec.recommend import (
    RecommendConfig,
    _prepare_partial,
    _Shard,
    known_sequences,
    publish_recommendations,
    recommend,
    teacher_retrieve,
)
from delrec.teachers import load_teacher

TINY = dict(backbone="tiny-llama", device="cpu", bf16=False)


def _read(out) -> dict:
    files = sorted((out / layout.RECOMMENDATIONS).glob("part-*.parquet"))
    return pq.read_table(files).to_pydict() if files else {}


def test_every_user_gets_top_n_of_the_teachers_top_k_minus_what_they_have(synthetic_dir, tiny_runs, tmp_path):
    out = tmp_path / "recs"
    config = RecommendConfig(**TINY, retrieve_k=8, top_n=5, shard_users=37, row_group_rows=50)
    stats = recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", config, out)
    dataset = load_dataset(synthetic_dir)
    sequences = known_sequences(dataset)
    users = [u for u, seq in enumerate(sequences) if len(seq)]
    assert stats["users"] == len(users) and stats["rows"] == 5 * len(users)
    assert stats["shards"] == -(-len(users) // 37) and stats["users_per_s"] > 0
    recs = _read(out)
    assert len(recs["user"]) == 5 * len(users)
    user_table = pq.read_table(synthetic_dir / layout.USERS).to_pydict()
    raw_users = dict(zip(user_table["raw_id"], user_table["user"], strict=True))
    item_index = {raw: i for i, raw in enumerate(dataset.raw_item_ids)}
    model, teacher_config = load_teacher(tiny_runs / "teacher")
    retrieved = teacher_retrieve(model, teacher_config.max_len, [sequences[u] for u in users], 8)
    top = {u: row for u, row in zip(users, retrieved, strict=True)}
    rows_of = {}
    for i, raw in enumerate(recs["user"]):
        rows_of.setdefault(raw, []).append(i)
    assert len(rows_of) == len(users)
    for raw, idx in rows_of.items():
        user = raw_users[raw]
        items = [item_index[recs["item_id"][i]] for i in idx]
        assert [recs["rank"][i] for i in idx] == [1, 2, 3, 4, 5]
        scores = [recs["llm_score"][i] for i in idx]
        assert scores == sorted(scores, reverse=True)  # ranked by DELRec's score
        assert not set(items) & set(sequences[user].tolist())  # nothing the user already has
        # each item is one of the teacher's top 8, and teacher_rank says where
        assert [int(top[user][recs["teacher_rank"][i] - 1]) for i in idx] == items
        assert [recs["title"][i] for i in idx] == [dataset.titles[j] for j in items]
    files = sorted((out / layout.RECOMMENDATIONS).glob("part-*.parquet"))
    assert all(pq.ParquetFile(f).metadata.row_group(0).num_rows <= 50 for f in files)
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["producer"] == "recommend" and manifest["rows"]["recommendations"] == 5 * len(users)
    assert not (tmp_path / "recs.partial").exists()


def test_a_killed_run_resumes_at_the_first_missing_shard_whether_or_not_the_backbone_is_named(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    config = RecommendConfig(**TINY, retrieve_k=6, top_n=3, shard_users=40)
    whole = tmp_path / "whole"
    recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", config, whole)

    original, calls = _Shard.table, []

    def dies_on_the_third_shard(self, users, sequences):
        calls.append(len(users))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, users, sequences)

    out = tmp_path / "recs"
    monkeypatch.setattr(_Shard, "table", dies_on_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", config, out)
    assert not out.exists()
    assert len(list((tmp_path / "recs.partial").glob("part-*.parquet"))) == 2

    calls.clear()
    # No backbone named: DELRec's own (tiny-llama, from its prompt.json), so the same run resumes.
    unnamed = config.model_copy(update={"backbone": None})
    stats = recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", unnamed, out)
    assert len(calls) == stats["shards"] - 2  # only the missing shards ran
    assert _read(out) == _read(whole)
    assert read_manifest(out)["config"]["backbone"] == "tiny-llama"


def test_a_refused_command_keeps_the_shards_of_an_interrupted_run(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    config = RecommendConfig(**TINY, retrieve_k=6, top_n=3, shard_users=40)
    original = _Shard.table

    def dies_on_the_second_shard(self, users, sequences):
        if (tmp_path / "recs.partial" / "part-00000.parquet").exists():
            raise KeyboardInterrupt
        return original(self, users, sequences)

    monkeypatch.setattr(_Shard, "table", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", config, tmp_path / "recs")
    # The same command with another backbone (another config, so another run) is refused ...
    other = config.model_copy(update={"backbone": "smollm2-135m"})
    with pytest.raises(DelrecError, match="tiny-llama"):
        recommend(synthetic_dir, tiny_runs / "teacher", tiny_runs / "delrec", other, tmp_path / "recs")
    # ... and the interrupted run's shard is still there to resume from.
    assert (tmp_path / "recs.partial" / "part-00000.parquet").is_file()


def test_a_checkpoint_folder_holding_other_files_is_refused_not_removed(tmp_path):
    partial = tmp_path / "recs.partial"
    partial.mkdir()
    (partial / "my_notes.txt").write_text("mine")
    (partial / "part-00000.parquet").write_bytes(b"a shard of another run")
    with pytest.raises(DelrecError, match=r"holds files recommend did not write \(my_notes.txt\)") as err:
        _prepare_partial(partial, {"config": "x", "inputs": {}})
    assert err.value.path == partial
    assert sorted(p.name for p in partial.iterdir()) == ["my_notes.txt", "part-00000.parquet"]


def test_a_run_marker_cut_short_counts_as_another_run(tmp_path):
    partial = tmp_path / "recs.partial"
    run = {"config": "x", "inputs": {}}
    _prepare_partial(partial, run)
    (partial / "part-00000.parquet").write_bytes(b"shard")
    (partial / "run.json").write_text('{"config": "x", "inp')  # a run killed while writing it
    _prepare_partial(partial, run)
    assert [p.name for p in partial.iterdir()] == ["run.json"]
    assert json.loads((partial / "run.json").read_text()) == run
    (partial / "part-00000.parquet").write_bytes(b"shard")
    _prepare_partial(partial, run)  # the same run resumes: its shards are kept
    assert (partial / "part-00000.parquet").exists()


def test_a_user_list_and_an_unknown_user(synthetic_dir, tiny_runs, tmp_path):
    raw = pq.read_table(synthetic_dir / layout.USERS)["raw_id"].to_pylist()[:3]
    out = tmp_path / "some"
    stats = recommend(
        synthetic_dir,
        tiny_runs / "teacher",
        tiny_runs / "delrec",
        RecommendConfig(**TINY, users=raw, top_n=2),
        out,
    )
    assert stats["users"] == 3 and sorted(set(_read(out)["user"])) == sorted(raw)
    with pytest.raises(DelrecError, match="unknown user id") as err:
        recommend(
            synthetic_dir,
            tiny_runs / "teacher",
            tiny_runs / "delrec",
            RecommendConfig(**TINY, users=["no-such-user"]),
            tmp_path / "none",
        )
    assert err.value.field == "users" and not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="top_n"):
        RecommendConfig(retrieve_k=5, top_n=10)


def test_cli_writes_recommendations_for_the_given_users(synthetic_dir, tiny_runs, tmp_path, capsys):
    raw = pq.read_table(synthetic_dir / layout.USERS)["raw_id"].to_pylist()[:2]
    out = tmp_path / "cli"
    code = main(
        [
            "recommend", "--data", str(synthetic_dir), "--teacher", str(tiny_runs / "teacher"),
            "--delrec", str(tiny_runs / "delrec"), "--out", str(out), "--backbone", "tiny-llama",
            "--device", "cpu", "--no-bf16", "--users", ",".join(raw), "--top-n", "4",
        ]
    )  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["users"] == 2
    recs = _read(out)
    assert len(recs["user"]) == 8 and set(np.unique(recs["rank"]).tolist()) == {1, 2, 3, 4}


def test_the_benchmark_runs_both_paths_and_they_agree(synthetic_dir, tiny_runs, tmp_path):
    figures = load_benchmark("recommend").main(
        [
            "--data", str(synthetic_dir), "--teacher", str(tiny_runs / "teacher"), "--delrec", str(tiny_runs / "delrec"),
            "--backbone", "tiny-llama", "--no-bf16", "--users", "6", "--plain-users", "3", "--threads", "1",
            "--retrieve-k", "8", "--top-n", "5", "--json", str(tmp_path / "f.json"),
        ]
    )  # fmt: skip
    # fp32: the packed scorer and one-forward-per-candidate rank the same top 5 for every user
    assert figures["same_top_n_fraction"] == 1.0
    assert figures["users_per_s"] > 0 and figures["plain_users_per_s"] > 0
    assert json.loads((tmp_path / "f.json").read_text())["ratio_vs_plain"] == figures["ratio_vs_plain"]


def test_published_recommendations_land_under_the_run_id_once(tmp_path, store):  # noqa: F811
    folder = tmp_path / "recs"
    (folder / layout.RECOMMENDATIONS).mkdir(parents=True)
    (folder / layout.RECOMMENDATIONS / "part-00000.parquet").write_bytes(b"rows")
    write_manifest(folder, producer="recommend", config={}, inputs={}, rows={"users": 1})
    uri = publish_recommendations(store, folder, f"s3://{BUCKET}/registry", "delrec", "job-7")
    assert uri == f"s3://{BUCKET}/registry/delrec/recommendations/job-7"
    assert sorted(store.list(uri)) == ["manifest.json", "recommendations/part-00000.parquet"]
    # A retried task (same run id, same folder) finds its upload done; other recommendations are refused.
    assert publish_recommendations(store, folder, f"s3://{BUCKET}/registry", "delrec", "job-7") == uri
    (folder / layout.RECOMMENDATIONS / "part-00000.parquet").write_bytes(b"other rows")
    write_manifest(folder, producer="recommend", config={}, inputs={}, rows={"users": 1})
    with pytest.raises(DelrecError, match="refusing to overwrite"):
        publish_recommendations(store, folder, f"s3://{BUCKET}/registry", "delrec", "job-7")
    assert store.get_bytes(f"{uri}/recommendations/part-00000.parquet") == b"rows"
    with pytest.raises(DelrecError, match="manifest"):
        publish_recommendations(store, tmp_path, f"s3://{BUCKET}/registry", "delrec", "job-8")


def test_delrec_reranks_with_the_scoring_it_was_fine_tuned_with(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    import delrec.recommend as recommend_module

    delrec_dir = with_prompt_fields(tiny_runs / "delrec", tmp_path / "delrec", scoring="sum")
    used = []
    real = recommend_module.score_all

    def recording(*args, **kwargs):
        used.append(kwargs["reduction"])
        return real(*args, **kwargs)

    monkeypatch.setattr(recommend_module, "score_all", recording)
    args = (synthetic_dir, tiny_runs / "teacher", delrec_dir)
    users = pq.read_table(synthetic_dir / layout.USERS)["raw_id"].to_pylist()[:2]
    recommend(*args, RecommendConfig(**TINY, users=users, top_n=2), tmp_path / "own")
    recommend(*args, RecommendConfig(**TINY, users=users, top_n=2, scoring="mean"), tmp_path / "set")
    assert used == ["sum", "mean"]


def test_delrec_reranks_by_its_score_plus_its_popularity_prior(
    synthetic_dir, tiny_runs, tmp_path, monkeypatch
):
    import delrec.recommend as recommend_module
    from delrec.popularity import log_counts

    delrec_dir = with_prompt_fields(tiny_runs / "delrec", tmp_path / "delrec", popularity_weight=2.0)
    llm_scores = []
    real = recommend_module.score_all

    def recording(*args, **kwargs):
        llm_scores.append(real(*args, **kwargs))
        return llm_scores[-1]

    monkeypatch.setattr(recommend_module, "score_all", recording)
    dataset = load_dataset(synthetic_dir)
    user = pq.read_table(synthetic_dir / layout.USERS)["raw_id"].to_pylist()[0]
    config = RecommendConfig(**TINY, users=[user], retrieve_k=8, top_n=8)
    recommend(synthetic_dir, tiny_runs / "teacher", delrec_dir, config, tmp_path / "recs")
    recs = _read(tmp_path / "recs")
    model, teacher_config = load_teacher(tiny_runs / "teacher")
    retrieved = teacher_retrieve(model, teacher_config.max_len, [known_sequences(dataset)[0]], 8)[0]
    expected = llm_scores[0][0] + 2.0 * log_counts(dataset)[retrieved]
    by_teacher_rank = np.empty(8, dtype=np.float32)
    by_teacher_rank[np.array(recs["teacher_rank"]) - 1] = recs["llm_score"]
    np.testing.assert_allclose(by_teacher_rank, expected, rtol=1e-6)
    assert recs["llm_score"] == sorted(recs["llm_score"], reverse=True)


def test_a_users_known_sequence_ends_with_its_validation_and_test_items(tmp_path):
    # Histories are cut to max_history: a long sequence's test history is shorter than its training
    # sequence, yet the user's two latest items (validation and test targets) must not be forgotten.
    from delrec.data import PreprocessConfig, preprocess

    preprocess(
        PreprocessConfig(dataset="synthetic", synthetic_users=40, synthetic_items=30, max_history=3),
        tmp_path / "data",
    )
    dataset = load_dataset(tmp_path / "data")
    sequences = known_sequences(dataset)
    valid, test = dataset.examples["valid"], dataset.examples["test"]
    assert any(len(dataset.train_sequences[u]) > 3 for u in test.users)
    for user, valid_target, test_target in zip(valid.users, valid.targets, test.targets, strict=True):
        train = np.asarray(dataset.train_sequences[user])
        assert sequences[user].tolist() == [*train.tolist(), valid_target, test_target]


def test_recommend_takes_its_preset_settings_from_the_evaluate_section(tmp_path, monkeypatch):
    # Presets have no recommend section: the model is scored as evaluate scored it.
    import delrec.recommend as recommend_module

    preset = tmp_path / "p.yaml"
    preset.write_text("evaluate: {batch_size: 3, scoring: sum, max_examples: 5}\n")
    seen = {}
    monkeypatch.setattr(recommend_module, "recommend", lambda *a: seen.setdefault("config", a[3]) and {})
    code = main(["recommend", "--data", "d", "--teacher", "t", "--delrec", "f", "--out", str(tmp_path / "o"),
                 "--preset", str(preset), "--top-n", "4"])  # fmt: skip
    assert code == 0
    assert (seen["config"].batch_size, seen["config"].scoring, seen["config"].top_n) == (3, "sum", 4)
