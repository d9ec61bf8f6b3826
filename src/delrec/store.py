"""Object storage: S3 / MinIO / SeaweedFS through the ``minio`` client.

Used to ingest raw datasets (``delrec data upload``, preprocess reading an ``s3://`` source) and to
publish a trained model bundle behind a quality gate.

Writes are atomic: an object is first uploaded under a temporary key outside the destination prefix
(``.delrec-tmp/<uuid>/...``), its ETag is checked against the locally computed MD5 (or the multipart
ETag), then it is copied server-side to the final key with its SHA-256 in the object's metadata, read
back and hashed, and the temporary key is removed. A final key is never deleted (after a mismatch it
may hold another writer's good object). Temporary keys older than a day, left by killed uploads, are
swept before the first upload to a bucket. Each object write and read is retried with exponential
backoff on transient errors; downloads verify the SHA-256 (or the MD5 ETag for objects written by
other tools) before the file appears at its path, and a key that would land outside the destination
folder is refused.

Publishing a bundle writes only keys of its own run, plus a per-run record under ``_runs/`` named by
a monotonic order (the publish time in ns); ``latest.json`` is then moved to the highest-ordered record
with a conditional write (``If-Match`` the ETag read, ``If-None-Match: *`` when absent) and re-checked
until it names the newest run, so it never disappears and never ends on an older run. MinIO supports
conditional PUTs; SeaweedFS since 3.97 (earlier ones ignore the headers, and a concurrent burst may
still slip through: the re-check then restores the newest run).

Credentials come only from the environment (``DELREC_S3_ACCESS_KEY`` / ``DELREC_S3_SECRET_KEY``, or
the ``AWS_*`` names), which the pipeline fills from a Kubernetes secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlparse

from delrec.artifacts import atomic_dir, config_hash, file_sha256, temp_file
from delrec.errors import DelrecError

log = logging.getLogger(__name__)

T = TypeVar("T")

TMP_PREFIX = ".delrec-tmp"
SHA_META = "sha256"
DEFAULT_PART_SIZE = 64 << 20
LATEST = "latest.json"
BUNDLE_INDEX = "bundle.json"
RUNS = "_runs"
TMP_MAX_AGE_S = 24 * 3600.0
# Conditional-write answers that mean "someone else changed it first: read again".
CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}
# S3 error codes worth retrying: the server is busy or the request timed out.
TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"}


class ChecksumError(DelrecError):
    """Data arrived corrupted (checksum mismatch); retried like a network error."""


# --------------------------------------------------------------------------- settings and URIs


def _env_flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class S3Settings:
    """Where the object store is and how to talk to it (credentials excepted: those stay in the env)."""

    endpoint: str
    """``host:port``, or a URL whose scheme (http/https) decides TLS"""
    secure: bool = True
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint: str | None = None, secure: bool | None = None) -> S3Settings:
        """Arguments win over ``DELREC_S3_ENDPOINT`` / ``DELREC_S3_SECURE`` / ``DELREC_S3_REGION``; an
        ``http://`` or ``https://`` endpoint decides TLS whatever ``secure`` says."""
        endpoint = endpoint or os.environ.get("DELREC_S3_ENDPOINT", "")
        if not endpoint:
            raise DelrecError(
                "no object-store endpoint: pass --endpoint or set DELREC_S3_ENDPOINT=host:port "
                "(on a cluster: the delrec-object-store ConfigMap, pipeline option s3_config_map)"
            )
        parsed = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
        env_secure = os.environ.get("DELREC_S3_SECURE")
        if parsed.scheme in ("http", "https"):
            by_scheme = parsed.scheme == "https"
            if secure is not None and secure != by_scheme:
                raise DelrecError(
                    f"endpoint {endpoint!r} says {parsed.scheme}, but TLS was set "
                    f"{'on' if secure else 'off'}: drop the scheme or make them agree",
                    field="s3_secure",
                )
            if env_secure is not None and _env_flag(env_secure) != by_scheme:
                log.warning(
                    "endpoint %s uses %s although DELREC_S3_SECURE=%s: TLS is %s",
                    endpoint,
                    parsed.scheme,
                    env_secure,
                    "on" if by_scheme else "OFF",
                )
            secure = by_scheme
        elif secure is None:
            secure = _env_flag(env_secure if env_secure is not None else "1")
        return cls(endpoint=parsed.netloc, secure=secure, region=os.environ.get("DELREC_S3_REGION") or None)


