"""Storage through fsspec: local folders and any bucket (s3://, gs://, memory://…) alike.

Every read and write of the job goes through `Storage`, which carries the fsspec options,
retries transient errors, and commits files atomically (write aside, then move into place).
Credentials never leave this object in logs: `redact` strips them from anything printed.
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

T = TypeVar("T")

# AWS settings that workers need to reach the same buckets as the driver.
AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_SECRET_KEYS = ("secret", "token", "password", "key_id", "access_key", "credential")


def is_secret_key(key: str) -> bool:
    k = key.lower()
    return any(s in k for s in _SECRET_KEYS)


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options fit to print or store: secret values become '***'."""
    if not options:
        return {}
    out: dict[str, Any] = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif is_secret_key(k):
            out[k] = "***"
        else:
            out[k] = v
    return out


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: timeouts, connection resets, throttling and 5xx from a store."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError,
                        PermissionError, FileExistsError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    markers = ("timeout", "timed out", "connection", "throttl", "slowdown", "slow down",
               "internalerror", "serviceunavailable", "service unavailable", "503", "500",
               "502", "504", "reset by peer", "broken pipe", "temporarily")
    return any(m in text for m in markers)


def with_retries(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.2,
                 what: str = "storage call") -> T:
    """Call fn, retrying transient storage errors with jittered exponential back-off."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered just below
            if attempt == attempts or not is_transient(e):
                raise
            time.sleep(base_delay * 2 ** (attempt - 1) * (0.5 + random.random()))
    raise AssertionError("unreachable")


class Storage:
    """One root (a folder or bucket prefix) and the fsspec filesystem behind it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.options = dict(storage_options or {})
        self.fs, root = url_to_fs(url, **self.options)
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.is_local = self.protocol in ("file", "local")
        if self.is_local:
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root.rstrip("/") or "/"
        self.url = self.to_url(self.root)

    # -- names -----------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The fsspec path of a name under the root."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def to_url(self, path: str) -> str:
        """What users see and what we store in `path` columns: a full URL, or an absolute path."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    def child(self, *parts: str) -> "Storage":
        return Storage(self.to_url(self.path(*parts)), self.options)

    # -- reads -----------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(*parts)))

    def read_bytes(self, path: str) -> bytes:
        """Read a whole file by its fsspec path (as returned by listing)."""
        return with_retries(lambda: self.fs.cat_file(path), what=f"read {path}")

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(self.path(*parts)))

    def ls_names(self, *parts: str) -> list[str]:
        """Base names directly under a folder; empty when it does not exist."""
        p = self.path(*parts)
        try:
            entries = with_retries(lambda: self.fs.ls(p, detail=False))
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    # -- writes ----------------------------------------------------------------------
    def makedirs(self, *parts: str) -> None:
        if self.is_local:
            self.fs.makedirs(self.path(*parts), exist_ok=True)

    @contextmanager
    def open_atomic(self, *parts: str) -> Iterator[IO[bytes]]:
        """Write a file aside (`_tmp/…`) and move it to its name only once it is complete.

        Readers never see a half-written file: on a local disk the move is a rename; on an
        object store it is a server-side copy, and an object appears whole or not at all.
        """
        final = self.path(*parts)
        tmp = self.path("_tmp", f"{uuid.uuid4().hex}-{final.rsplit('/', 1)[-1]}")
        self.makedirs("_tmp")
        if self.is_local:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(tmp, "wb") as f:
                yield f
            with_retries(lambda: self.fs.mv(tmp, final), what=f"commit {final}")
        except BaseException:
            try:
                self.fs.rm(tmp)
            except Exception:  # noqa: BLE001 - best effort; _tmp is never read
                pass
            raise

    def write_bytes_atomic(self, data: bytes, *parts: str) -> None:
        def write() -> None:
            with self.open_atomic(*parts) as f:
                f.write(data)
        with_retries(write, what=f"write {'/'.join(parts)}")

    def write_json_atomic(self, obj: Any, *parts: str) -> None:
        self.write_bytes_atomic(json.dumps(obj, indent=2, sort_keys=True).encode(), *parts)

    def rm(self, *parts: str, recursive: bool = False) -> None:
        p = self.path(*parts)
        try:
            with_retries(lambda: self.fs.rm(p, recursive=recursive))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Raise PermissionError/OSError early if the root cannot be written."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        self.makedirs()
        with self.fs.open(self.path(probe), "wb") as f:
            f.write(b"ok")
        self.fs.rm(self.path(probe))


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


def aws_env() -> dict[str, str]:
    """The AWS variables of this process that workers need too (for the Ray runtime env)."""
    return {k: os.environ[k] for k in AWS_ENV_VARS if k in os.environ}


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    return url_to_fs(url, **(storage_options or {}))[0]
