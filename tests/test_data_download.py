"""Downloads, the cache and checksums, against a local HTTP server (no test touches the network)."""

from __future__ import annotations

import functools
import http.server
import shutil
import sys
import threading
import types
import zipfile
from pathlib import Path

import pytest
from test_data_formats import write_ml100k, zip_folder

from delrec.artifacts import file_sha256
from delrec.data import PreprocessConfig, load_dataset, preprocess
from delrec.data import sources as sources_module
from delrec.data.download import download, fetch_url, local_source
from delrec.errors import DelrecError


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (the http.server API)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler.requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_download_once_into_the_cache(tmp_path, server, caplog):
    base, root, requests = server
    archive = zip_folder(write_ml100k(tmp_path / "ml"), root / "ml-100k.zip", "ml-100k")
    sums = {name: file_sha256(tmp_path / "ml" / name) for name in ("u.data", "u.item")}
    cache = tmp_path / "cache"
    url = f"{base}/ml-100k.zip"
    with caplog.at_level("WARNING"):
        fetch_url(url, cache=tmp_path / "unverified")  # no checksums (ml-1m's case): said, not silent
    assert "not verified" in caplog.text
    requests.clear()
    folder = fetch_url(url, cache=cache, checksums=sums)
    assert (folder / "ml-100k" / "u.data").read_bytes() == (tmp_path / "ml" / "u.data").read_bytes()
    assert fetch_url(url, cache=cache, checksums=sums) == folder
    assert requests == ["/ml-100k.zip"]  # the second call used the cache
    assert not [p for p in (cache / "downloads").iterdir() if p.name.startswith(".")]  # no temporary files

    # The whole stage from a URL, with the dataset's known checksums set to this fixture's.
    known = sources_module.DATASETS["ml-100k"]
    patched = {
        **sources_module.DATASETS,
        "ml-100k": type(known)(known.format, known.domain, url=url, checksums=sums),
    }
    mp = pytest.MonkeyPatch()
    mp.setattr(sources_module, "DATASETS", patched)
    mp.setenv("DELREC_CACHE", str(cache))
    try:
        stats = preprocess(PreprocessConfig(dataset="ml-100k", num_candidates=5), tmp_path / "out")
    finally:
        mp.undo()
    assert stats["source"] == url and stats["users"] == 6
    assert requests == ["/ml-100k.zip"]
    assert archive.exists()


def test_checksum_mismatch_is_refused_and_not_cached(tmp_path, server, capsys):
    """A fake ml-100k.zip fails the real ML-100K checksums; nothing stays in the cache or at --out."""
    base, root, requests = server
    zip_folder(write_ml100k(tmp_path / "ml"), root / "ml-100k.zip", "ml-100k")
    cache = tmp_path / "cache"
    from delrec.cli import main

    out = tmp_path / "out"
    args = ["preprocess", "--dataset", "ml-100k", "--source", f"{base}/ml-100k.zip", "--out", str(out)]
    assert main([*args, "--cache-dir", str(cache)]) == 2
    message = capsys.readouterr().err
    assert "sha256 of u.data" in message and "ml-100k.zip" in message
    assert not out.exists()
    assert [p for p in (cache / "downloads").iterdir()] == []


def test_real_ml100k_files_pass_the_known_checksums(tmp_path, server):
    source = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "ml-100k"
    if not source.is_dir():
        pytest.skip(f"{source} not present")
    base, root, _ = server
    zip_folder(source, root / "ml-100k.zip", "ml-100k")  # a temporary copy, as GroupLens lays it out
    checksums = sources_module.DATASETS["ml-100k"].checksums
    folder = fetch_url(f"{base}/ml-100k.zip", cache=tmp_path / "cache", checksums=checksums)
    assert (folder / "ml-100k" / "u.item").is_file()


