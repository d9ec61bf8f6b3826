"""Teacher models and the train-teacher stage, on tiny synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from delrec.cli import main as cli_main
from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.errors import DelrecError
from delrec.teachers import TeacherConfig, load_teacher, load_topk, train_teacher
from delrec.teachers import train as train_module
from delrec.teachers.models import last_hidden
from delrec.teachers.train import (
    PastItems,
    _loss,
    build_model,
    evaluate_split,
    next_item_pairs,
    sequence_windows,
)

MODELS = ("sasrec", "gru4rec", "caser")
TINY = dict(hidden=16, inner=32, rnn_hidden=16, caser_horizontal=4, max_len=12, batch_size=32, device="cpu")


@pytest.mark.parametrize("name", MODELS)
def test_output_shapes(name):
    model = build_model(TeacherConfig(model=name, **TINY), num_items=30).eval()
    seq = torch.randint(0, 31, (5, 12))
    out = model(seq)
    assert out.shape == ((5, 12, 16) if model.seq2seq else (5, 16))
    assert last_hidden(model, seq).shape == (5, 16)
    assert model.item_weights().shape == (31, 16)


@pytest.mark.parametrize("name", ("sasrec", "gru4rec"))
def test_causal_models_never_look_ahead(name):
    torch.manual_seed(0)
    model = build_model(TeacherConfig(model=name, **TINY), num_items=30).eval()
    seq = torch.tensor([[0, 0, 0, 5, 9, 2, 7, 11, 3, 8, 1, 4]])
    base = model(seq)
    for later in range(4, 12):
        changed = seq.clone()
        changed[0, later] = 29
        out = model(changed)
        # positions 0-2 are padding: their outputs are never used
        assert torch.equal(out[0, 3:later], base[0, 3:later]), f"position {later} leaked backwards"
        assert not torch.allclose(out[0, later], base[0, later])


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_does_not_change_the_prediction(name):
    torch.manual_seed(0)
    model = build_model(TeacherConfig(model=name, **TINY), num_items=30).eval()
    short = torch.tensor([[0, 0, 4, 8, 15, 16, 23, 2]])
    long = torch.nn.functional.pad(short, (4, 0))
    assert torch.allclose(last_hidden(model, short), last_hidden(model, long), atol=1e-5)


def test_sequence_windows_train_every_target_once_with_context():
    seq = np.arange(1, 31)  # 30 items -> 29 targets
    for stride in (10, 5):
        inputs, targets = sequence_windows([seq], max_len=10, stride=stride)
        kept = targets[targets > 0]
        assert sorted(kept.tolist()) == list(range(2, 31))
        # every input/target pair is (item, next item)
        assert np.all((targets == 0) | (targets == inputs + 1))
        # a trained target has at least max_len - stride items of context (or its whole prefix)
        for inp, tgt in zip(inputs, targets, strict=True):
            for pos in np.flatnonzero(tgt):
                assert (inp[: pos + 1] > 0).sum() >= min(10 - stride + 1, tgt[pos] - 1)


def test_next_item_pairs_respect_user_boundaries():
    inputs, targets = next_item_pairs([np.array([1, 2, 3]), np.array([7, 8])], window=2)
    assert targets.tolist() == [2, 3, 8]
    assert inputs.tolist() == [[0, 1], [1, 2], [0, 7]]


@pytest.mark.parametrize("name", MODELS)
def test_each_model_overfits_a_tiny_set(name):
    # Six disjoint chains: each item has one successor, so HR@1 = 1 on the training pairs is reachable.
    torch.manual_seed(0)
    sequences = [np.arange(1, 7) + 6 * k for k in range(6)]
    config = TeacherConfig(model=name, **{**TINY, "dropout": 0.0, "lr": 1e-2, "caser_window": 3})
    model = build_model(config, num_items=36)
    if model.seq2seq:
        inputs, targets = map(torch.from_numpy, sequence_windows(sequences, config.max_len, config.max_len))
    else:
        inputs, targets = map(torch.from_numpy, next_item_pairs(sequences, config.caser_window))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(300):
        loss = _loss(model, inputs, targets, config)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        scores = model(inputs) @ model.item_weights().T
        if model.seq2seq:
            keep = targets > 0
            scores, targets = scores[keep], targets[keep]
        scores[:, 0] = float("-inf")
        assert (scores.argmax(-1) == targets).float().mean().item() == 1.0


def test_bce_loss_trains():
    torch.manual_seed(0)
    config = TeacherConfig(model="sasrec", loss="bce", num_negatives=3, **TINY)
    model = build_model(config, num_items=30)
    inputs, targets = map(torch.from_numpy, sequence_windows([np.arange(1, 20)], 12, 12))
    loss = _loss(model, inputs, targets, config)
    loss.backward()
    assert loss.item() > 0 and model.item_emb.weight.grad.abs().sum() > 0


def _quick(model: str, **extra) -> TeacherConfig:
    return TeacherConfig(model=model, **{**TINY, "max_epochs": 3, **extra})


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "sasrec"
    metrics = train_teacher(synthetic_dir, _quick("sasrec"), out)
    return out, metrics


def test_stage_writes_every_artifact(trained, synthetic):
    out, metrics = trained
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "metrics.json",
        "topk.parquet",
        "manifest.json",
    }
    assert not out.with_name(out.name + ".partial").exists()
    for name in ("valid_NDCG@10", "test_HR@10", "test_MRR@10", "test_cand_HR@1", "test_cand_NDCG@5"):
        assert 0.0 <= metrics[name] <= 1.0
    assert metrics["epochs"] == 3 and 1 <= metrics["best_epoch"] <= 3
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["producer"] == "train_teacher"
    assert manifest["inputs"]["dataset"] == synthetic.manifest["id"]
    # the saved weights reproduce the reported test metric
    model, config = load_teacher(out)
    assert config == _quick("sasrec")
    assert isinstance(model, torch.nn.Module) and not model.training
    assert _test_metrics(model, synthetic, config)["HR@10"] == pytest.approx(metrics["test_HR@10"])


def _test_metrics(model, dataset, config) -> dict[str, float]:
    """A model's full-ranking test metrics, scored as the stage scores them."""
    return evaluate_split(model, dataset, "test", config, PastItems(dataset), candidates=False)["full"]


