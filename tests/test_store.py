"""delrec.store against a real S3 endpoint on 127.0.0.1 (moto's ThreadedMotoServer)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from minio.error import S3Error
from moto.server import ThreadedMotoServer

from delrec import store as st
from delrec.cli import main as delrec_main
from delrec.errors import DelrecError

BUCKET = "delrec-test"


@pytest.fixture(scope="session")
def moto_endpoint():
    """host:port of a moto S3 server (plain HTTP), with credentials in the environment."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    old = {k: os.environ.get(k) for k in ("DELREC_S3_ACCESS_KEY", "DELREC_S3_SECRET_KEY")}
    os.environ["DELREC_S3_ACCESS_KEY"] = "testing"
    os.environ["DELREC_S3_SECRET_KEY"] = "testing"
    yield f"{host}:{port}"
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def store(moto_endpoint):
    sleeps: list[float] = []
    s = st.S3Store.from_env(moto_endpoint, False, part_size=5 << 20, attempts=3, sleep=sleeps.append)
    s.sleeps = sleeps
    s.ensure_bucket(BUCKET)
    yield s
    # Leave the bucket empty for the next test.
    for obj in s.client.list_objects(BUCKET, recursive=True):
        s.client.remove_object(BUCKET, obj.object_name)


def all_keys(store) -> list[str]:
    return sorted(o.object_name for o in store.client.list_objects(BUCKET, recursive=True))


def test_settings_tls_on_by_default_and_scheme_decides(monkeypatch):
    monkeypatch.delenv("DELREC_S3_SECURE", raising=False)
    assert st.S3Settings.from_env("minio.local:9000") == st.S3Settings("minio.local:9000", True)
    assert st.S3Settings.from_env("http://minio.local:9000").secure is False
    assert st.S3Settings.from_env("https://minio.local").secure is True
    monkeypatch.setenv("DELREC_S3_SECURE", "0")
    assert st.S3Settings.from_env("minio.local:9000").secure is False
    with pytest.raises(DelrecError, match="says http, but TLS was set on"):
        st.S3Settings.from_env("http://minio.local:9000", secure=True)
    with pytest.raises(DelrecError, match="says https, but TLS was set off"):
        st.S3Settings.from_env("https://minio.local:9000", secure=False)
    monkeypatch.delenv("DELREC_S3_ENDPOINT", raising=False)
    with pytest.raises(DelrecError, match="DELREC_S3_ENDPOINT"):
        st.S3Settings.from_env()


def test_credentials_only_from_environment(monkeypatch):
    for key in ("DELREC_S3_ACCESS_KEY", "DELREC_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DelrecError, match="DELREC_S3_ACCESS_KEY"):
        st.S3Store.from_env("127.0.0.1:1", False)


def test_parse_uri():
    assert st.parse_uri("s3://bkt/a/c/") == ("bkt", "a/c")
    assert st.parse_uri("s3://bkt") == ("bkt", "")
    with pytest.raises(DelrecError, match="expected an s3://bucket/key URI, got '/local/path'"):
        st.parse_uri("/local/path")
    with pytest.raises(DelrecError, match="no bucket in 's3:///key'"):
        st.parse_uri("s3:///key")


def test_roundtrip_single_and_multipart(store, tmp_path):
    small = tmp_path / "small.bin"
    small.write_bytes(b"hello")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))  # three 5 MiB parts: a multipart upload
    for path in (small, big):
        uri = f"s3://{BUCKET}/x/{path.name}"
        digest = store.put_file(path, uri)
        assert digest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert ("-" in digest.etag) == (path is big)
        got = store.get_file(uri, tmp_path / "down" / path.name)
        assert got.read_bytes() == path.read_bytes()
    assert all_keys(store) == ["x/big.bin", "x/small.bin"]  # no temporary key left behind


