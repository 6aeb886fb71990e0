"""Storage through fsspec: local folders and any bucket (s3://, gs://, memory://…) alike.

Every read and write of the job goes through `Storage`, which carries the fsspec options,
retries transient errors, commits files atomically (a local file is written aside and
renamed; an object is one PUT), and creates files exclusively (the basis of a lock).
Credentials never leave this object in logs: `redact` strips them from anything printed.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from http.client import IncompleteRead
from typing import IO, Any, TypeVar

from fsspec.core import url_to_fs

T = TypeVar("T")
log = logging.getLogger(__name__)

# Environment that workers need to reach the same stores as the driver: every AWS_* variable
# (endpoint, credentials, profile, region, web-identity and container roles, retry mode, CA
# bundle…), fsspec's own FSSPEC_<PROTOCOL>_<OPTION> defaults, and the usual GCS/Azure ones.
FORWARDED_ENV_PREFIXES = ("AWS_", "FSSPEC_", "AZURE_STORAGE_")
FORWARDED_ENV_VARS = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")

# Option names whose values are credentials ("key" is s3fs' name for the access key id).
_SECRET_NAMES = {"key", "secret", "token", "password", "passwd", "sas_token", "account_key",
                 "client_secret", "session_token", "credentials", "connection_string"}
_SECRET_PARTS = ("secret", "token", "password", "passwd", "key_id", "access_key", "credential",
                 "private", "signature", "account_key", "connection_string")


def is_secret_key(key: str) -> bool:
    """Whether an option or variable name holds a credential (AWS_SECRET_ACCESS_KEY, token…)."""
    k = key.lower()
    return k in _SECRET_NAMES or k.endswith("_key") or any(s in k for s in _SECRET_PARTS)


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options fit to print or store: secret values become '***'."""
    if not options:
        return {}
    out: dict[str, Any] = {}
    for k, v in options.items():
        if is_secret_key(str(k)):
            out[k] = "***"
        elif isinstance(v, dict):
            out[k] = redact(v)
        else:
            out[k] = v
    return out


# -- retries ---------------------------------------------------------------------------
# One policy, in two places: botocore retries each S3 request itself (adaptive mode: back-off
# plus client-side rate limiting under throttling), and `with_retries` retries a whole
# operation when the client gives up. s3fs' own retry loop is turned off (S3FS_TRIES).
S3_CLIENT_RETRIES = {"mode": "adaptive", "max_attempts": 4}  # retries after the first try
S3FS_TRIES = 1

# The decision reads the exception chain (s3fs raises OSError `from` botocore's ClientError,
# which carries the HTTP status), not the message, which holds paths like "img-500.jpg".
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeoutException", "Throttling",
                    "ThrottlingException", "SlowDown", "InternalError", "ServiceUnavailable",
                    "RequestLimitExceeded", "TooManyRequests", "BandwidthLimitExceeded",
                    "PriorRequestNotComplete", "OperationAborted",
                    "ConditionalRequestConflict"}  # 409: a concurrent conditional write
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                     errno.EAGAIN, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)}


