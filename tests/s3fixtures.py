"""A real S3 API over HTTP on 127.0.0.1 for the tests: moto's server, behind a small proxy.

- `s3_server` (session): moto's standalone server on a free port, and `S3Proxy` in front of
  it. The job talks to the proxy; the tests set up and check buckets straight on moto.
- `S3Proxy` forwards every request as it is, records it (method, key, query, copy source),
  and answers with a fault where a test asks for one: an S3 error status (503…), a delay
  longer than the client's read time-out (before the request reaches the store, or after it
  did its work: a lost answer), or a dropped connection.
- `s3` (function): a fresh bucket, the AWS variables pointing at the proxy (the standard
  way users configure the endpoint), and helpers.

Import the fixtures into a test module explicitly: `from s3fixtures import s3, s3_server`.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest

KEY_ID = "AKIATESTBOTTLENECK"
SECRET = "test-secret-not-a-real-one"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    query: str
    copy_source: str | None
    body: bytes = field(default=b"", repr=False)

    @property
    def is_list(self) -> bool:
        """A bucket listing (ListObjects/ListObjectsV2): a GET on the bucket itself."""
        return self.method == "GET" and not self.key

    @property
    def writes_object(self) -> bool:
        return self.method in ("PUT", "POST") and bool(self.key)


@dataclass
class Fault:
    """Answer matching requests with `status` (an S3 error), or `delay` seconds of silence
    then the real answer, or the real answer held back `answer_delay` seconds after the store
    acted on the request, or a dropped connection (`drop`), at most `times` times."""

    method: str | None = None  # None: any
    key: str = ".*"  # regex searched in "bucket/key"
    copy: bool | None = None  # True: only CopyObject; False: only not a copy
    status: int | None = None
    code: str = "ServiceUnavailable"
    delay: float = 0.0
    answer_delay: float = 0.0
    drop: bool = False
    times: int | None = None  # None: every time
    hits: int = 0

    def matches(self, r: Request) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method and r.method != self.method:
            return False
        if self.copy is not None and (r.copy_source is not None) != self.copy:
            return False
        return re.search(self.key, f"{r.bucket}/{r.key}") is not None


class S3Proxy:
    """A counting, fault-injecting HTTP proxy in front of an S3 endpoint."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = io.BytesIO()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out.getvalue()
                        out.write(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                r = proxy._record(self.command, self.path, self.headers, body)
                fault = proxy._fault(r)
                if fault and fault.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault and fault.delay:
                    time.sleep(fault.delay)
                if fault and fault.status:
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}"
                           f"</Code><Message>injected by the test proxy</Message></Error>").encode()
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(xml)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(xml)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if fault and fault.answer_delay:
                        time.sleep(fault.answer_delay)
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                             "date", "server"):
                            self.send_header(k, v)
                    if self.command == "HEAD":
                        self.send_header("Content-Length", resp.getheader("Content-Length") or "0")
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # clients that time out hang up on us: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="s3-proxy")
        self.thread.start()

    def _record(self, method: str, path: str, headers, body: bytes) -> Request:
        parts = urlsplit(path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        src = headers.get("x-amz-copy-source")
        r = Request(method, bucket, key, parts.query, unquote(src) if src else None,
                    body if len(body) < 1 << 20 else b"")
        with self.lock:
            self.requests.append(r)
        return r

    def _fault(self, r: Request) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.matches(r):
                    f.hits += 1
                    return f
        return None

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.faults.clear()

    def to(self, bucket: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.bucket == bucket]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class S3Server:
    moto_url: str
    proxy: S3Proxy


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with the counting, fault-injecting proxy in front."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = S3Proxy(port)
    yield S3Server(f"http://127.0.0.1:{port}", proxy)
    proxy.close()
    server.stop()


@dataclass
class S3Bucket:
    """A fresh bucket on the test server, and the ways to reach it."""

    name: str
    server: S3Server
    client: object = field(repr=False)  # boto3 S3 client straight to moto (no proxy, no faults)

    @property
    def proxy(self) -> S3Proxy:
        return self.server.proxy

    @property
    def endpoint(self) -> str:
        """What the job is given: the proxy."""
        return self.proxy.url

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}".rstrip("/")

    def options(self, secret: str = SECRET) -> dict:
        """--storage-options that reach this bucket with no AWS variables at all."""
        return {"endpoint_url": self.endpoint, "key": KEY_ID, "secret": secret}

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)

    def keys(self, prefix: str = "") -> list[str]:
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return sorted(out)

    def etags(self, prefix: str = "") -> dict[str, tuple[str, object]]:
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.name, Prefix=prefix):
            out.update({o["Key"]: (o["ETag"], o["LastModified"]) for o in page.get("Contents", [])})
        return out

    def put_many(self, items: dict[str, bytes], threads: int = 16) -> None:
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda kv: self.put(*kv), items.items()))

    def seed(self, items: dict[str, bytes]) -> None:
        """Store many objects at once, straight into the server's own state (moto runs in
        this process). Only for setting up big buckets: everything under test still goes
        over HTTP. ~0.1 s for thousands of objects, where HTTP PUTs take ~10 s on 2 cores."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        for key, data in items.items():
            backend.put_object(self.name, key, data)

    def put_images(self, prefix: str, labels: dict[str | None, int], size: int = 32,
                   seed: int = 0) -> list[str]:
        """Real JPEGs at prefix/<label>/img-<i>.jpg (prefix/ itself for label None)."""
        from PIL import Image

        rng = np.random.default_rng(seed)
        items = {}
        for label, n in labels.items():
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    buf, "JPEG")
                key = f"{prefix}/{label}/img-{i:03d}.jpg" if label else f"{prefix}/img-{i:03d}.jpg"
                items[key] = buf.getvalue()
        self.put_many(items)
        return sorted(items)


def make_client(endpoint: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY_ID,
                        aws_secret_access_key=SECRET, region_name=REGION,
                        config=Config(max_pool_connections=32))


AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_PROFILE", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


def aws_environ(endpoint: str, secret: str = SECRET) -> dict[str, str]:
    """The standard variables a user sets to reach an S3-compatible endpoint."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": REGION}


def isolate_from_aws(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """No AWS setting from the machine: no variables, no ~/.aws files, no metadata service."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def new_bucket(server: S3Server, prefix: str = "bn") -> S3Bucket:
    client = make_client(server.moto_url)
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(name, server, client)


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket; the AWS variables point at the proxy; the proxy's log and faults
    are cleared."""
    import s3fs

    s3_server.proxy.reset()
    isolate_from_aws(monkeypatch, tmp_path)
    for k, v in aws_environ(s3_server.proxy.url).items():
        monkeypatch.setenv(k, v)
    # fsspec caches filesystems by their arguments, not by the environment: one made for
    # another test module's server would still be handed out here.
    s3fs.S3FileSystem.clear_instance_cache()
    yield new_bucket(s3_server)
    s3_server.proxy.reset()


def grep_tree(root: Path, needles: list[bytes]) -> list[str]:
    """`file: needle` for every needle found in any regular file under root."""
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(".sock"):
            try:
                data = p.read_bytes()
            except OSError:
                continue
            hits += [f"{p}: {n.decode()}" for n in needles if n in data]
    return hits
