"""Fetching a dataset source: local path, http(s)/file URL (cached, checksummed) or s3:// URI.

URLs are downloaded once into the cache folder (``$DELREC_CACHE``, else ``~/.cache/delrec``) through a
temporary file renamed into place, so a killed download never looks complete. A zip archive is
extracted next to it (again via a temporary folder); where the files inside have known sha256 sums
(ML-100K's ``u.data`` and ``u.item``) they are checked before the extraction is kept, and again each
time the cached extraction is used.

``s3://`` sources are copied with ``delrec.store.download_prefix(uri, dest_dir)`` into a temporary
folder that lives only while the source is read: object storage is the pipeline's own store, not a
third-party download, so it is not cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from tqdm import tqdm

from delrec.artifacts import file_sha256, local_path, temp_dir, temp_file
from delrec.errors import DelrecError

log = logging.getLogger(__name__)

_CHUNK = 1 << 16


def cache_dir() -> Path:
    """The download cache: ``$DELREC_CACHE`` if set, else ``~/.cache/delrec``."""
    return Path(os.environ.get("DELREC_CACHE") or Path.home() / ".cache" / "delrec")


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def download(url: str, dest: Path, *, sha256: str | None = None, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` unless it is already there; verify ``sha256`` when given.

    The file is streamed into a temporary file beside ``dest`` and renamed only when complete and
    verified. A cached file that fails its checksum is removed and downloaded again.
    """
    if dest.is_file():
        if sha256 is None or file_sha256(dest) == sha256:
            log.info("using cached %s", dest)
            return dest
        log.warning("cached %s fails its checksum: downloading it again", dest)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = temp_file(f".{dest.name}.", dest.parent, suffix=".part")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = response.headers.get("Content-Length")
            expected_size = int(total) if total else None
            with tqdm(total=expected_size, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while block := response.read(_CHUNK):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
            size = out.tell()
        if expected_size is not None and size != expected_size:
            raise DelrecError(
                f"download truncated: got {size} of {expected_size} bytes", path=redact_url(url)
            )
        if sha256 is not None and digest.hexdigest() != sha256:
            raise DelrecError(
                f"sha256 {digest.hexdigest()} does not match the expected {sha256}", path=redact_url(url)
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise DelrecError(
            f"download failed ({exc}); pass a local copy with --source", path=redact_url(url)
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s (%d bytes)", dest, size)
    return dest


def verify_files(root: Path, checksums: Mapping[str, str], *, origin: str) -> None:
    """Check that each file named in ``checksums`` (searched anywhere under ``root``) has that sha256."""
    for name, expected in checksums.items():
        found = sorted(root.rglob(name))
        if not found:
            raise DelrecError(f"{name} is missing from the download", path=origin)
        got = file_sha256(found[0])
        if got != expected:
            raise DelrecError(
                f"sha256 of {name} is {got}, expected {expected}: not the known release of this dataset",
                path=origin,
            )


def extract_zip(archive: Path, dest: Path, *, checksums: Mapping[str, str] | None = None) -> Path:
    """Extract ``archive`` into ``dest`` (via a temporary folder), verifying ``checksums`` first.

    An earlier extraction in ``dest`` is used if its files still match ``checksums``; else it is
    extracted again.
    """
    if dest.is_dir():
        try:
            verify_files(dest, checksums or {}, origin=str(dest))
            return dest
        except DelrecError as exc:
            log.warning("cached %s is damaged (%s): extracting it again", dest, exc)
            shutil.rmtree(dest)
    tmp = temp_dir(f".{dest.name}.", dest.parent)
    try:
        unzip(archive, tmp)
        if checksums:
            verify_files(tmp, checksums, origin=str(archive))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# Caps on what a zip archive may unpack to (a "zip bomb" expands a few KB into many GB).
ZIP_MAX_BYTES = int(os.environ.get("DELREC_ZIP_MAX_BYTES", 8 << 30))
ZIP_MAX_MEMBERS = int(os.environ.get("DELREC_ZIP_MAX_MEMBERS", 10_000))


def unzip(archive: Path, dest: Path, *, max_bytes: int | None = None, max_members: int | None = None) -> None:
    """Extract a zip archive, turning a truncated or corrupt one into a clear error.

    Refuses an archive of more than ``max_bytes`` uncompressed (default :data:`ZIP_MAX_BYTES`,
    ``$DELREC_ZIP_MAX_BYTES``) or ``max_members`` members (:data:`ZIP_MAX_MEMBERS`) before
    decompressing anything; zipfile never writes more than a member's declared size.
    """
    max_bytes = ZIP_MAX_BYTES if max_bytes is None else max_bytes
    max_members = ZIP_MAX_MEMBERS if max_members is None else max_members
    try:
        with zipfile.ZipFile(archive) as handle:
            members = handle.infolist()
            if len(members) > max_members:
                raise DelrecError(
                    f"{len(members)} members, more than the {max_members} allowed "
                    "(DELREC_ZIP_MAX_MEMBERS raises the cap)",
                    path=archive,
                )
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                raise DelrecError(
                    f"unpacks to {total} bytes, more than the {max_bytes} allowed "
                    "(DELREC_ZIP_MAX_BYTES raises the cap)",
                    path=archive,
                )
            bad = handle.testzip()
            if bad is not None:
                raise DelrecError(f"corrupt zip archive: member {bad} fails its CRC check", path=archive)
            handle.extractall(dest)  # extractall drops absolute paths and '..' from member names
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise DelrecError(f"not a readable zip archive ({exc})", path=archive) from exc


def redact_url(source: str) -> str:
    """``source`` with credentials removed: ``user:password@`` and every query value (presigned URLs
    carry their signature and key id there). Local paths and plain URLs come back unchanged."""
    parsed = urllib.parse.urlsplit(source)
    if len(parsed.scheme) <= 1:  # a path (or a Windows drive letter)
        return source
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = "REDACTED@" + netloc.rsplit("@", 1)[1]
    query = parsed.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = "&".join(f"{urllib.parse.quote(key)}=REDACTED" for key, _ in pairs) or "REDACTED"
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, query, parsed.fragment))


def _url_cache_name(url: str) -> str:
    """A cache file name for ``url``: its base name, prefixed by a hash so two URLs never collide."""
    base = Path(urllib.parse.urlparse(url).path).name or "download"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{base}"


def fetch_url(url: str, *, cache: Path | None = None, checksums: Mapping[str, str] | None = None) -> Path:
    """Download ``url`` into the cache once; a zip comes back extracted (and its files verified)."""
    cache = cache or cache_dir()
    archive = download(url, cache / "downloads" / _url_cache_name(url))
    if not checksums:
        log.warning(
            "%s: no known checksums, so this download is not verified as a known release", redact_url(url)
        )
    if not zipfile.is_zipfile(archive):
        if checksums:
            archive.unlink()
            raise DelrecError(f"expected a zip archive holding {', '.join(checksums)}", path=redact_url(url))
        return archive
    try:
        return extract_zip(archive, archive.with_name(archive.name.removesuffix(".zip")), checksums=checksums)
    except DelrecError:
        # A download that is not the known release must not stay in the cache as if it were.
        archive.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def local_source(
    source: str, *, cache: Path | None = None, checksums: Mapping[str, str] | None = None
) -> Iterator[Path]:
    """Yield a local path for ``source`` (a path, an http(s)/file URL or an s3:// URI).

    http(s) URLs are cached (see :func:`fetch_url`); an s3:// prefix is copied into a temporary folder that
    is removed when the block ends. A local path or ``file://`` URL is used as it is (a zip is read by
    :func:`delrec.data.formats.read_path`).
    """
    scheme = urllib.parse.urlparse(source).scheme
    if scheme == "s3":
        # Imported here: the store module (minio client) is needed only for s3:// sources.
        from delrec.store import download_prefix

        with tempfile.TemporaryDirectory(prefix="delrec-s3-") as tmp:
            dest = Path(tmp) / "source"
            dest.mkdir()
            download_prefix(source, dest)
            entries = list(dest.iterdir())
            if not entries:
                raise DelrecError("no objects under this prefix", path=source)
            # A single object (say a zip) is the source itself, not a folder holding it.
            yield entries[0] if len(entries) == 1 and entries[0].is_file() else dest
        return
    if scheme == "file":
        # Read where it is, as a path: a cached copy would go stale when the file changes in place.
        path = local_path(source)
    elif is_url(source):
        yield fetch_url(source, cache=cache, checksums=checksums)
        return
    elif scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise DelrecError(
            f"unsupported source scheme {scheme!r}; expected a path, http(s)://, file:// or s3://"
        )
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise DelrecError("source not found", path=path)
    yield path