@functools.cache
def _error_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(transient, permanent) exception types: time-outs and dropped connections of the
    clients installed; missing files, permissions and TLS failures. Imported on first use."""
    transient: list[type[BaseException]] = [TimeoutError, ConnectionError, IncompleteRead]
    permanent: list[type[BaseException]] = [FileNotFoundError, IsADirectoryError,
                                            NotADirectoryError, PermissionError, FileExistsError]
    from fsspec.exceptions import FSTimeoutError

    transient.append(FSTimeoutError)
    try:
        from botocore import exceptions as boto
        from botocore.parsers import ResponseParserError
    except ImportError:
        pass
    else:
        # ResponseParserError: throttled answers sometimes come with a truncated XML body.
        transient += [boto.HTTPClientError, boto.EndpointConnectionError,
                      boto.ConnectTimeoutError, boto.IncompleteReadError, ResponseParserError]
        permanent.append(boto.SSLError)
    try:
        import aiohttp
    except ImportError:
        pass
    else:
        transient += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
        permanent.append(aiohttp.ClientSSLError)
    return tuple(transient), tuple(permanent)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen and len(seen) < 10:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _http_status(e: BaseException) -> tuple[int | None, str | None]:
    """(status, error code) of a botocore ClientError-like exception, else (None, None)."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, response.get("Error", {}).get("Code")
    for attr in ("status_code", "status", "code"):  # gcsfs HttpError, adlfs, aiohttp
        v = getattr(e, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v, None
    return None, None


def _store_answer(exc: BaseException) -> tuple[int | None, str | None]:
    """The (HTTP status, error code) that a store answered, from anywhere in the chain."""
    for e in _chain(exc):
        status, code = _http_status(e)
        if status is not None or code is not None:
            return status, code
    return None, None


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: time-outs, dropped connections, throttling and 5xx from a store.

    A store's answer decides when there is one (its HTTP status or S3 error code); otherwise
    the exception types do. Missing files, permissions and other 4xx are not retried.
    """
    status, code = _store_answer(exc)
    if status is not None or code is not None:
        return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    transient, permanent = _error_types()
    for e in _chain(exc):
        if isinstance(e, permanent):
            return False
        if isinstance(e, transient):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def with_retries(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2,
                 what: str = "storage call") -> T:
    """Call fn, retrying transient storage errors (see `is_transient`) with jittered
    exponential back-off: up to `attempts` calls, about 0.2+0.4+0.8+1.6 s of waiting.
    The last error, or the first that is not transient, is raised.

    On S3 each call already holds botocore's retries (S3_CLIENT_RETRIES): this loop covers
    faults that outlast them, and stores whose clients do not retry."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # filtered just below
            if attempt == attempts or not is_transient(e):
                raise
            delay = base_delay * 2 ** (attempt - 1) * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__,
                        str(e)[:200], attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options with botocore's retry policy (S3_CLIENT_RETRIES) filled in where the
    user set none: their `config_kwargs.retries` keys and AWS_RETRY_MODE / AWS_MAX_ATTEMPTS
    win."""
    config = dict(options.get("config_kwargs") or {})
    retries = dict(config.get("retries") or {})
    if "AWS_RETRY_MODE" not in os.environ:
        retries.setdefault("mode", S3_CLIENT_RETRIES["mode"])
    if not {"max_attempts", "total_max_attempts"} & retries.keys() \
            and "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["max_attempts"] = S3_CLIENT_RETRIES["max_attempts"]
    return {**options, "config_kwargs": {**config, "retries": retries}}


def _name_taken(exc: BaseException) -> bool:
    """Whether a conditional create failed because the name exists: 412 PreconditionFailed,
    or 409 ConditionalRequestConflict still there after the retries (another writer won)."""
    status, code = _store_answer(exc)
    return (isinstance(exc, FileExistsError) or status == 412
            or code in ("PreconditionFailed", "ConditionalRequestConflict"))


def _client_resent(exc: BaseException) -> bool:
    """Whether botocore sent the request that failed with `exc` more than once."""
    for e in _chain(exc):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("RetryAttempts", 0) > 0
    return False


class Storage:
    """One root (a folder or bucket prefix) and the fsspec filesystem behind it.

    Listings are never served from fsspec's listing cache: other processes (the actors)
    write to the same prefixes, and a stale listing would hide their files.
    """

    # Bucket commits: the part size of a multipart upload (None: s3fs' 50 MiB; files under
    # two parts go up in one PUT).
    upload_chunksize: int | None = None

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.options = dict(storage_options or {})
        fs_options = self.options
        if url.split("://", 1)[0] in ("s3", "s3a"):
            fs_options = _s3_options(self.options)
        self.fs, root = url_to_fs(url, **fs_options)
        protocol = self.fs.protocol
        self.protocol = protocol if isinstance(protocol, str) else protocol[0]
        if self.protocol in ("s3", "s3a"):
            self.fs.retries = S3FS_TRIES  # an attribute, not an s3fs option
        self.is_local = self.protocol in ("file", "local")
        if self.is_local:
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root.rstrip("/") or "/"
        self.url = self.to_url(self.root)

    def __repr__(self) -> str:  # never the options: they may hold credentials
        return f"Storage({self.url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its URL and options: a pickled filesystem would lose `retries`.
        return Storage, (self.url, self.options)

    # -- names -----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The fsspec path of a name under the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def to_url(self, path: str) -> str:
        """What users see and what we store in `path` columns: a full URL, or an absolute path."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def child(self, *parts: str) -> Storage:
        return Storage(self.to_url(self.path(*parts)), self.options)

    def fresh(self, path: str) -> str:
        """`path`, with fsspec's cached listings of it and its parents dropped."""
        self.fs.invalidate_cache(path)
        return path

    # -- reads -----------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        p = self.path(*parts)
        return with_retries(lambda: self.fs.exists(self.fresh(p)), what=f"exists {p}")

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file by its fsspec path (as returned by listing): one GET on S3."""
        if self.is_local:  # fsspec's file object took 7% of the decode threads' time at 32 px
            return with_retries(lambda: _read_local(path), what=f"read {path}")
        return with_retries(lambda: self.fs.cat_file(path, **self._one_request),
                            what=f"read {path}")

    @property
    def _one_request(self) -> dict[str, Any]:
        # s3fs asks for the size first (a HEAD per file) to split big reads into parallel
        # ranges; images are small, so read each with a single GET.
        return {"max_concurrency": 1} if getattr(self.fs, "max_concurrency", 1) > 1 else {}

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(self.path(*parts)))

    def ls_names(self, *parts: str) -> list[str]:
        """Base names directly under a folder; empty when it does not exist."""
        p = self.path(*parts)
        try:
            entries = with_retries(lambda: self.fs.ls(self.fresh(p), detail=False),
                                   what=f"list {p}")
        except FileNotFoundError:
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    # -- writes ----------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        if self.is_local:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    @contextmanager
    def open_atomic(self, *parts: str) -> Iterator[IO[bytes]]:
        """Open a file to write; it appears under its name only once complete, or not at all.

        On a local disk the file is written aside (`_tmp/…`) and renamed into place. On an
        object store the caller writes to a local spool file, which on leaving the block is
        uploaded straight to its name, retried on transient errors: a PUT, or a completed
        multipart upload, is all-or-nothing, and s3fs aborts a multipart upload that fails.
        On an exception nothing is committed.
        """
        final = self.path(*parts)
        if self.is_local:
            tmp = self._tmp_name(final)
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            try:
                with self.fs.open(tmp, "wb") as f:
                    yield f
                self.fs.mv(tmp, final)
            except BaseException:
                self._discard(tmp)
                raise
            return
        with tempfile.TemporaryDirectory(prefix="bottleneck-spool-") as spool_dir:
            # The spool has the final's base name: s3fs guesses the Content-Type from it.
            spool = os.path.join(spool_dir, final.rsplit("/", 1)[-1])
            with open(spool, "wb") as f:
                yield f
            kwargs = {"chunksize": self.upload_chunksize} if self.upload_chunksize else {}
            with_retries(lambda: self.fs.put_file(spool, final, **kwargs),
                         what=f"commit {final}")

    def _tmp_name(self, final: str) -> str:
        """A local scratch name for `final` under `_tmp/`: unique per write, and says what it
        will become (<random>-<name, '/' as '-'>)."""
        self.makedirs("_tmp")
        relative = final[len(self.root) + 1:].replace("/", "-")
        return self.path("_tmp", f"{uuid.uuid4().hex}-{relative}")

    def _discard(self, path: str) -> None:
        """Best effort: whatever is left under _tmp is never read, and the next run clears it."""
        with suppress(Exception):
            with_retries(lambda: self.fs.rm_file(path), attempts=3, what=f"remove {path}")

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        with self.open_atomic(*parts) as f:
            f.write(data)

    def write_json_atomic(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def upload_dir(self, local: str, *parts: str) -> int:
        """Copy every file under the local folder `local` to the same relative names under
        `parts`, each committed atomically; returns how many."""
        n = 0
        for folder, _, files in os.walk(local):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    self.write_bytes_atomic(f.read(), *parts, os.path.relpath(path, local))
                n += 1
        return n

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Write `data` under the name only if nothing is there yet: True when this call
        created it, False when the name already existed (its content is left as it was).

        Atomic, with no window between the check and the write: on a local disk a hard link
        (see below), on S3 a conditional PUT (`If-None-Match: *`; AWS S3, MinIO and other
        stores with conditional writes). Other stores raise NotImplementedError. On S3,
        `data` should be unique to the caller (a lock holds a random owner id): when a
        resent PUT finds the name holding exactly these bytes, an earlier send created it and
        only its answer was lost, so the call returns True.
        """
        final = self.path(*parts)
        if self.is_local:
            # Written aside, then linked: link(2) fails when the name exists, as O_CREAT|O_EXCL
            # does, and the name appears with all its content, never empty or partial. The
            # scratch file sits beside the name, not in _tmp/, which a running job clears.
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.{uuid.uuid4().hex}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            finally:
                with suppress(OSError):
                    os.unlink(tmp)
        if self.protocol not in ("s3", "s3a"):
            raise NotImplementedError(f"exclusive create on {self.protocol}:// storage")
        sends = 0

        def put() -> None:
            nonlocal sends
            sends += 1
            self.fs.pipe_file(final, data, mode="create")

        try:
            with_retries(put, what=f"create {final}")
            return True
        except Exception as e:  # filtered just below
            if not _name_taken(e):
                raise
            if sends == 1 and not _client_resent(e):
                return False
        try:
            return self.read_bytes(final) == data
        except FileNotFoundError:  # a conflict that no writer won
            return False

    def rm(self, *parts: str, recursive: bool = False) -> None:
        p = self.path(*parts)
        try:
            with_retries(lambda: self.fs.rm(self.fresh(p), recursive=recursive), what=f"rm {p}")
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Raise PermissionError/OSError early if the root cannot be written."""
        probe = self.path(f".write-probe-{uuid.uuid4().hex}")
        self.makedirs()
        with_retries(lambda: self.fs.pipe_file(probe, b"ok"), what=f"write {probe}")
        self._discard(probe)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """--storage-options JSON → dict; raises ValueError with a readable message."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object")
    return value


def aws_env(secrets: bool = True) -> dict[str, str]:
    """The storage variables of this process that workers need too (see
    FORWARDED_ENV_PREFIXES); with `secrets=False`, without the credentials among them.

    Ray writes a runtime env's variables into its session logs (runtime_env_agent.log), so
    only `aws_env(secrets=False)` belongs there; `credentials_env()` must reach the actors
    another way (their constructor arguments) and be put back with `restore_env`.
    """
    return {k: v for k, v in os.environ.items()
            if (k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV_VARS)
            and (secrets or not is_secret_key(k))}


def credentials_env() -> dict[str, str]:
    """The forwarded variables that are credentials (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN…)."""
    return {k: v for k, v in aws_env().items() if is_secret_key(k)}


def restore_env(values: dict[str, str]) -> None:
    """In a worker: set the driver's credential variables that this process lacks (what the
    worker's own machine sets, such as an instance role's, wins)."""
    for k, v in values.items():
        os.environ.setdefault(k, v)