def test_truncated_download_and_http_errors(tmp_path, server):
    base, root, _ = server
    (root / "file.bin").write_bytes(b"x" * 1000)
    with pytest.raises(DelrecError, match="404"):
        download(f"{base}/missing.zip", tmp_path / "c" / "missing.zip")
    with pytest.raises(DelrecError, match="sha256"):
        download(f"{base}/file.bin", tmp_path / "c" / "file.bin", sha256="0" * 64)
    assert list((tmp_path / "c").iterdir()) == []
    got = download(f"{base}/file.bin", tmp_path / "c" / "file.bin", sha256=file_sha256(root / "file.bin"))
    assert got.read_bytes() == b"x" * 1000


def test_a_corrupt_cached_file_is_downloaded_again(tmp_path, server):
    base, root, requests = server
    (root / "a.txt").write_text("hello")
    dest = tmp_path / "c" / "a.txt"
    download(f"{base}/a.txt", dest, sha256=file_sha256(root / "a.txt"))
    dest.write_text("garbage")
    download(f"{base}/a.txt", dest, sha256=file_sha256(root / "a.txt"))
    assert dest.read_text() == "hello" and requests == ["/a.txt", "/a.txt"]


def test_a_damaged_cached_extraction_is_extracted_again(tmp_path, server, caplog):
    base, root, requests = server
    zip_folder(write_ml100k(tmp_path / "ml"), root / "ml-100k.zip", "ml-100k")
    sums = {name: file_sha256(tmp_path / "ml" / name) for name in ("u.data", "u.item")}
    url = f"{base}/ml-100k.zip"
    folder = fetch_url(url, cache=tmp_path / "cache", checksums=sums)
    damaged = folder / "ml-100k" / "u.data"
    damaged.write_text(damaged.read_text()[:200])
    assert fetch_url(url, cache=tmp_path / "cache", checksums=sums) == folder
    assert file_sha256(damaged) == sums["u.data"]
    assert "is damaged" in caplog.text and requests == ["/ml-100k.zip"]


def test_a_file_url_is_read_where_it_is_even_after_it_changes(tmp_path):
    archive = zip_folder(write_ml100k(tmp_path / "ml"), tmp_path / "ml.zip", "ml-100k")
    with local_source(archive.as_uri(), cache=tmp_path / "cache") as path:
        assert path == archive
    config = PreprocessConfig(dataset="ml-1m", source=archive.as_uri(), num_candidates=5)
    stats = preprocess(config, tmp_path / "out", cache=tmp_path / "cache")
    assert stats["users"] == 6
    # The file changes in place (a corrected export): the next run reads the new one, not a cached copy.
    data = tmp_path / "ml" / "u.data"
    data.write_text(
        "".join(line for line in data.read_text().splitlines(keepends=True) if not line.startswith("6\t"))
    )
    zip_folder(tmp_path / "ml", archive, "ml-100k")
    assert preprocess(config, tmp_path / "out", cache=tmp_path / "cache")["users"] == 5


def test_s3_source_goes_through_the_store(tmp_path, monkeypatch):
    """s3:// sources are copied with delrec.store.download_prefix into a folder removed afterwards."""
    fixture = write_ml100k(tmp_path / "ml")
    calls, folders = [], []

    def download_prefix(uri, dest):
        calls.append(uri)
        folders.append(Path(dest))
        shutil.copytree(fixture, Path(dest) / "ml-100k")

    monkeypatch.setitem(sys.modules, "delrec.store", types.SimpleNamespace(download_prefix=download_prefix))
    stats = preprocess(
        PreprocessConfig(dataset="ml-100k", source="s3://bucket/raw/ml-100k", num_candidates=5),
        tmp_path / "out",
    )
    assert calls == ["s3://bucket/raw/ml-100k"] and stats["source"] == "s3://bucket/raw/ml-100k"
    assert load_dataset(tmp_path / "out").num_users == 6
    assert len(folders) == 1 and not folders[0].exists()


def test_zip_members_cannot_escape(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../outside.txt", "x")
        handle.writestr("ml-100k/u.data", "1\t1\t1\t1\n")
    with local_source(archive.as_uri(), cache=tmp_path / "cache") as folder:
        assert not (folder.parent / "outside.txt").exists()
    assert not (tmp_path / "cache" / "outside.txt").exists()
