"""Storage and listing against a real S3 API (moto's server over HTTP), with s3fs as the client.

No Ray here: listing, reading, atomic commits, retries of real HTTP faults, and the CLI's
checks that fail before any work starts.
"""

from __future__ import annotations

import errno
import io
import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from s3fixtures import KEY_ID, SECRET, Fault, s3, s3_server  # noqa: F401 - fixtures

from bottleneck.images import DecodeOptions, decode_image
from bottleneck.inputs.listing import InputError, list_inputs
from bottleneck.storage import (
    S3_CLIENT_RETRIES,
    Storage,
    aws_env,
    credentials_env,
    is_transient,
    redact,
)

# Short time-outs, so that a silent server is a quick ReadTimeoutError; botocore's retries as
# Storage sets them (S3_CLIENT_RETRIES), or one retry (quick: botocore waits up to 1 s before
# it), or none, so that every fault reaches with_retries.
SHORT_TIMEOUTS = {"config_kwargs": {"read_timeout": 0.5, "connect_timeout": 1}}
ONE_CLIENT_RETRY = {"config_kwargs": {**SHORT_TIMEOUTS["config_kwargs"],
                                      "retries": {"max_attempts": 1}}}
NO_CLIENT_RETRIES = {"config_kwargs": {**SHORT_TIMEOUTS["config_kwargs"],
                                       "retries": {"total_max_attempts": 1}}}


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
    # One delimiter listing per folder level (up to two) to find where to cut, then one
    # chain of 1,000-key pages per class folder, in parallel: far fewer than one per object.
    delimited = [r for r in pages if "delimiter=" in r.query]
    assert len(delimited) == 1 + 5
    assert len(pages) - len(delimited) == 5 + 1  # a range per folder, and one after them
    assert len(reqs) <= 16, [(r.method, r.key, r.query) for r in reqs]
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

def test_commit_is_one_put(s3):
    out = Storage(s3.url("out"))
    s3.proxy.reset()
    with out.open_atomic("part-00007.parquet") as f:
        f.write(b"a" * 1000)
        f.write(b"b" * 1000)
    assert s3.get("out/part-00007.parquet") == b"a" * 1000 + b"b" * 1000
    assert s3.keys("out/") == ["out/part-00007.parquet"]
    # A PUT is all-or-nothing: no upload aside, no HEAD, no copy, no delete.
    assert [(r.method, r.key, r.copy_source) for r in s3.proxy.to(s3.name)] == [
        ("PUT", "out/part-00007.parquet", None)]


def test_failed_writer_commits_nothing(s3):
    out = Storage(s3.url("out"))
    s3.proxy.reset()
    with pytest.raises(RuntimeError, match="model failed"):
        with out.open_atomic("part-00000.parquet") as f:
            f.write(b"half a file")
            raise RuntimeError("model failed")
    assert s3.keys("out/") == []
    assert s3.proxy.to(s3.name) == []  # the spool stays local: not a single request


MIB = 1 << 20


