"""Storage and listing against a real S3 API (moto's server over HTTP), with s3fs as the client.

No Ray here: listing, reading, atomic commits, retries of real HTTP faults, and the CLI's
checks that fail before any work starts.
"""

from __future__ import annotations

import errno
import io
import time

import numpy as np
import pytest
from s3fixtures import KEY_ID, SECRET, Fault, s3, s3_server  # noqa: F401 - fixtures

from bottleneck.images import DecodeOptions, decode_image
from bottleneck.listing import InputError, list_inputs
from bottleneck.storage import Storage, aws_env, credentials_env, is_transient, redact

# botocore's own retries off, so that every fault reaches bottleneck's retry loop; short
# time-outs, so that a silent server is a quick ReadTimeoutError.
NO_CLIENT_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "read_timeout": 0.5,
                                       "connect_timeout": 1}}
S3FS_RETRIES = 5  # s3fs retries network errors (not 5xx answers) this many times itself


def jpeg(seed: int = 0, size: int = 32) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# -- listing and reading -------------------------------------------------------------------

def test_listing_labels_urls_and_reading(s3):
    s3.put_many({
        "in/cat/a.jpg": jpeg(1), "in/cat/b.jpg": jpeg(2),
        "in/dog/deep/nested pic.jpg": jpeg(3),  # deeper folders are searched; label = first
        "in/top.jpg": jpeg(4),  # directly in INPUT: no label
        "in/cat/": b"",  # a console's folder placeholder: a folder, not an input
        "in/dog/deep/": b"",
        "in/.hidden/x.jpg": jpeg(5), "in/cat/.DS_Store": b"junk",
        "in-sibling/cat/c.jpg": jpeg(6),  # shares the prefix's first letters, not the folder
        "other/x.jpg": jpeg(7),
    })
    source = Storage(s3.url("in"))
    entries = list_inputs(source)
    b = s3.name
    assert [(e.url, e.label) for e in entries] == [
        (f"s3://{b}/in/cat/a.jpg", "cat"),
        (f"s3://{b}/in/cat/b.jpg", "cat"),
        (f"s3://{b}/in/dog/deep/nested pic.jpg", "dog"),
        (f"s3://{b}/in/top.jpg", None),
    ]
    for i, e in enumerate(entries, 1):
        data = source.read_bytes(e.path)
        assert data == jpeg(i)
        assert decode_image(data, DecodeOptions(32)).shape == (32, 32, 3)
    # A trailing slash, or the bucket itself, list the same way.
    assert list_inputs(Storage(s3.url("in") + "/")) == entries
    whole = list_inputs(Storage(s3.url()))
    assert {e.label for e in whole} == {"in", "in-sibling", "other"}


def test_listing_refuses_missing_input_and_files(s3):
    s3.put("in/a.jpg", jpeg())
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(Storage(s3.url("nope")))
    with pytest.raises(InputError, match="not a file"):
        list_inputs(Storage(s3.url("in/a.jpg")))


def test_listing_2500_objects_is_paginated_not_per_object(s3, record_property):
    n = 2500
    s3.seed({f"big/class-{i % 5}/obj-{i:05d}.jpg": b"x" for i in range(n)})
    assert len(s3.keys("big/")) == n  # the server holds them, as any client sees
    s3.proxy.reset()
    t = time.perf_counter()
    entries = list_inputs(Storage(s3.url("big")))
    listing_s = time.perf_counter() - t
    reqs = s3.proxy.to(s3.name)
    pages = [r for r in reqs if r.is_list and "max-keys=1&" not in r.query + "&"]
    record_property("listing_seconds", round(listing_s, 3))
    print(f"\nlisted {n} objects in {listing_s:.2f}s with {len(reqs)} requests "
          f"({len(pages)} listing pages)")
    assert len(entries) == n and len({e.path for e in entries}) == n
    assert {e.label for e in entries} == {f"class-{i}" for i in range(5)}
    assert len(pages) == 3  # 1,000 keys a page
    assert len(reqs) <= 8, [(r.method, r.key, r.query) for r in reqs]
    assert not [r for r in reqs if r.key.startswith("big/class-")]  # no request per object


def test_listing_is_never_stale(s3):
    """Actors write in other processes: the driver's listings must not come from a cache."""
    out = Storage(s3.url("out"))
    assert out.ls_names() == [] and not out.exists("part-00000.parquet")
    s3.put("out/part-00000.parquet", b"x")  # straight to the server, as another process would
    assert out.ls_names() == ["part-00000.parquet"] and out.exists("part-00000.parquet")
    s3.put("out/_errors/part-00000.parquet", b"x")
    assert out.ls_names() == ["_errors", "part-00000.parquet"]
    assert out.ls_names("_errors") == ["part-00000.parquet"]
    s3.delete("out/part-00000.parquet")
    assert not out.exists("part-00000.parquet")