def test_failure_mid_multipart_upload_leaves_nothing(store, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/models/model.bin"
    store.put_bytes(b"previous version", uri)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))
    calls = []
    real_upload_part = store.client._upload_part

    def failing_upload_part(*args, **kwargs):
        calls.append(args[-1])  # part number
        if args[-1] == 2:  # the first part is already on the server
            raise ConnectionResetError("injected: connection lost mid-upload")
        return real_upload_part(*args, **kwargs)

    monkeypatch.setattr(store.client, "_upload_part", failing_upload_part)
    with pytest.raises(DelrecError, match="failed 3 times"):
        store.put_file(big, uri)
    assert calls.count(1) == 3 and calls.count(2) == 3  # retried 3 times, each failing at part 2
    assert store.sleeps == [0.5, 1.0]
    assert all_keys(store) == ["models/model.bin"]  # no temporary objects, final key untouched
    assert store.get_bytes(uri) == b"previous version"
    new = f"s3://{BUCKET}/models/new.bin"
    with pytest.raises(DelrecError, match="object store failed"):
        store.put_file(big, new)
    assert not store.exists(new)


def test_failure_before_the_final_copy_leaves_nothing(store, monkeypatch):
    def broken_copy(*args, **kwargs):
        raise S3Error("AccessDenied", "injected", "", "", "", None)

    monkeypatch.setattr(store.client, "copy_object", broken_copy)
    with pytest.raises(S3Error):
        store.put_bytes(b"data", f"s3://{BUCKET}/a/b.json")
    assert all_keys(store) == []
    assert store.sleeps == []  # AccessDenied is not transient: no retry


def test_retries_with_backoff_then_succeeds(store, monkeypatch):
    real_put = store.client.put_object
    failures = iter([ConnectionError("flaky"), ConnectionError("flaky")])

    def flaky_put(*args, **kwargs):
        exc = next(failures, None)
        if exc:
            raise exc
        return real_put(*args, **kwargs)

    monkeypatch.setattr(store.client, "put_object", flaky_put)
    uri = f"s3://{BUCKET}/c.txt"
    store.put_bytes(b"content", uri)
    assert store.sleeps == [0.5, 1.0]
    assert store.get_bytes(uri) == b"content"
    assert all_keys(store) == ["c.txt"]


def test_retry_backoff_is_capped_then_names_the_unanswered_operation():
    sleeps: list[float] = []
    attempts = []

    def always_fails():
        attempts.append(1)
        raise TimeoutError("down")

    # An endpoint that never answers (or keeps failing) is the user's to fix: an error naming the operation, not a traceback.
    with pytest.raises(DelrecError, match="put s3://b/k: the object store failed 6 times") as err:
        st.retry(
            always_fails, what="put s3://b/k", attempts=6, base_delay=1, max_delay=5, sleep=sleeps.append
        )
    assert isinstance(err.value.__cause__, TimeoutError)
    assert len(attempts) == 6 and sleeps == [1, 2, 4, 5, 5]


def test_a_uri_with_an_invalid_bucket_name_is_refused_before_any_request():
    for uri in ("s3://b/key", "s3://My_Bucket/key", "s3://-bucket"):
        with pytest.raises(DelrecError, match="invalid bucket name"):
            st.parse_uri(uri)
    assert st.parse_uri("s3://delrec-data.v2/a/b/") == ("delrec-data.v2", "a/b")