def test_the_saved_model_is_the_best_epochs_not_the_last(synthetic_dir, synthetic, tmp_path, monkeypatch):
    """Validation peaks at epoch 1 of 3: the stage saves (and reports the test figures of) epoch 1's
    weights, not those training ended with."""
    weights = []  # the model's weights at each validation, i.e. after each epoch
    validate = train_module._TeacherTraining.validate

    def peaking_at_epoch_1(self):
        record = validate(self)
        weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return record | {"valid_NDCG@10": 1.0 / len(weights)}  # 1, 1/2, 1/3: epoch 1 is best

    monkeypatch.setattr(train_module._TeacherTraining, "validate", peaking_at_epoch_1)
    config = _quick("sasrec", patience=5)
    metrics = train_teacher(synthetic_dir, config, tmp_path / "teacher")
    assert metrics["best_epoch"] == 1 and metrics["epochs"] == 3 and len(weights) == 3
    model, _ = load_teacher(tmp_path / "teacher")
    saved = model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in weights[0].items())
    assert not all(torch.equal(saved[k], v) for k, v in weights[-1].items())  # training did move on
    test = _test_metrics(model, synthetic, config)
    assert test["HR@10"] == pytest.approx(metrics["test_HR@10"])
    assert test["NDCG@10"] == pytest.approx(metrics["test_NDCG@10"])


def test_topk_excludes_history_and_is_aligned(trained, synthetic_dir, synthetic):
    out, _ = trained
    topk = load_topk(out, synthetic_dir)
    table = pq.read_table(out / "topk.parquet").to_pydict()
    for split, examples in synthetic.examples.items():
        assert topk[split].shape == (len(examples), 10)
        for i, (user, history, target) in enumerate(
            zip(examples.users, examples.histories, examples.targets, strict=True)
        ):
            train_seq = synthetic.train_sequences[user].tolist()
            seen = set(history.tolist()) | set(
                train_seq[: train_seq.index(target)] if target in train_seq else train_seq
            )
            assert not seen & set(topk[split][i].tolist()), (split, i)
            assert 0 not in topk[split][i]
            assert len(set(topk[split][i].tolist())) == 10
    scores = np.array(table["scores"])
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_topk_history_makes_the_teacher_recommend_for_the_history_a_prompt_shows(
    synthetic_dir, synthetic, tmp_path
):
    from delrec.data.dataset import left_padded
    from delrec.teachers import CandidateTeacher
    from delrec.teachers.train import PastItems

    train_teacher(synthetic_dir, _quick("sasrec", max_epochs=1, topk_history=3), tmp_path / "t")
    model, config = load_teacher(tmp_path / "t")
    examples = synthetic.examples["valid"]
    assert max(map(len, examples.histories)) > 3
    cut = [h[-3:] for h in examples.histories]
    with torch.no_grad():  # the teacher on the last 3 items, every earlier item of the user excluded
        scores = (
            last_hidden(model, torch.from_numpy(left_padded(cut, config.max_len))) @ model.item_weights().T
        )
    scores[:, 0] = float("-inf")
    rows, items = PastItems(synthetic).excluded(examples, np.arange(len(examples)))
    scores[rows, items] = float("-inf")
    assert np.array_equal(load_topk(tmp_path / "t", synthetic_dir)["valid"], scores.topk(10).indices.numpy())
    # Stage 2's teacher scores read the same items.
    teacher, candidates = CandidateTeacher(tmp_path / "t"), synthetic.candidates["valid"]
    np.testing.assert_array_equal(
        teacher.probabilities(examples.histories, candidates), teacher.probabilities(cut, candidates)
    )