# -- atomic commits ------------------------------------------------------------------------

def test_commit_writes_aside_then_copies(s3):
    out = Storage(s3.url("out"))
    s3.proxy.reset()
    with out.open_atomic("part-00007.parquet") as f:
        f.write(b"a" * 1000)
        f.write(b"b" * 1000)
    assert s3.get("out/part-00007.parquet") == b"a" * 1000 + b"b" * 1000
    assert s3.keys("out/") == ["out/part-00007.parquet"]  # nothing left under _tmp
    writes = [r for r in s3.proxy.to(s3.name) if r.writes_object]
    # The final name is written once, by a server-side copy of the complete upload.
    assert [r.key for r in writes if not r.copy_source] == [writes[0].key]
    assert writes[0].key.startswith("out/_tmp/") and writes[0].key.endswith("-part-00007.parquet")
    assert [(r.key, r.copy_source) for r in writes if r.copy_source] == [
        ("out/part-00007.parquet", f"{s3.name}/{writes[0].key}")]


def test_failed_writer_commits_nothing(s3):
    out = Storage(s3.url("out"))
    s3.proxy.reset()
    with pytest.raises(RuntimeError, match="model failed"):
        with out.open_atomic("part-00000.parquet") as f:
            f.write(b"half a file")
            raise RuntimeError("model failed")
    assert s3.keys("out/") == []
    assert not [r for r in s3.proxy.to(s3.name) if r.writes_object]


# -- retries of real HTTP faults -----------------------------------------------------------

@pytest.mark.parametrize("status,code", [(503, "ServiceUnavailable"), (500, "InternalError")])
def test_reads_retry_5xx(s3, status, code):
    s3.put("r/a.bin", b"hello")
    store = Storage(s3.url("r"), NO_CLIENT_RETRIES)
    fault = Fault(method="GET", key=r"/r/a\.bin$", status=status, code=code, times=2)
    s3.proxy.faults.append(fault)
    assert store.read_bytes(store.path("a.bin")) == b"hello"
    gets = [r for r in s3.proxy.to(s3.name) if r.method == "GET" and r.key == "r/a.bin"]
    assert fault.hits == 2 and len(gets) == 3


@pytest.mark.parametrize("fault,times", [
    (Fault(delay=1.5), S3FS_RETRIES + 1),  # longer than the read time-out
    # A connection closed without an answer: aiohttp resends an idempotent request once
    # on a reused connection, under each of s3fs' tries.
    (Fault(drop=True), 2 * S3FS_RETRIES + 1),
    (Fault(status=503, code="SlowDown"), S3FS_RETRIES + 1),
], ids=["timeout", "dropped", "slowdown"])
def test_network_faults_outlasting_the_clients_retries_are_retried(s3, fault, times):
    """s3fs (and aiohttp) retry these themselves; more in a row reach bottleneck's retries."""
    out = Storage(s3.url("w"), NO_CLIENT_RETRIES)
    fault.method, fault.key, fault.copy, fault.times = "PUT", r"/w/_tmp/", False, times
    s3.proxy.faults.append(fault)
    out.write_bytes_atomic(b"data", "part-00000.parquet")
    assert s3.get("w/part-00000.parquet") == b"data"
    uploads = [r.key for r in s3.proxy.to(s3.name) if r.method == "PUT" and not r.copy_source]
    assert fault.hits == times
    assert len(uploads) == times + 1 and len(set(uploads)) == 1


def test_writes_retry_upload_and_commit(s3):
    out = Storage(s3.url("w"), NO_CLIENT_RETRIES)
    s3.proxy.reset()
    s3.proxy.faults += [
        Fault(method="PUT", key=r"/w/_tmp/", copy=False, status=503, times=2),
        Fault(method="PUT", key=r"/w/x\.json$", copy=True, status=500, code="InternalError",
              times=2),
    ]
    out.write_json_atomic({"a": 1}, "x.json")
    assert s3.get("w/x.json").replace(b" ", b"").replace(b"\n", b"") == b'{"a":1}'
    assert s3.keys("w/") == ["w/x.json"]
    writes = [r for r in s3.proxy.to(s3.name) if r.writes_object]
    uploads = [r.key for r in writes if not r.copy_source]
    copies = [r.copy_source for r in writes if r.copy_source]
    # The same upload was retried (a retry of the whole shard would use a new _tmp name).
    assert len(uploads) == 3 and len(set(uploads)) == 1
    assert copies == [f"{s3.name}/{uploads[0]}"] * 3