def test_download_detects_corruption(store, tmp_path):
    # An object whose stored sha256 does not match its bytes (as if corrupted at rest).
    import io

    store.client.put_object(BUCKET, "bad.bin", io.BytesIO(b"xyz"), 3, metadata={"sha256": "0" * 64})
    dest = tmp_path / "bad.bin"
    with pytest.raises(st.ChecksumError, match="sha256"):
        store.get_file(f"s3://{BUCKET}/bad.bin", dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    # Objects written by other tools (no sha256) are checked against their MD5 ETag.
    store.client.put_object(BUCKET, "plain.bin", io.BytesIO(b"abc"), 3)
    assert store.get_file(f"s3://{BUCKET}/plain.bin", dest).read_bytes() == b"abc"


def test_data_upload_cli_and_fetch(store, moto_endpoint, tmp_path, capsys):
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    (raw / "u.data").write_text("1\t2\t5\t100\n")
    (raw / "sub").mkdir()
    (raw / "sub" / "u.item").write_text("2|Toy Story (1995)|\n")
    argv = ["data", "upload", "--dataset", "ml-100k", "--source", str(raw)]
    code = delrec_main([*argv, "--to", f"s3://{BUCKET}/raw", "--endpoint", f"http://{moto_endpoint}"])
    assert code == 0
    uri = capsys.readouterr().out.strip()
    assert uri == f"s3://{BUCKET}/raw/ml-100k"
    assert store.list(uri) == ["sub/u.item", "u.data"]
    local = tmp_path / "work"
    local.mkdir()
    st.download_prefix(uri, local, store)
    assert (local / "sub" / "u.item").read_text() == "2|Toy Story (1995)|\n"
    assert st.local_fingerprint(local) == st.local_fingerprint(raw)
    one = tmp_path / "one"
    one.mkdir()
    st.download_prefix(f"{uri}/u.data", one, store)
    assert [p.name for p in one.iterdir()] == ["u.data"]
    code = delrec_main(["store", "get", uri, str(tmp_path / "got"), "--endpoint", f"http://{moto_endpoint}"])
    assert code == 0 and st.local_fingerprint(tmp_path / "got") == st.local_fingerprint(raw)


def test_data_upload_never_mixes_with_an_earlier_upload(store, moto_endpoint, tmp_path, capsys):
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir()
    v2.mkdir()
    (v1 / "interactions.parquet").write_bytes(b"old export")
    (v2 / "interactions.csv").write_text("user,item,timestamp\n")
    to = ["--to", f"s3://{BUCKET}/raw", "--endpoint", f"http://{moto_endpoint}"]
    upload = ["data", "upload", "--dataset", "generic", *to, "--source"]
    assert delrec_main([*upload, str(v1)]) == 0
    uri = f"s3://{BUCKET}/raw/generic"
    capsys.readouterr()
    assert delrec_main([*upload, str(v2)]) == 2
    err = capsys.readouterr().err
    assert f"{uri}: field 'to': already holds 1 object(s)" in err and "--replace" in err
    assert store.list(uri) == ["interactions.parquet"]
    assert delrec_main([*upload, str(v2), "--replace"]) == 0
    assert store.list(uri) == ["interactions.csv"]


def test_cli_reports_missing_endpoint(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("DELREC_S3_ENDPOINT", raising=False)
    assert delrec_main(["store", "ls", "s3://b/x"]) == 2
    assert "DELREC_S3_ENDPOINT" in capsys.readouterr().err


def test_publish_moves_latest_only_when_gate_passes(store, tmp_path):
    model = tmp_path / "finetune"
    model.mkdir()
    (model / "adapter.safetensors").write_bytes(b"weights")
    report = tmp_path / "evaluate"
    report.mkdir()
    (report / "report.md").write_text("# report\n")
    base = f"s3://{BUCKET}"
    parts = {"finetune": model, "evaluate": report}
    gate = st.QualityGate()
    good = {"delrec_HR@1": 0.5, "teacher_HR@1": 0.4}
    index = st.publish_bundle(store, parts, base=base, pipeline="delrec", run="r1", metrics=good, gate=gate)
    assert index["gate"]["passed"]
    latest = store.get_json(f"{base}/delrec/latest.json")
    assert latest["run"] == "r1" and latest["uri"] == f"{base}/delrec/r1"

    bad = {"delrec_HR@1": 0.3, "teacher_HR@1": 0.4}
    index = st.publish_bundle(store, parts, base=base, pipeline="delrec", run="r2", metrics=bad, gate=gate)
    assert not index["gate"]["passed"]
    assert store.get_json(f"{base}/delrec/latest.json")["run"] == "r1"  # pointer not moved
    bundle = store.get_json(f"{base}/delrec/r2/bundle.json")
    assert bundle["files"]["finetune"] == {"adapter.safetensors": hashlib.sha256(b"weights").hexdigest()}
    assert "failed" in bundle["gate"]["verdict"]
    assert store.list(f"{base}/delrec/r2") == [
        "bundle.json",
        "evaluate/report.md",
        "finetune/adapter.safetensors",
    ]
    margin = st.QualityGate(margin=0.2)
    assert margin.check(good)[0] is False
    with pytest.raises(DelrecError, match="needs metric"):
        gate.check({"delrec_HR@1": 1.0})
    with pytest.raises(DelrecError, match="unknown"):
        st.QualityGate.from_dict({"metric": "x"})
    assert json.loads(json.dumps(index))  # JSON-serialisable


def _bundle(tmp_path, name: bytes = b"weights"):
    part = tmp_path / "finetune"
    part.mkdir(exist_ok=True)
    (part / "adapter.safetensors").write_bytes(name)
    return {"finetune": part}


def test_a_published_bundle_is_never_overwritten(store, tmp_path):
    base = f"s3://{BUCKET}"
    good = {"delrec_HR@1": 0.5, "teacher_HR@1": 0.4}
    kw = {"base": base, "pipeline": "delrec", "gate": st.QualityGate()}
    st.publish_bundle(store, _bundle(tmp_path), run="job-1", metrics=good, **kw)
    worse = {"delrec_HR@1": 0.1, "teacher_HR@1": 0.4}
    with pytest.raises(DelrecError, match="refusing to overwrite"):
        st.publish_bundle(store, _bundle(tmp_path, b"other"), run="job-1", metrics=worse, **kw)
    assert store.get_bytes(f"{base}/delrec/job-1/finetune/adapter.safetensors") == b"weights"
    assert store.get_json(f"{base}/delrec/job-1/bundle.json")["metrics"] == good
    for bad_run in ("", "a/b", "latest.json", "_runs"):  # an empty job name would share one prefix
        with pytest.raises(DelrecError, match="cannot name a bundle"):
            st.publish_bundle(store, _bundle(tmp_path), run=bad_run, metrics=good, **kw)


def test_a_publish_retried_after_its_index_finishes_the_pointer(store, tmp_path, monkeypatch):
    # The pod died after writing bundle.json, before the run record and latest.json: its retry (same
    # KFP job id, same files and metrics) must finish them rather than fail on "already published".
    base = f"s3://{BUCKET}"
    good = {"delrec_HR@1": 0.5, "teacher_HR@1": 0.4}
    kw = {"base": base, "pipeline": "delrec", "gate": st.QualityGate()}

    def killed(*args, **kwargs):
        raise RuntimeError("pod evicted")

    monkeypatch.setattr(st, "advance_latest", killed)
    with pytest.raises(RuntimeError, match="evicted"):
        st.publish_bundle(store, _bundle(tmp_path), run="job-1", metrics=good, **kw)
    assert not store.exists(f"{base}/delrec/latest.json")
    monkeypatch.undo()
    index = st.publish_bundle(store, _bundle(tmp_path), run="job-1", metrics=good, **kw)
    assert index["gate"]["passed"] and store.get_json(f"{base}/delrec/latest.json")["run"] == "job-1"
    assert len(store.list(f"{base}/delrec/_runs")) == 1
    st.publish_bundle(store, _bundle(tmp_path), run="job-1", metrics=good, **kw)  # once more: no change
    assert len(store.list(f"{base}/delrec/_runs")) == 1


def test_a_challenger_must_beat_the_published_champion_too(store, tmp_path):
    base = f"s3://{BUCKET}"
    kw = {"base": base, "pipeline": "delrec", "gate": st.QualityGate()}
    st.publish_bundle(
        store, _bundle(tmp_path), run="champ", metrics={"delrec_HR@1": 0.5, "teacher_HR@1": 0.4}, **kw
    )
    # Beats the teacher, loses to the champion: published for inspection, latest stays.
    index = st.publish_bundle(
        store, _bundle(tmp_path), run="weaker", metrics={"delrec_HR@1": 0.45, "teacher_HR@1": 0.4}, **kw
    )
    assert not index["gate"]["passed"] and index["gate"]["champion"] == "champ"
    assert "champion champ" in index["gate"]["verdict"]
    assert store.get_json(f"{base}/delrec/latest.json")["run"] == "champ"
    index = st.publish_bundle(
        store, _bundle(tmp_path), run="better", metrics={"delrec_HR@1": 0.6, "teacher_HR@1": 0.4}, **kw
    )
    assert index["gate"]["passed"]
    assert store.get_json(f"{base}/delrec/latest.json")["run"] == "better"
    # A tolerance for newer data, or no champion comparison at all, are settings.
    loose = st.QualityGate(champion_margin=-0.2)
    assert loose.check(
        {"delrec_HR@1": 0.45, "teacher_HR@1": 0.4}, {"run": "c", "metrics": {"delrec_HR@1": 0.6}}
    )[0]
    alone = st.QualityGate(against_champion=False)
    assert alone.check(
        {"delrec_HR@1": 0.45, "teacher_HR@1": 0.4}, {"run": "c", "metrics": {"delrec_HR@1": 0.9}}
    )[0]
    # A champion without the candidate metric is kept rather than replaced blindly.
    assert not st.QualityGate().check({"delrec_HR@1": 0.9, "teacher_HR@1": 0.4}, {"run": "c", "metrics": {}})[
        0
    ]


def test_a_paired_gate_on_the_whole_catalogue_protocol():
    # does reranking beat the teacher on the real task (every item, not 20 candidates), beyond noise?
    gate = st.QualityGate.from_dict(
        {"candidate": "catalogue_delrec_NDCG@10", "baseline": "catalogue_teacher_NDCG@10", "paired": True}
    )
    metrics = {"catalogue_delrec_NDCG@10": 0.12, "catalogue_teacher_NDCG@10": 0.10}
    assert not gate.check({**metrics, "catalogue_delrec_minus_teacher_NDCG@10_lo": -0.01})[0]
    assert gate.check({**metrics, "catalogue_delrec_minus_teacher_NDCG@10_lo": 0.005})[0]
    with pytest.raises(DelrecError, match="paired gate compares"):
        st.QualityGate.from_dict(
            {"paired": True, "candidate": "delrec_NDCG@10", "baseline": "catalogue_teacher_NDCG@10"}
        )


def test_the_paired_gate_needs_the_bootstrap_interval_to_clear_the_margin():
    metrics = {"delrec_HR@1": 0.5, "teacher_HR@1": 0.4, "delrec_minus_teacher_HR@1_lo": -0.01}
    assert st.QualityGate().check(metrics)[0]  # the point estimates alone pass
    passed, verdict = st.QualityGate(paired=True).check(metrics)
    assert not passed and "delrec_minus_teacher_HR@1_lo" in verdict
    assert st.QualityGate(paired=True).check({**metrics, "delrec_minus_teacher_HR@1_lo": 0.02})[0]
    assert not st.QualityGate(paired=True, margin=0.05).check(
        {**metrics, "delrec_minus_teacher_HR@1_lo": 0.02}
    )[0]
    with pytest.raises(DelrecError, match="paired gate compares"):
        st.QualityGate.from_dict({"paired": True, "candidate": "delrec_HR@1", "baseline": "teacher_NDCG@5"})
    with pytest.raises(DelrecError, match="needs metric"):
        st.QualityGate(paired=True).check({"delrec_HR@1": 0.5, "teacher_HR@1": 0.4})


def test_store_cli_put_ls_latest(store, moto_endpoint, tmp_path, capsys):
    endpoint = ["--endpoint", f"http://{moto_endpoint}"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "a.bin").write_bytes(b"a")
    assert delrec_main(["store", "put", str(model), f"s3://{BUCKET}/m", *endpoint]) == 0
    assert delrec_main(["store", "ls", f"s3://{BUCKET}/m", *endpoint]) == 0
    store.put_json({"run": "r9"}, f"s3://{BUCKET}/delrec/latest.json")
    assert delrec_main(["store", "latest", f"s3://{BUCKET}/delrec", *endpoint]) == 0
    out = capsys.readouterr().out
    assert "a.bin\n" in out and '"run": "r9"' in out


# ---------------------------------------------------------------------------------------------- safety


def test_keys_that_would_land_outside_the_destination_are_refused(store, moto_endpoint, tmp_path, capsys):
    # The minio client refuses '.'/'..' segments on upload (other tools do not: see test_local_path_...).
    key = "raw//etc/evil"
    store.put_bytes(b"ok", f"s3://{BUCKET}/raw/good.txt")
    store.client.put_object(BUCKET, key, io.BytesIO(b"evil"), 4)
    assert "/etc/evil" in store.list(f"s3://{BUCKET}/raw")
    dest = tmp_path / "dest"
    code = delrec_main(
        ["store", "get", f"s3://{BUCKET}/raw", str(dest), "--endpoint", f"http://{moto_endpoint}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not map to a file inside the destination" in err, err
    assert not dest.exists() and not (tmp_path / "evil").exists() and not any(tmp_path.iterdir())


def test_local_path_refuses_escapes(tmp_path):
    assert st.local_path(tmp_path, "a/b.txt") == tmp_path / "a" / "b.txt"
    for key in ("/abs/path", "../x", "a//b", "a/./b", ""):
        with pytest.raises(DelrecError, match="inside the destination"):
            st.local_path(tmp_path, key)


def test_store_get_never_wipes_a_foreign_folder(store, moto_endpoint, tmp_path, capsys):
    store.put_bytes(b"new", f"s3://{BUCKET}/m/a.bin")
    dest = tmp_path / "home"
    dest.mkdir()
    (dest / "letters.txt").write_text("keep me")
    argv = ["store", "get", f"s3://{BUCKET}/m", str(dest), "--endpoint", f"http://{moto_endpoint}"]
    assert delrec_main(argv) == 2
    assert "is not a delrec output" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["home"] and (
        dest / "letters.txt"
    ).read_text() == "keep me"
    assert delrec_main([*argv, "--force"]) == 0
    assert [p.name for p in dest.iterdir()] == ["a.bin"]


def test_store_get_of_one_object_never_overwrites_a_file(store, moto_endpoint, tmp_path, capsys):
    store.put_bytes(b"new", f"s3://{BUCKET}/one/a.bin")
    (tmp_path / "a.bin").write_bytes(b"mine")
    argv = [
        "store",
        "get",
        f"s3://{BUCKET}/one/a.bin",
        str(tmp_path),
        "--endpoint",
        f"http://{moto_endpoint}",
    ]
    assert delrec_main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "a.bin").read_bytes() == b"mine"
    assert delrec_main([*argv, "--force"]) == 0
    assert (tmp_path / "a.bin").read_bytes() == b"new"


def test_post_copy_check_reads_the_data_and_never_deletes_the_final_key(store, monkeypatch):
    from minio.commonconfig import CopySource

    real_copy = store.client.copy_object
    removed: list[str] = []
    real_remove = store.client.remove_object

    def corrupting_copy(bucket, key, source, **kwargs):  # right metadata, wrong bytes
        result = real_copy(bucket, key, CopySource(bucket, "other"), **kwargs)
        return result

    def recording_remove(bucket, key, *args, **kwargs):
        removed.append(key)
        return real_remove(bucket, key, *args, **kwargs)

    store.client.put_object(BUCKET, "other", io.BytesIO(b"XXXX"), 4)
    monkeypatch.setattr(store.client, "copy_object", corrupting_copy)
    monkeypatch.setattr(store.client, "remove_object", recording_remove)
    with pytest.raises(st.ChecksumError, match="final object does not match"):
        store.put_bytes(b"good", f"s3://{BUCKET}/final.bin")
    assert "final.bin" not in removed  # may be another writer's good object: never deleted
    assert all(k.startswith(".delrec-tmp/") for k in removed)


def test_old_temporary_objects_of_killed_uploads_are_swept(store):
    store.client.put_object(BUCKET, ".delrec-tmp/dead/x.bin", io.BytesIO(b"x"), 1)
    fresh = st.S3Store(store.settings, client=store.client, tmp_max_age_s=3600)
    fresh.put_bytes(b"a", f"s3://{BUCKET}/a.bin")
    assert ".delrec-tmp/dead/x.bin" in all_keys(store)  # younger than an hour: maybe a live upload
    old = st.S3Store(store.settings, client=store.client, tmp_max_age_s=0)
    old.put_bytes(b"b", f"s3://{BUCKET}/b.bin")
    assert [k for k in all_keys(store) if k.startswith(".delrec-tmp/")] == []


def test_fingerprint_does_not_match_a_sibling_prefix(store):
    store.put_bytes(b"1", f"s3://{BUCKET}/raw/ml-100k/u.data")
    first = store.fingerprint(f"s3://{BUCKET}/raw/ml-100k")
    store.put_bytes(b"2", f"s3://{BUCKET}/raw/ml-100k-old/u.data")
    store.put_bytes(b"3", f"s3://{BUCKET}/raw/ml-100k.zip")
    assert store.fingerprint(f"s3://{BUCKET}/raw/ml-100k") == first
    assert store.fingerprint(f"s3://{BUCKET}/raw/ml-100k.zip") != first  # a single object works too


def _publish(store, tmp_path, run: str):
    part = tmp_path / run
    part.mkdir(exist_ok=True)
    (part / "w.bin").write_bytes(run.encode())
    good = {"delrec_HR@1": 0.5, "teacher_HR@1": 0.4}
    return st.publish_bundle(
        store, {"m": part}, base=f"s3://{BUCKET}", pipeline="p", run=run, metrics=good, gate=st.QualityGate()
    )


def test_latest_never_moves_back_to_an_older_run(store, tmp_path, monkeypatch):
    clock = iter([2_000, 1_000])  # the newer run finishes first, the older one last
    monkeypatch.setattr(st.time, "time_ns", lambda: next(clock))
    _publish(store, tmp_path, "newer")
    _publish(store, tmp_path, "older")
    assert store.get_json(f"s3://{BUCKET}/p/latest.json")["run"] == "newer"


def test_a_stale_conditional_write_rereads_instead_of_clobbering(store, tmp_path, monkeypatch):
    _publish(store, tmp_path, "r1")
    real = st._read_with_etag
    calls = []

    def stale_once(s, uri):
        pointer, etag = real(s, uri)
        calls.append(etag)
        return (pointer | {"order": 0}, "0" * 32) if len(calls) == 1 else (pointer, etag)

    monkeypatch.setattr(st, "_read_with_etag", stale_once)
    _publish(store, tmp_path, "r2")
    assert len(calls) >= 2  # the 412 made it read again
    assert store.get_json(f"s3://{BUCKET}/p/latest.json")["run"] == "r2"


def test_concurrent_publishers_converge_and_latest_never_disappears(store, tmp_path):
    import threading

    _publish(store, tmp_path, "r0")
    reads, missing, unexpected = [], [], []
    first_read, done = threading.Event(), threading.Event()

    def reader():
        """Reads latest.json until the writers are done, and once more after: any failure is kept (an
        exception escaping a thread would only end it, unnoticed)."""
        while True:
            finished = done.is_set()
            try:
                reads.append(store.get_json(f"s3://{BUCKET}/p/latest.json")["run"])
            except S3Error as exc:
                missing.append(exc.code)
            except Exception as exc:  # a torn or unreadable latest.json, say
                unexpected.append(repr(exc))
            first_read.set()
            if finished:
                return

    watcher = threading.Thread(target=reader)
    watcher.start()
    first_read.wait()  # the reader is running before the first writer starts
    writers = [threading.Thread(target=_publish, args=(store, tmp_path, f"r{i}")) for i in range(1, 5)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    watcher.join()
    assert missing == [] and unexpected == []
    assert len(reads) >= 2  # one before the writers started, one after they finished
    records = store.list(f"s3://{BUCKET}/p/_runs")
    newest = store.get_json(f"s3://{BUCKET}/p/_runs/{max(records)}")
    assert store.get_json(f"s3://{BUCKET}/p/latest.json")["run"] == newest["run"] == reads[-1]


def test_source_fingerprint_of_each_kind_of_source(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "u.data").write_text("1\t1\t5\t1\n")
    local = st.source_fingerprint(str(raw))
    assert local == st.local_fingerprint(raw) and st.source_fingerprint(raw.as_uri()) == local
    (raw / "u.data").write_text("1\t1\t5\t2\n")
    assert st.source_fingerprint(str(raw)) != local
    # Nothing to list: the dataset's default download, or a web URL (the URL itself is in the key).
    assert st.source_fingerprint(None) == st.source_fingerprint("https://example.org/ml-100k.zip") == ""
    with pytest.raises(DelrecError, match="no such file"):
        st.source_fingerprint(str(tmp_path / "missing"))


def test_remove_prefix_removes_that_prefix_only(store):
    base = f"s3://{BUCKET}/checkpoints/run-1"
    for key in ("finetune/state.pt", "finetune/sub/x", "finetune-ablation/state.pt"):
        store.put_bytes(b"x", f"{base}/{key}")
    assert store.remove_prefix(f"{base}/finetune") == 2
    assert store.list(base) == ["finetune-ablation/state.pt"]