def test_load_topk_refuses_another_dataset(trained, tmp_path):
    out, _ = trained
    other = tmp_path / "other"
    preprocess(PreprocessConfig(dataset="synthetic", synthetic_users=40, synthetic_items=40, seed=7), other)
    with pytest.raises(DelrecError, match="dataset"):
        load_topk(out, other)


class Killed(Exception):
    pass


def test_resumed_run_matches_an_uninterrupted_one(synthetic_dir, tmp_path):
    config = _quick("gru4rec", max_epochs=4)
    full = train_teacher(synthetic_dir, config, tmp_path / "full")

    def kill_after_two(epoch, record):
        if epoch == 2:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        train_teacher(synthetic_dir, config, out, on_epoch_end=kill_after_two)
    assert not out.exists() and (tmp_path / "resumed.partial" / "state.pt").is_file()
    epochs_seen = []
    resumed = train_teacher(synthetic_dir, config, out, on_epoch_end=lambda e, r: epochs_seen.append(e))
    assert epochs_seen == [3, 4]
    timing = {"seconds_to_best", "seconds_train", "seconds_setup", "seconds_total"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in full.items() if k not in timing
    }
    assert np.array_equal(
        load_topk(out, synthetic_dir)["train"], load_topk(tmp_path / "full", synthetic_dir)["train"]
    )


def test_a_changed_config_does_not_resume(synthetic_dir, tmp_path):
    def kill(epoch, record):
        raise Killed

    with pytest.raises(Killed):
        train_teacher(synthetic_dir, _quick("caser"), tmp_path / "t", on_epoch_end=kill)
    seen = []
    train_teacher(
        synthetic_dir,
        _quick("caser", lr=2e-3, max_epochs=1),
        tmp_path / "t",
        on_epoch_end=lambda e, r: seen.append(e),
    )
    assert seen == [1]


def test_cli_trains_and_reports(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(
        [
            "train-teacher",
            "--data",
            str(synthetic_dir),
            "--model",
            "caser",
            "--out",
            str(out),
            "--max-epochs",
            "1",
            "--device",
            "cpu",
            "--set",
            "hidden=16",
            "--set",
            "caser_horizontal=4",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["epochs"] == 1
    assert load_dataset(synthetic_dir).num_items == json.loads((out / "config.json").read_text())["num_items"]


def test_cli_rejects_unknown_option(synthetic_dir, tmp_path, capsys):
    code = cli_main(
        ["train-teacher", "--data", str(synthetic_dir), "--out", str(tmp_path / "x"), "--set", "hiden=3"]
    )
    assert code == 2
    assert "hiden" in capsys.readouterr().err


def test_user_split_scores_unseen_users(tmp_path):
    data = tmp_path / "users"
    preprocess(
        PreprocessConfig(dataset="synthetic", synthetic_users=60, synthetic_items=40, split="user"), data
    )
    metrics = train_teacher(data, _quick("caser", max_epochs=1), tmp_path / "t")
    dataset = load_dataset(data)
    topk = load_topk(tmp_path / "t", data)
    for split in ("valid", "test"):
        assert topk[split].shape == (len(dataset.examples[split]), 10)
        for items, history in zip(topk[split], dataset.examples[split].histories, strict=True):
            assert not set(items.tolist()) & set(history.tolist())
    assert 0.0 <= metrics["test_NDCG@10"] <= 1.0