def test_permanent_errors_are_not_retried(s3):
    s3.put("r/a.bin", b"hello")
    store = Storage(s3.url("r"), NO_CLIENT_RETRIES)
    s3.proxy.faults.append(Fault(method="GET", key=r"/r/a\.bin$", status=403, code="AccessDenied"))
    with pytest.raises(PermissionError) as denied:
        store.read_bytes(store.path("a.bin"))
    with pytest.raises(FileNotFoundError) as missing:
        store.read_bytes(store.path("img-500.jpg"))  # "500" in a name is not a 5xx
    assert not is_transient(denied.value) and not is_transient(missing.value)
    gets = [r.key for r in s3.proxy.to(s3.name) if r.method == "GET" and r.key]
    assert gets == ["r/a.bin", "r/img-500.jpg"]


def test_write_that_keeps_failing_raises_and_leaves_nothing(s3):
    out = Storage(s3.url("w"), NO_CLIENT_RETRIES)
    s3.proxy.faults.append(Fault(method="PUT", key=r"/w/part-00003\.parquet$", copy=True,
                                 status=503))
    t = time.perf_counter()
    with pytest.raises(OSError) as failed:
        out.write_bytes_atomic(b"data", "part-00003.parquet")
    assert is_transient(failed.value) and failed.value.errno == errno.EBUSY
    assert s3.proxy.faults[0].hits == 5  # with_retries' attempts
    assert time.perf_counter() - t < 15
    assert s3.keys("w/") == []  # neither the result nor its _tmp upload


# -- the CLI's checks before any work ------------------------------------------------------

def _cli(capsys, *args: str) -> tuple[int, str]:
    from bottleneck.cli import main

    code = main(["extract", *args, "--weights", "random", "--image-size", "32",
                 "--address", "local", "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.err


def test_cli_refuses_missing_input_and_unwritable_output(s3, capsys):
    s3.put("in/cat/a.jpg", jpeg())
    code, err = _cli(capsys, s3.url("nope"), s3.url("out"))
    assert code == 2 and "INPUT does not exist" in err and len(err.strip().splitlines()) == 1
    code, err = _cli(capsys, s3.url("in"), "s3://no-such-bucket-here/out")
    assert code == 2 and "OUTPUT is not writable" in err and len(err.strip().splitlines()) == 1
    s3.proxy.faults.append(Fault(method="PUT", key=rf"^{s3.name}/out/", status=403,
                                 code="AccessDenied"))
    code, err = _cli(capsys, s3.url("in"), s3.url("out"))
    assert code == 2 and "OUTPUT is not writable" in err and len(err.strip().splitlines()) == 1
    assert s3.keys("out/") == []


# -- secrets -------------------------------------------------------------------------------

def test_redact_hides_every_credential():
    options = {"key": KEY_ID, "secret": SECRET, "token": "tok", "anon": False,
               "endpoint_url": "http://127.0.0.1:9000",
               "client_kwargs": {"aws_secret_access_key": "s2", "aws_access_key_id": "k2",
                                 "aws_session_token": "t2", "region_name": "eu-west-1"},
               "config_kwargs": {"retries": {"max_attempts": 3}}}
    shown = redact(options)
    assert shown == {"key": "***", "secret": "***", "token": "***", "anon": False,
                     "endpoint_url": "http://127.0.0.1:9000",
                     "client_kwargs": {"aws_secret_access_key": "***",
                                       "aws_access_key_id": "***", "aws_session_token": "***",
                                       "region_name": "eu-west-1"},
                     "config_kwargs": {"retries": {"max_attempts": 3}}}
    assert SECRET not in repr(Storage("memory://x", options))


def test_workers_get_every_aws_variable(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_MAX_ATTEMPTS", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.setenv(k, "v")
    monkeypatch.setenv("HOME_NOT_FORWARDED", "x")
    env = aws_env()
    assert {"AWS_ENDPOINT_URL", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_MAX_ATTEMPTS", "FSSPEC_S3_ENDPOINT_URL"} <= set(env)
    assert "HOME_NOT_FORWARDED" not in env
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AZURE_STORAGE_KEY", "a")
    secret = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID",
              "AZURE_STORAGE_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE"}
    assert set(credentials_env()) == secret
    assert not secret & set(aws_env(secrets=False))
    assert set(aws_env()) == set(aws_env(secrets=False)) | secret