def _credentials() -> tuple[str, str]:
    access = os.environ.get("DELREC_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("DELREC_S3_SECRET_KEY") or os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access or not secret:
        raise DelrecError(
            "no object-store credentials: set DELREC_S3_ACCESS_KEY and DELREC_S3_SECRET_KEY "
            "(in a cluster the pipeline sets them from a Kubernetes secret)"
        )
    return access, secret


ENV_CREDENTIALS_USERS = "DELREC_S3_CREDENTIALS_USERS"
"""Set on prepare's pod: the later tasks that mount the object-store secret without ``optional``."""


def require_credentials(publish_to: str = "") -> None:
    """Fails before anything runs when later tasks need object-store credentials that did not reach this
    task: the training tasks checkpointing to s3:// (``ENV_CREDENTIALS_USERS``), and publish and recommend
    when ``publish_to`` is set. Their pods get the secret without ``optional``; were it missing, each
    would wait in CreateContainerConfigError, a GPU task holding its GPU, until its timeout."""
    users = [name for name in os.environ.get(ENV_CREDENTIALS_USERS, "").split(",") if name]
    if publish_to:
        users += ["publish", "recommend"]
    if not users:
        return
    try:
        _credentials()
    except DelrecError:
        raise DelrecError(
            f"{', '.join(users)} need object-store credentials, and none reached this task: create the "
            "secret the run's s3_secret parameter names (default delrec-s3; docs/cluster.md) with the keys "
            "accesskey and secretkey, or locally set DELREC_S3_ACCESS_KEY and DELREC_S3_SECRET_KEY. "
            "Without it those pods would wait for the secret until their timeout.",
            field="s3_secret",
        ) from None


def is_s3_uri(value: str | os.PathLike | None) -> bool:
    return isinstance(value, str) and value.startswith("s3://")


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (the key may be empty)."""
    if not is_s3_uri(uri):
        raise DelrecError(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise DelrecError(f"no bucket in {uri!r}")
    if not _BUCKET_NAME.fullmatch(bucket):
        raise DelrecError(
            f"invalid bucket name {bucket!r} in {uri!r}: S3 bucket names are 3-63 lower-case letters, "
            "digits, dots and hyphens, starting and ending with a letter or digit"
        )
    return bucket, key.strip("/")


_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


# --------------------------------------------------------------------------- retries


def _is_transient(exc: BaseException) -> bool:
    from minio.error import S3Error, ServerError
    from urllib3.exceptions import HTTPError

    if isinstance(exc, S3Error):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False  # a local file problem: retrying will not fix it
    # ChecksumError: corrupted in transit; OSError covers ConnectionError, timeouts and broken streams.
    return isinstance(exc, ServerError | HTTPError | ChecksumError | OSError)


def _is_unreachable(exc: BaseException) -> bool:
    from minio.error import ServerError
    from urllib3.exceptions import HTTPError

    return isinstance(exc, ServerError | HTTPError | ConnectionError | TimeoutError)


def retry(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 20.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds; on a transient error wait ``base_delay * 2**i`` (capped) and retry."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt == attempts:
                if _is_unreachable(exc):  # the user's endpoint or network, not a bug: say so
                    reason = getattr(exc, "reason", None) or exc
                    raise DelrecError(
                        f"{what}: the object store failed {attempts} times ({reason}); "
                        "check the endpoint (DELREC_S3_ENDPOINT, --endpoint) and the network"
                    ) from exc
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            log.warning(
                "%s failed (%s: %s); retry %d/%d in %.1fs",
                what,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- checksums


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str
    etag: str
    """the ETag S3 gives this content when uploaded with the store's part size"""


def digest_stream(stream: BinaryIO, part_size: int) -> Digest:
    """SHA-256 of the content and its expected S3 ETag (MD5, or MD5 of part MD5s + "-N" if multipart)."""
    sha = hashlib.sha256()
    part_md5s: list[bytes] = []
    size = 0
    while block := stream.read(part_size):
        sha.update(block)
        part_md5s.append(hashlib.md5(block).digest())
        size += len(block)
    if len(part_md5s) <= 1:
        etag = (part_md5s[0] if part_md5s else hashlib.md5(b"").digest()).hex()
    else:
        etag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
    return Digest(size=size, sha256=sha.hexdigest(), etag=etag)


def _meta(stat: Any, name: str) -> str | None:
    metadata = stat.metadata or {}
    for key in (f"x-amz-meta-{name}", name):
        for candidate in (key, key.lower(), key.title()):
            if candidate in metadata:
                return metadata[candidate]
    return None


# --------------------------------------------------------------------------- the store


class S3Store:
    """Atomic, verified, retried object operations on one S3-compatible endpoint."""

    def __init__(
        self,
        settings: S3Settings,
        *,
        client: Any | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        attempts: int = 5,
        base_delay: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        tmp_max_age_s: float = TMP_MAX_AGE_S,
    ):
        if client is None:
            from minio import Minio

            access, secret = _credentials()
            client = Minio(
                settings.endpoint,
                access_key=access,
                secret_key=secret,
                secure=settings.secure,
                region=settings.region,
            )
        self.settings = settings
        self.client = client
        self.part_size = part_size
        self._retry_args = {"attempts": attempts, "base_delay": base_delay, "sleep": sleep}
        self.tmp_max_age_s = tmp_max_age_s
        self._swept: set[str] = set()

    @classmethod
    def from_env(cls, endpoint: str | None = None, secure: bool | None = None, **kwargs: Any) -> S3Store:
        return cls(S3Settings.from_env(endpoint, secure), **kwargs)

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry(fn, what=what, **self._retry_args)

    # ---- writes

    def ensure_bucket(self, bucket: str) -> None:
        if not self._retry(lambda: self.client.bucket_exists(bucket), f"check bucket {bucket}"):
            self._retry(lambda: self.client.make_bucket(bucket), f"create bucket {bucket}")

    def sweep_tmp(self, bucket: str, *, now: float | None = None) -> list[str]:
        """Remove temporary objects of killed uploads (older than ``tmp_max_age_s``); returns their keys."""
        now = time.time() if now is None else now

        def listing() -> list[str]:
            objects = self.client.list_objects(bucket, prefix=f"{TMP_PREFIX}/", recursive=True)
            return [
                o.object_name
                for o in objects
                if not o.is_dir
                and o.last_modified is not None
                and now - o.last_modified.timestamp() > self.tmp_max_age_s
            ]

        stale = self._retry(listing, f"list {bucket}/{TMP_PREFIX}")
        for key in stale:
            with contextlib.suppress(Exception):
                self.client.remove_object(bucket, key)
        if stale:
            log.info("removed %d temporary object(s) left by killed uploads in %s", len(stale), bucket)
        return stale

    def _hash_remote(self, bucket: str, key: str) -> tuple[int, str]:
        """Size and sha256 of an object's data as the store serves it now."""
        sha, size = hashlib.sha256(), 0
        response = self.client.get_object(bucket, key)
        try:
            for block in response.stream(1 << 20):
                sha.update(block)
                size += len(block)
        finally:
            response.close()
            response.release_conn()
        return size, sha.hexdigest()

    def _put(self, open_stream: Callable[[], BinaryIO], uri: str, content_type: str) -> Digest:
        from minio.commonconfig import REPLACE, CopySource

        bucket, key = parse_uri(uri)
        if not key:
            raise DelrecError(f"{uri!r} names a bucket, not an object")
        if bucket not in self._swept:
            self._swept.add(bucket)
            self.sweep_tmp(bucket)
        with open_stream() as stream:
            digest = digest_stream(stream, self.part_size)

        def attempt() -> None:
            tmp = f"{TMP_PREFIX}/{uuid.uuid4().hex}/{key}"
            try:
                with open_stream() as stream:
                    result = self.client.put_object(
                        bucket,
                        tmp,
                        stream,
                        digest.size,
                        content_type=content_type,
                        part_size=self.part_size,
                        num_parallel_uploads=1,
                    )
                got = (result.etag or "").strip('"')
                if got != digest.etag:
                    raise ChecksumError(f"uploaded ETag {got} != local {digest.etag}", path=uri)
                self.client.copy_object(
                    bucket,
                    key,
                    CopySource(bucket, tmp),
                    metadata={SHA_META: digest.sha256},
                    metadata_directive=REPLACE,
                )
                # Check the data now under the key, not the metadata just written. On a mismatch the
                # key is left alone: it may hold another writer's good object; the retry rewrites it.
                size, sha = self._hash_remote(bucket, key)
                if size != digest.size or sha != digest.sha256:
                    raise ChecksumError("final object does not match the upload", path=uri)
            finally:
                with contextlib.suppress(Exception):
                    self.client.remove_object(bucket, tmp)

        self._retry(attempt, f"upload {uri}")
        log.info("uploaded %s (%d bytes, sha256 %s)", uri, digest.size, digest.sha256[:12])
        return digest

    def put_file(self, path: str | os.PathLike, uri: str) -> Digest:
        """Upload one file atomically to ``uri``; returns its size and checksums."""
        path = Path(path)
        if not path.is_file():
            raise DelrecError("not a file", path=path)
        return self._put(lambda: open(path, "rb"), uri, "application/octet-stream")

    def put_bytes(self, data: bytes, uri: str, content_type: str = "application/octet-stream") -> Digest:
        return self._put(lambda: io.BytesIO(data), uri, content_type)

    def put_json(self, obj: Any, uri: str) -> Digest:
        blob = (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
        return self.put_bytes(blob, uri, "application/json")

    def put_dir(self, folder: str | os.PathLike, uri: str) -> dict[str, str]:
        """Upload every file under ``folder`` to ``uri/<relative path>``; returns {relative path: sha256}."""
        folder = Path(folder)
        if not folder.is_dir():
            raise DelrecError("not a folder", path=folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        if not files:
            raise DelrecError("folder is empty: nothing to upload", path=folder)
        return {
            p.relative_to(folder).as_posix(): self.put_file(
                p, join_uri(uri, p.relative_to(folder).as_posix())
            ).sha256
            for p in files
        }

    def remove(self, uri: str) -> None:
        """Remove the object ``uri``."""
        bucket, key = parse_uri(uri)
        self._retry(lambda: self.client.remove_object(bucket, key), f"remove {uri}")

    def remove_prefix(self, uri: str) -> int:
        """Remove every object under the prefix ``uri/``; returns how many were removed."""
        bucket, _ = parse_uri(uri)
        keys = self.list(uri)
        for key in keys:
            target = parse_uri(join_uri(uri, key))[1]
            self._retry(lambda t=target: self.client.remove_object(bucket, t), f"remove {uri}/{key}")
        return len(keys)

    # ---- reads

    def exists(self, uri: str) -> bool:
        from minio.error import S3Error

        bucket, key = parse_uri(uri)
        try:
            self._retry(lambda: self.client.stat_object(bucket, key), f"stat {uri}")
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                return False
            raise
        return True

    def list(self, uri: str) -> list[str]:
        """Keys under the prefix ``uri`` (recursive), relative to it; temporary keys are never listed."""
        bucket, prefix = parse_uri(uri)
        prefix = f"{prefix}/" if prefix else ""

        def listing() -> list[str]:
            objects = self.client.list_objects(bucket, prefix=prefix, recursive=True)
            return sorted(o.object_name[len(prefix) :] for o in objects if not o.is_dir)

        return [k for k in self._retry(listing, f"list {uri}") if not k.startswith(f"{TMP_PREFIX}/")]

    def fingerprint(self, uri: str) -> str:
        """A short hash of the keys and ETags of the object ``uri`` or under the prefix ``uri/``.

        ``raw/ml-100k`` covers ``raw/ml-100k`` and ``raw/ml-100k/...``, never ``raw/ml-100k-old/...``.
        """
        bucket, key = parse_uri(uri)
        prefix = f"{key}/" if key else ""

        def listing() -> dict[str, str]:
            found = {}
            objects = self.client.list_objects(bucket, prefix=key or None, recursive=False)
            for o in objects:  # the object named exactly ``key`` (a single-file source)
                if key and o.object_name == key and not o.is_dir:
                    found[o.object_name] = (o.etag or "").strip('"')
            for o in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                if not o.is_dir and not o.object_name.startswith(f"{TMP_PREFIX}/"):
                    found[o.object_name] = (o.etag or "").strip('"')
            return found

        found = self._retry(listing, f"list {uri}")
        if not found:
            raise DelrecError("no objects under this prefix", path=uri)
        return config_hash(found)

    def get_file(self, uri: str, dest: str | os.PathLike) -> Path:
        """Download ``uri`` to ``dest`` and verify it; ``dest`` appears only once verified."""
        bucket, key = parse_uri(uri)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)

        def attempt() -> None:
            stat = self.client.stat_object(bucket, key)
            expected_sha = _meta(stat, SHA_META)
            etag = (stat.etag or "").strip('"')
            fd, tmp = temp_file(f".{dest.name}.", dest.parent)
            try:
                sha, md5 = hashlib.sha256(), hashlib.md5()
                response = self.client.get_object(bucket, key)
                try:
                    with os.fdopen(fd, "wb") as out:
                        for block in response.stream(1 << 20):
                            sha.update(block)
                            md5.update(block)
                            out.write(block)
                finally:
                    response.close()
                    response.release_conn()
                if expected_sha is not None:
                    if sha.hexdigest() != expected_sha:
                        raise ChecksumError(f"sha256 {sha.hexdigest()} != stored {expected_sha}", path=uri)
                elif "-" not in etag:
                    if md5.hexdigest() != etag:
                        raise ChecksumError(f"md5 {md5.hexdigest()} != ETag {etag}", path=uri)
                else:
                    log.warning("%s: no sha256 metadata and a multipart ETag: not verified", uri)
                os.replace(tmp, dest)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

        self._retry(attempt, f"download {uri}")
        return dest

    def get_bytes(self, uri: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            return self.get_file(uri, Path(tmp) / "object").read_bytes()

    def get_json(self, uri: str) -> Any:
        return json.loads(self.get_bytes(uri))

    def get_dir(self, uri: str, dest: str | os.PathLike, *, force: bool = False) -> Path:
        """Download every object under the prefix ``uri`` into ``dest`` (written atomically).

        An existing ``dest`` is replaced only if it is empty or a delrec output (or ``force``).
        """
        keys = self.list(uri)
        if not keys:
            raise DelrecError("no objects under this prefix", path=uri)
        with atomic_dir(dest, force=force) as tmp:
            for key in keys:
                self.get_file(join_uri(uri, key), local_path(tmp, key, uri, shown=dest))
        return Path(dest)

    def fetch(self, uri: str, dest: str | os.PathLike, *, force: bool = False) -> Path:
        """Download ``uri`` (one object into the folder ``dest``, or a prefix as a folder: see
        :meth:`get_dir`). An existing file of the object's name is replaced only with ``force``."""
        if parse_uri(uri)[1] and self.exists(uri):
            target = Path(dest) / Path(parse_uri(uri)[1]).name
            if target.exists() and not force:
                raise DelrecError(
                    f"{target} exists: refusing to overwrite it (pass --force to replace it)",
                    path=target,
                    field="dest",
                )
            return self.get_file(uri, target)
        return self.get_dir(uri, dest, force=force)


def local_path(
    dest: str | os.PathLike, key: str, uri: str = "", shown: str | os.PathLike | None = None
) -> Path:
    """Where object ``key`` (relative to a prefix) goes under ``dest``; refuses a key that would land
    outside ``dest`` (``/abs/path`` from ``prefix//abs/path``, ``..`` segments, empty segments).
    ``shown`` is the destination the message names (the user's, not a temporary folder)."""
    parts = key.split("/")
    root = Path(os.path.abspath(dest))
    target = Path(os.path.abspath(root.joinpath(*parts))) if key else root
    if not key or any(part in ("", ".", "..") for part in parts) or root not in target.parents:
        raise DelrecError(
            f"object key {key!r} does not map to a file inside the destination {shown or dest}: refused",
            path=uri or key,
        )
    return target


def download_prefix(uri: str, dest: str | os.PathLike, store: S3Store | None = None) -> Path:
    """Download ``uri`` (one object, or every object under a prefix) into the existing folder ``dest``.

    The store comes from the environment (``DELREC_S3_*``) unless given. Each file appears only once
    verified; this is how preprocess reads an ``s3://`` source.
    """
    store = store or S3Store.from_env()
    dest = Path(dest)
    if parse_uri(uri)[1] and store.exists(uri):
        store.get_file(uri, dest / Path(parse_uri(uri)[1]).name)
        return dest
    keys = store.list(uri)
    if not keys:
        raise DelrecError("no objects under this prefix", path=uri)
    for key in keys:
        store.get_file(join_uri(uri, key), local_path(dest, key, uri))
    log.info("fetched %d object(s) from %s", len(keys), uri)
    return dest


# --------------------------------------------------------------------------- ingest and publish


def upload_dataset(
    store: S3Store, dataset: str, source: str | os.PathLike, to: str, *, replace: bool = False
) -> str:
    """Upload a raw dataset (file or folder) to ``<to>/<dataset>/``; returns that URI (a preprocess source).

    A destination already holding objects is refused unless ``replace``, which removes them first:
    preprocess reads every object there, so old files must never mix with a new upload.
    """
    source = Path(source)
    if not (source.is_file() or source.is_dir() and any(p.is_file() for p in source.rglob("*"))):
        raise DelrecError("no such file, nor a folder holding files: nothing to upload", path=source)
    dest = join_uri(to, dataset)
    store.ensure_bucket(parse_uri(to)[0])
    if old := store.list(dest):
        if not replace:
            raise DelrecError(
                f"already holds {len(old)} object(s) of an earlier upload: refusing to mix them with this "
                "one (pass --replace to remove them first)",
                path=dest,
                field="to",
            )
        log.warning("--replace: removing the %d object(s) under %s", len(old), dest)
        store.remove_prefix(dest)
    if source.is_dir():
        store.put_dir(source, dest)
    else:
        store.put_file(source, join_uri(dest, source.name))
    return dest


@dataclass(frozen=True)
class QualityGate:
    """When a challenger (this run's flat evaluate metrics) may replace the published model.

    - against the baseline: ``metrics[candidate] >= metrics[baseline] + margin``;
    - ``paired``: stricter, the lower end of the paired bootstrap interval of candidate minus baseline
      (``delrec_minus_<model>_<metric>_lo``, same users resampled for both) must exceed ``margin``: the
      challenger beats the baseline beyond evaluation noise;
    - ``against_champion``: ``metrics[candidate] >= champion[candidate] + champion_margin``, where the
      champion is the run ``latest.json`` names; the first publish has no champion. The two were scored in
      different runs (possibly on newer data): a negative ``champion_margin`` tolerates that noise.
    """

    candidate: str = "delrec_HR@1"
    baseline: str = "teacher_HR@1"
    margin: float = 0.0
    paired: bool = False
    against_champion: bool = True
    champion_margin: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> QualityGate:
        unknown = set(data or {}) - set(cls.__dataclass_fields__)
        if unknown:
            raise DelrecError(f"unknown quality-gate key(s) {sorted(unknown)}", field="gate")
        gate = cls(**(data or {}))
        if gate.paired:
            gate.paired_key()  # fail at submit time, not after training
        return gate

    def paired_key(self) -> str:
        """The flat metric holding the lower interval end of candidate minus baseline (the 20-candidate
        protocol's ``delrec_minus_<model>_<metric>_lo``, or the whole catalogue's with a ``catalogue_`` prefix)."""
        prefix = "catalogue_" if self.baseline.startswith("catalogue_") else ""
        model, _, metric = self.baseline.removeprefix(prefix).partition("_")
        if self.candidate != f"{prefix}delrec_{metric}" or not metric:
            raise DelrecError(
                f"a paired gate compares [catalogue_]delrec_<metric> with [catalogue_]<model>_<metric> "
                f"(evaluate's paired sections); got candidate {self.candidate!r}, baseline {self.baseline!r}",
                field="gate",
            )
        return f"{prefix}delrec_minus_{model}_{metric}_lo"

    def check(
        self, metrics: Mapping[str, float], champion: Mapping[str, Any] | None = None
    ) -> tuple[bool, str]:
        """(passed, verdict); ``champion``: the published run's pointer (``run``, ``metrics``) or None."""
        needed = [self.candidate, self.baseline] + ([self.paired_key()] if self.paired else [])
        missing = [k for k in needed if k not in metrics]
        if missing:
            raise DelrecError(
                f"quality gate needs metric(s) {missing}; evaluate gave {sorted(metrics)}", field="gate"
            )
        got, base = float(metrics[self.candidate]), float(metrics[self.baseline])
        checks = [
            (
                got >= base + self.margin,
                f"{self.candidate}={got:.4f} vs {self.baseline}={base:.4f} + {self.margin}",
            )
        ]
        if self.paired:
            lo = float(metrics[self.paired_key()])
            checks.append(
                (lo > self.margin, f"paired interval lower end {self.paired_key()}={lo:.4f} > {self.margin}")
            )
        if self.against_champion and champion:
            best = (champion.get("metrics") or {}).get(self.candidate)
            name = f"champion {champion.get('run', '?')}"
            if best is None:  # a champion scored otherwise cannot be beaten knowingly: keep it
                checks.append((False, f"{name} has no {self.candidate}"))
            else:
                checks.append(
                    (got >= float(best) + self.champion_margin,
                     f"{self.candidate}={got:.4f} vs {name}={float(best):.4f} + {self.champion_margin}")
                )  # fmt: skip
        passed = all(ok for ok, _ in checks)
        failed = [text for ok, text in checks if not ok]
        detail = "; ".join(text for _, text in checks)
        return passed, ("passed: " + detail) if passed else ("failed: " + "; ".join(failed))


def publish_bundle(
    store: S3Store,
    parts: Mapping[str, str | os.PathLike],
    *,
    base: str,
    pipeline: str,
    run: str,
    metrics: Mapping[str, float],
    gate: QualityGate,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload each folder in ``parts`` to ``<base>/<pipeline>/<run>/<part>/``, then the bundle index, and
    move ``<base>/<pipeline>/latest.json`` to this run only if the quality gate passes (against the
    baseline and against the champion ``latest.json`` names).

    ``run`` must be unique per run (the pipeline passes the KFP job id): a complete bundle (one with an
    index) is never overwritten, so a failed challenger can never replace the files of the published model.
    A partial upload under ``run`` (a publish pod killed before its index) is the same run retried and is
    completed; so is a complete one holding exactly these files and metrics (a pod killed after its index:
    the retry writes the run record and moves the pointer it missed). The index (``bundle.json``: files
    and checksums, metrics, gate verdict) is written last, so a bundle with an index is complete; the
    ``latest`` pointer only ever names complete bundles that passed, and never moves to a run older (by
    publish order) than the one it names.
    """
    if not run or "/" in run or run in (".", "..", RUNS) or run == LATEST:
        raise DelrecError(f"run id {run!r} cannot name a bundle (empty, a path, or reserved)", field="run")
    run_uri = join_uri(base, pipeline, run)
    if store.exists(join_uri(run_uri, BUNDLE_INDEX)):
        return _finish_retried_publish(store, join_uri(base, pipeline), run_uri, parts, metrics)
    store.ensure_bucket(parse_uri(base)[0])
    latest_uri = join_uri(base, pipeline, LATEST)
    champion = _read_with_etag(store, latest_uri)[0]
    passed, verdict = gate.check(metrics, champion)
    order = time.time_ns()  # the monotonic run order: a later publish wins, whatever finishes first
    files = {name: store.put_dir(folder, join_uri(run_uri, name)) for name, folder in parts.items()}
    published = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    index = {
        "pipeline": pipeline,
        "run": run,
        "uri": run_uri,
        "order": order,
        "files": files,
        "metrics": dict(metrics),
        "gate": {
            "passed": passed,
            "verdict": verdict,
            "champion": (champion or {}).get("run"),
            **gate.__dict__,
        },
        "published": published,
        **dict(extra or {}),
    }
    store.put_json(index, join_uri(run_uri, BUNDLE_INDEX))
    if passed:
        final = _record_run(store, join_uri(base, pipeline), index)
        log.info("published %s; gate %s; %s names run %s", run_uri, verdict, latest_uri, final.get("run"))
    else:
        log.warning("published %s but the gate %s: %s left as it was", run_uri, verdict, LATEST)
    return index


def _finish_retried_publish(
    store: S3Store,
    pipeline_uri: str,
    run_uri: str,
    parts: Mapping[str, str | os.PathLike],
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    """``run_uri`` holds a bundle index already. The same run retried (same files, same metrics) finishes
    what its earlier attempt left undone: the run record and the ``latest`` pointer if the gate passed.
    Anything else is refused: a published bundle is never overwritten."""
    index = store.get_json(join_uri(run_uri, BUNDLE_INDEX))
    files = {
        name: {
            p.relative_to(folder).as_posix(): file_sha256(p)
            for p in sorted(Path(folder).rglob("*"))
            if p.is_file()
        }
        for name, folder in parts.items()
    }
    if index.get("files") != files or index.get("metrics") != dict(metrics):
        raise DelrecError("another bundle is already published here: refusing to overwrite it", path=run_uri)
    log.info("%s was published by an earlier attempt of this run; finishing its pointer", run_uri)
    if index["gate"]["passed"]:
        _record_run(store, pipeline_uri, index)
    return index


def _record_run(store: S3Store, pipeline_uri: str, index: Mapping[str, Any]) -> dict[str, Any]:
    """Write the run record of a bundle that passed its gate (once) and move ``latest`` to the newest."""
    record = join_uri(pipeline_uri, RUNS, f"{index['order']:020d}-{index['run']}.json")
    if not store.exists(record):
        store.put_json({key: index[key] for key in ("run", "uri", "order", "metrics", "published")}, record)
    return advance_latest(store, pipeline_uri)


def _read_with_etag(store: S3Store, uri: str) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object at ``uri`` and the ETag of exactly that content; (None, None) if absent."""
    from minio.error import S3Error

    bucket, key = parse_uri(uri)

    def attempt() -> tuple[dict[str, Any] | None, str | None]:
        try:
            response = store.client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return None, None
            raise
        try:
            data, etag = response.read(), (response.headers.get("ETag") or "").strip('"')
        finally:
            response.close()
            response.release_conn()
        try:
            return json.loads(data), etag
        except ValueError:
            return {}, etag  # unreadable: replaced by the newest run

    return store._retry(attempt, f"read {uri}")


def _order(pointer: Mapping[str, Any] | None) -> int:
    value = (pointer or {}).get("order", 0)
    return value if isinstance(value, int) else 0


def advance_latest(store: S3Store, pipeline_uri: str, *, rounds: int = 20) -> dict[str, Any]:
    """Make ``<pipeline_uri>/latest.json`` name the highest-ordered run record under ``_runs/``.

    Each write is conditional on the pointer not having changed since it was read (``If-Match`` its
    ETag, or ``If-None-Match: *`` when there is none); the loop re-reads until the pointer is at least
    as new as the newest record, so concurrent publishers converge on the newest run. The pointer is
    only ever overwritten in one PUT, never deleted. Returns the pointer left in place.
    """
    from minio.error import S3Error

    bucket, _ = parse_uri(pipeline_uri)
    latest_uri = join_uri(pipeline_uri, LATEST)
    for _ in range(rounds):
        records = [k for k in store.list(join_uri(pipeline_uri, RUNS)) if k.endswith(".json")]
        if not records:
            raise DelrecError("no published run records", path=join_uri(pipeline_uri, RUNS))
        newest = store.get_json(join_uri(pipeline_uri, RUNS, max(records)))
        current, etag = _read_with_etag(store, latest_uri)
        if current is not None and _order(current) >= _order(newest):
            return current
        blob = (json.dumps(newest, indent=2, sort_keys=True) + "\n").encode()
        headers = {"Content-Type": "application/json"}
        headers.update({"If-Match": etag} if etag else {"If-None-Match": "*"})
        try:
            store._retry(
                lambda blob=blob, headers=headers: store.client._put_object(
                    bucket, parse_uri(latest_uri)[1], blob, headers=headers
                ),
                f"update {latest_uri}",
            )
        except S3Error as exc:
            if exc.code not in CONFLICT_CODES:
                raise
            log.info("%s changed while updating it (%s): reading it again", latest_uri, exc.code)
    raise DelrecError(
        f"could not settle the pointer after {rounds} rounds of concurrent updates", path=latest_uri
    )


def local_fingerprint(path: str | os.PathLike) -> str:
    """A short hash of a local file's or folder's contents (names and sha256): a cache key for a source."""
    path = Path(path)
    if path.is_file():
        return config_hash({path.name: file_sha256(path)})
    if not path.is_dir():
        raise DelrecError("no such file or folder", path=path)
    return config_hash(
        {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*")) if p.is_file()}
    )


def source_fingerprint(source: str | None, endpoint: str | None = None, secure: bool | None = None) -> str:
    """A short hash of what a dataset source holds now, for the preprocess cache key: the keys and ETags
    under an ``s3://`` URI, the names and sha256 of a local path or ``file://`` URL.

    Empty for no source (the dataset's default download) and for an ``http(s)://`` URL: nothing to list
    there, so the URL itself is the key.
    """
    if not source:
        return ""
    if is_s3_uri(source):
        return S3Store.from_env(endpoint or None, secure).fingerprint(source)
    parsed = urlparse(source)
    if parsed.scheme == "file":
        from urllib.request import url2pathname

        return local_fingerprint(url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return ""
    return local_fingerprint(source)
