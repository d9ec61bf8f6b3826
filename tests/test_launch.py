"""delrec.launch (torchrun in the task's pod) and delrec.remote_stage (a TrainJob node), with a stand-in
for the ranks: a small script that answers to the stage's command line as rank 0 would."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_store import BUCKET, moto_endpoint, store  # noqa: F401 (fixtures)

from delrec import launch, remote_stage
from delrec.errors import DelrecError

# What every rank runs is `python -m delrec.cli <stage> ... --config FILE`; this plays rank 0: it prints a
# line, writes the output folder (metrics.json and the config it was given) and exits with $STATUS.
STAND_IN = """
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
value = lambda flag: args[args.index(flag) + 1]
print("rank 0: training", args[0], flush=True)
out = Path(value("--out"))
out.mkdir()
(out / "metrics.json").write_text(json.dumps({"loss": 0.25, "best_step": 2}))
(out / "config_seen.json").write_text(Path(value("--config")).read_text())
(out / "inputs.json").write_text(json.dumps({f: value(f) for f in ("--data", "--teacher", "--distill") if f in args}))
sys.exit(int(os.environ.get("STATUS", "0")))
"""


@pytest.fixture
def ranks(tmp_path, monkeypatch):
    """torchrun replaced by the stand-in; the commands it was asked to run."""
    script = tmp_path / "rank0.py"
    script.write_text(STAND_IN)
    commands, real = [], launch.torchrun_command

    def command(arguments, *, nproc_per_node=None):
        commands.append(real(arguments, nproc_per_node=nproc_per_node))
        return [sys.executable, str(script), *arguments]

    monkeypatch.setattr(launch, "torchrun_command", command)
    monkeypatch.setattr(remote_stage, "torchrun_command", command)
    return commands


def test_the_torchrun_command_runs_the_stage_cli():
    args = launch.stage_arguments("finetune", {"data": "/d", "distill": None}, "/o", "/c.json")
    assert args == ["finetune", "--data", "/d", "--out", "/o", "--config", "/c.json"]  # the ablation
    with_teacher = launch.stage_arguments("finetune", {"data": "/d", "teacher": "/t"}, "/o", "/c.json")
    assert with_teacher[:5] == ["finetune", "--data", "/d", "--teacher", "/t"]  # for teacher_kd
    assert launch.torchrun_command(args, nproc_per_node=2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "delrec.cli", *args,
    ]  # fmt: skip
    # On a TrainJob node torchrun reads nodes, ranks and the master from Trainer's PET_* environment.
    assert launch.torchrun_command(args)[3:] == ["-m", "delrec.cli", *args]


@pytest.mark.parametrize(
    ("stage", "inputs", "message"),
    [
        ("evaluate", {"data": "/d"}, "no distributed launch for stage 'evaluate'"),
        ("distill", {"data": "/d"}, r"missing \['teacher'\]"),
        ("finetune", {"data": "/d", "soft_prompt": "/s"}, r"unknown \['soft_prompt'\]"),
    ],
)
def test_bad_stage_inputs_are_named(stage, inputs, message):
    with pytest.raises(DelrecError, match=message):
        launch.stage_arguments(stage, inputs, "/o", "/c.json")


def test_several_gpus_run_the_stage_as_torchrun_ranks_in_the_pod(ranks, tmp_path, capfd):
    config = {"steps": 5, "backbone": "tiny-llama"}
    out = tmp_path / "soft_prompt"
    metrics = launch.run_torchrun("distill", config, {"data": "/d", "teacher": "/t"}, out, nproc_per_node=2)
    assert metrics == {"loss": 0.25, "best_step": 2}  # read back from the output folder
    assert json.loads((out / "config_seen.json").read_text()) == config
    assert json.loads((out / "inputs.json").read_text()) == {"--data": "/d", "--teacher": "/t"}
    assert "rank 0: training distill" in capfd.readouterr().out  # streamed as it ran
    (command,) = ranks
    assert command[3:9] == ["--standalone", "--nproc-per-node", "2", "-m", "delrec.cli", "distill"]


def test_a_failed_rank_fails_the_task_with_its_exit_status(ranks, tmp_path, monkeypatch):
    monkeypatch.setenv("STATUS", "3")
    with pytest.raises(DelrecError, match=r"distill \(2 ranks\) exited with status 3"):
        launch.run_torchrun("distill", {}, {"data": "/d", "teacher": "/t"}, tmp_path / "o", nproc_per_node=2)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, launch.Launch("pod", 1)),
        ({launch.ENV_NPROC_PER_NODE: "4"}, launch.Launch("pod", 4)),
        ({launch.ENV_TRAINER: "trainjob"}, launch.Launch("trainjob", 1)),
    ],
)
def test_the_launch_comes_from_the_environment(env, expected, monkeypatch):
    for key in (launch.ENV_TRAINER, launch.ENV_NPROC_PER_NODE):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch.Launch.from_env() == expected
    assert expected.in_process == (env == {})


def test_a_bad_launch_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(launch.ENV_TRAINER, "slurm")
    with pytest.raises(DelrecError, match="DELREC_TRAINER"):
        launch.Launch.from_env()
    monkeypatch.setenv(launch.ENV_TRAINER, "pod")
    monkeypatch.setenv(launch.ENV_NPROC_PER_NODE, "two")
    with pytest.raises(DelrecError, match="DELREC_NPROC_PER_NODE"):
        launch.Launch.from_env()


@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_trainjob_nodes_stage_inputs_and_node_0_uploads(ranks, store, moto_endpoint, monkeypatch, node_rank):  # noqa: F811
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("DELREC_S3_SECURE", "false")
    monkeypatch.setenv(remote_stage.ENV_NODE_RANK, node_rank)
    data, distill, out = (f"s3://{BUCKET}/v2/{name}" for name in ("dataset", "soft_prompt", "staged"))
    store.put_bytes(b"rows", f"{data}/train.parquet")
    store.put_bytes(b"prompt", f"{distill}/soft_prompt.safetensors")
    store.put_bytes(b"stale", f"{out}/left-by-an-earlier-attempt")
    config = {"steps": 3}
    code = remote_stage.main(
        ["finetune", "--data", data, "--distill", distill, "--out", out, "--config-json", json.dumps(config)]
    )
    assert code == 0
    (command,) = ranks
    assert command[3:6] == ["-m", "delrec.cli", "finetune"]  # PET_* decide nodes and ranks
    if node_rank == "0":
        assert sorted(store.list(out)) == ["config_seen.json", "inputs.json", "metrics.json"]
        assert json.loads(store.get_bytes(f"{out}/config_seen.json")) == config
        staged = json.loads(store.get_bytes(f"{out}/inputs.json"))
        assert Path(staged["--data"]).name == "data" and Path(staged["--distill"]).name == "distill"
    else:  # other nodes write nothing
        assert store.list(out) == ["left-by-an-earlier-attempt"]


def test_a_trainjob_node_reports_a_failed_stage(ranks, store, moto_endpoint, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("DELREC_S3_ENDPOINT", moto_endpoint)
    monkeypatch.setenv("DELREC_S3_SECURE", "false")
    monkeypatch.setenv("STATUS", "1")
    store.put_bytes(b"rows", f"s3://{BUCKET}/v2/dataset/train.parquet")
    argv = [
        "finetune",
        "--data",
        f"s3://{BUCKET}/v2/dataset",
        "--out",
        f"s3://{BUCKET}/o",
        "--config-json",
        "{}",
    ]
    assert remote_stage.main(argv) == 2
    assert "finetune (node 0) exited with status 1" in capsys.readouterr().err
    assert store.list(f"s3://{BUCKET}/o") == []


@pytest.mark.slow
@pytest.mark.parametrize("standalone", [True, False])
def test_real_torchrun_starts_the_delrec_cli_on_every_rank(standalone, monkeypatch, capfd):
    """The command lines against torch's own launcher: two ranks of `delrec.cli --version`, in a pod
    (--standalone) and as a TrainJob node does it (nodes, ranks and master from Trainer's PET_* variables)."""
    if not standalone:
        for key, value in {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "0",
                           "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": "29517"}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
    command = launch.torchrun_command(["--version"], nproc_per_node=2 if standalone else None)
    launch.run_streaming(command, what="delrec --version")
    assert capfd.readouterr().out.count("delrec ") == 2