def test_large_commit_is_one_multipart_upload_and_a_failed_one_is_aborted(s3):
    out = Storage(s3.url("out"), NO_CLIENT_RETRIES)
    out.upload_chunksize = 5 * MIB  # S3's smallest part: 11 MiB go up in 3 parts
    data = bytes(range(256)) * (11 * MIB // 256)
    s3.proxy.reset()
    out.write_bytes_atomic(data, "big.bin")
    assert s3.get("out/big.bin") == data
    reqs = [(r.method, r.query.split("=")[0]) for r in s3.proxy.to(s3.name)]
    assert reqs[0] == ("POST", "uploads") and reqs[-1] == ("POST", "uploadId")
    assert sorted(reqs[1:-1]) == [("PUT", "partNumber")] * 3

    # Every part upload fails: each try is aborted, never completed, and nothing appears.
    s3.proxy.reset()
    s3.proxy.faults.append(Fault(method="PUT", key=r"/out/big2\.bin$", status=503))
    with pytest.raises(OSError):
        out.write_bytes_atomic(data, "big2.bin")
    reqs = s3.proxy.to(s3.name)
    creates = [r for r in reqs if r.method == "POST" and r.query.startswith("uploads")]
    aborts = [r for r in reqs if r.method == "DELETE" and "uploadId=" in r.query]
    assert len(creates) == len(aborts) == 5  # one multipart upload per with_retries attempt
    assert not [r for r in reqs if r.method == "POST" and "uploadId=" in r.query]  # no complete
    assert "out/big2.bin" not in s3.keys("out/")
    assert not s3.client.list_multipart_uploads(Bucket=s3.name).get("Uploads")


# -- retries of real HTTP faults -----------------------------------------------------------

def test_s3_client_retry_policy():
    """botocore retries S3 requests itself (adaptive mode); s3fs' own loop is off; what the
    user sets in the options or the AWS variables wins."""
    store = Storage("s3://bucket/x", {"anon": True})
    assert store.fs.config_kwargs["retries"] == S3_CLIENT_RETRIES and store.fs.retries == 1
    own = Storage("s3://bucket/x", {"anon": True, **NO_CLIENT_RETRIES})
    assert own.fs.config_kwargs["retries"] == {"total_max_attempts": 1, "mode": "adaptive"}
    assert own.options == {"anon": True, **NO_CLIENT_RETRIES}  # the user's, untouched
    assert pickle.loads(pickle.dumps(own)).fs.retries == 1


def test_s3_client_retry_policy_leaves_aws_variables_in_charge(monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    assert Storage("s3://bucket/y", {"anon": True}).fs.config_kwargs["retries"] == {}


@pytest.mark.parametrize("status,code", [(503, "ServiceUnavailable"), (500, "InternalError")])
def test_reads_retry_5xx(s3, status, code):
    s3.put("r/a.bin", b"hello")
    store = Storage(s3.url("r"), NO_CLIENT_RETRIES)
    fault = Fault(method="GET", key=r"/r/a\.bin$", status=status, code=code, times=2)
    s3.proxy.faults.append(fault)
    assert store.read_bytes(store.path("a.bin")) == b"hello"
    gets = [r for r in s3.proxy.to(s3.name) if r.method == "GET" and r.key == "r/a.bin"]
    # Client retries off: 2 failed with_retries attempts, then the one that works.
    assert fault.hits == 2 and len(gets) == 3


def test_the_client_absorbs_short_bursts(s3, caplog):
    """With the default policy, botocore retries a few 5xx and time-outs itself:
    bottleneck's loop never sees them."""
    s3.put("r/a.bin", b"hello")
    store = Storage(s3.url("r"), SHORT_TIMEOUTS)
    s3.proxy.faults += [Fault(method="GET", key=r"/r/a\.bin$", status=503, times=2),
                        Fault(method="GET", key=r"/r/a\.bin$", delay=1.5, times=1)]
    assert store.read_bytes(store.path("a.bin")) == b"hello"
    gets = [r for r in s3.proxy.to(s3.name) if r.method == "GET" and r.key == "r/a.bin"]
    assert len(gets) == 4  # 3 faults, then the answer: all one call of botocore's
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


@pytest.mark.parametrize("fault,times", [
    (Fault(delay=1.5), 2 + 1),  # longer than the read time-out
    # A connection closed without an answer; aiohttp may resend an idempotent request on a
    # reused connection, which spends two faults on one of botocore's tries.
    (Fault(drop=True), 2 * 2 + 1),
    (Fault(status=500, code="InternalError"), 2 + 1),
], ids=["timeout", "dropped", "5xx"])
def test_network_faults_outlasting_the_clients_retries_are_retried(s3, caplog, fault, times):
    """botocore retries these itself (here 2 tries a call); more in a row reach bottleneck's
    retries."""
    out = Storage(s3.url("w"), ONE_CLIENT_RETRY)
    fault.method, fault.key, fault.times = "PUT", r"/w/part-00000\.parquet$", times
    s3.proxy.faults.append(fault)
    out.write_bytes_atomic(b"data", "part-00000.parquet")
    assert s3.get("w/part-00000.parquet") == b"data"
    puts = [r for r in s3.proxy.to(s3.name) if r.method == "PUT"]
    assert fault.hits == times
    assert len(puts) == times + 1  # every fault, then the PUT that worked
    assert {r.key for r in puts} == {"w/part-00000.parquet"}
    assert [r for r in caplog.records if "retry 1/4" in r.getMessage()]  # the outer loop's


def test_commits_retry_in_place(s3):
    out = Storage(s3.url("w"), NO_CLIENT_RETRIES)
    s3.proxy.reset()
    s3.proxy.faults.append(Fault(method="PUT", key=r"/w/x\.json$", status=500,
                                 code="InternalError", times=2))
    out.write_json_atomic({"a": 1}, "x.json")
    assert s3.get("w/x.json").replace(b" ", b"").replace(b"\n", b"") == b'{"a":1}'
    assert s3.keys("w/") == ["w/x.json"]
    # The same PUT of the final name, retried: 2 failures, then the one that worked.
    assert [(r.method, r.key) for r in s3.proxy.to(s3.name)] == [("PUT", "w/x.json")] * 3


@pytest.mark.parametrize("options", [NO_CLIENT_RETRIES, SHORT_TIMEOUTS],
                         ids=["client-retries-off", "default-policy"])
def test_permanent_errors_are_not_retried(s3, options):
    s3.put("r/a.bin", b"hello")
    store = Storage(s3.url("r"), options)
    s3.proxy.faults.append(Fault(method="GET", key=r"/r/a\.bin$", status=403, code="AccessDenied"))
    with pytest.raises(PermissionError) as denied:
        store.read_bytes(store.path("a.bin"))
    with pytest.raises(FileNotFoundError) as missing:
        store.read_bytes(store.path("img-500.jpg"))  # "500" in a name is not a 5xx
    assert not is_transient(denied.value) and not is_transient(missing.value)
    gets = [r.key for r in s3.proxy.to(s3.name) if r.method == "GET" and r.key]
    assert gets == ["r/a.bin", "r/img-500.jpg"]  # one each, by neither botocore nor bottleneck


def test_write_that_keeps_failing_raises_and_leaves_nothing(s3):
    out = Storage(s3.url("w"), NO_CLIENT_RETRIES)
    s3.proxy.faults.append(Fault(method="PUT", key=r"/w/part-00003\.parquet$", status=503))
    t = time.perf_counter()
    with pytest.raises(OSError) as failed:
        out.write_bytes_atomic(b"data", "part-00003.parquet")
    assert is_transient(failed.value) and failed.value.errno == errno.EBUSY
    assert s3.proxy.faults[0].hits == 5  # with_retries' attempts, of one client try each
    assert time.perf_counter() - t < 15
    assert s3.keys("w/") == []


# -- exclusive create ----------------------------------------------------------------------

def test_create_exclusive_first_wins(s3):
    store = Storage(s3.url("locks"))
    s3.proxy.reset()
    assert store.create_exclusive(b"first", "job.lock") is True
    assert store.create_exclusive(b"second", "job.lock") is False
    assert s3.get("locks/job.lock") == b"first"
    # One conditional PUT each; the second is refused by the store (412), not checked first.
    assert [(r.method, r.key) for r in s3.proxy.to(s3.name)] == [("PUT", "locks/job.lock")] * 2
    assert store.create_exclusive(b'{"owner": "a"}', "other.lock") is True
    assert store.read_json("other.lock") == {"owner": "a"}


def test_the_test_server_honours_if_none_match(s3):
    """What create_exclusive relies on, asked of moto straight (as of AWS S3 and MinIO):
    a PutObject or CompleteMultipartUpload with If-None-Match: * onto an existing key is
    refused with 412 PreconditionFailed, and the object is kept."""
    from botocore.exceptions import ClientError

    s3.client.put_object(Bucket=s3.name, Key="k", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as put:
        s3.client.put_object(Bucket=s3.name, Key="k", Body=b"2", IfNoneMatch="*")
    upload = s3.client.create_multipart_upload(Bucket=s3.name, Key="k")["UploadId"]
    part = s3.client.upload_part(Bucket=s3.name, Key="k", UploadId=upload, PartNumber=1,
                                 Body=b"3")
    with pytest.raises(ClientError) as complete:
        s3.client.complete_multipart_upload(
            Bucket=s3.name, Key="k", UploadId=upload, IfNoneMatch="*",
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    for e in (put.value, complete.value):
        assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 412
        assert e.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get("k") == b"1"


def test_create_exclusive_race_has_one_winner(s3):
    store = Storage(s3.url("locks"))
    barrier = threading.Barrier(20)

    def create(i: int) -> bool:
        barrier.wait()
        return store.create_exclusive(f"owner-{i}".encode(), "race.lock")

    with ThreadPoolExecutor(20) as pool:
        won = list(pool.map(create, range(20)))
    assert won.count(True) == 1
    assert s3.get("locks/race.lock") == f"owner-{won.index(True)}".encode()
    assert len([r for r in s3.proxy.to(s3.name) if r.method == "PUT"]) == 20  # one try each


def test_create_exclusive_retries_a_conflict_and_gives_up_to_the_winner(s3):
    store = Storage(s3.url("locks"), NO_CLIENT_RETRIES)
    conflict = Fault(method="PUT", key=r"/locks/a\.lock$", status=409,
                     code="ConditionalRequestConflict", times=2)
    s3.proxy.faults.append(conflict)
    assert store.create_exclusive(b"mine", "a.lock") is True  # retried: 2 conflicts, then 200
    assert conflict.hits == 2 and s3.get("locks/a.lock") == b"mine"
    # A conflict that outlasts the retries: another writer won (here none did).
    s3.proxy.faults.append(Fault(method="PUT", key=r"/locks/b\.lock$", status=409,
                                 code="ConditionalRequestConflict"))
    assert store.create_exclusive(b"mine", "b.lock") is False
    assert "locks/b.lock" not in s3.keys("locks/")


@pytest.mark.parametrize("options", [NO_CLIENT_RETRIES, SHORT_TIMEOUTS],
                         ids=["resent-by-with_retries", "resent-by-botocore"])
def test_create_exclusive_whose_answer_was_lost_counts_as_created(s3, options):
    """The first PUT creates the object but its answer comes after the read time-out; the
    resent PUT gets 412 and finds our own bytes there."""
    store = Storage(s3.url("locks"), options)
    lost = Fault(method="PUT", key=r"/locks/slow\.lock$", answer_delay=1.5, times=1)
    s3.proxy.faults.append(lost)
    assert store.create_exclusive(b"owner-1", "slow.lock") is True
    assert lost.hits == 1 and s3.get("locks/slow.lock") == b"owner-1"
    puts = [r for r in s3.proxy.to(s3.name) if r.method == "PUT"]
    assert len(puts) == 2  # the one that created it, and the one refused with 412
    s3.proxy.faults.append(Fault(method="PUT", key=r"/locks/slow\.lock$", answer_delay=1.5,
                                 times=1))
    assert store.create_exclusive(b"owner-2", "slow.lock") is False
    assert s3.get("locks/slow.lock") == b"owner-1"


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
