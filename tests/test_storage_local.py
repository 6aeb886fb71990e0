"""Storage on a local folder, and the retry policy's decisions on real exception objects.

No network: S3 goes through tests/test_s3_storage.py.
"""

from __future__ import annotations

import errno
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from bottleneck.storage import Storage, is_transient, with_retries

# -- commits -------------------------------------------------------------------------------

def test_local_commit_writes_aside_then_renames(tmp_path):
    out = Storage(str(tmp_path / "out"))
    with out.open_atomic("sub", "part-00000.parquet") as f:
        f.write(b"half")
        assert not (tmp_path / "out/sub/part-00000.parquet").exists()
        [aside] = (tmp_path / "out/_tmp").iterdir()
        assert aside.name.endswith("-sub-part-00000.parquet")
        f.write(b" and half")
    assert (tmp_path / "out/sub/part-00000.parquet").read_bytes() == b"half and half"
    assert list((tmp_path / "out/_tmp").iterdir()) == []


def test_local_failed_writer_commits_nothing(tmp_path):
    out = Storage(str(tmp_path / "out"))
    with pytest.raises(RuntimeError), out.open_atomic("part-00000.parquet") as f:
        f.write(b"half a file")
        raise RuntimeError("model failed")
    assert not (tmp_path / "out/part-00000.parquet").exists()
    assert list((tmp_path / "out/_tmp").iterdir()) == []


# -- exclusive create ----------------------------------------------------------------------

def test_create_exclusive_first_wins(tmp_path):
    store = Storage(str(tmp_path / "out"))
    assert store.create_exclusive(b"first", "locks", "job.lock") is True
    assert store.create_exclusive(b"second", "locks", "job.lock") is False
    assert (tmp_path / "out/locks/job.lock").read_bytes() == b"first"
    # The loser's scratch copy (beside the name) is gone.
    assert [p.name for p in (tmp_path / "out/locks").iterdir()] == ["job.lock"]
    assert store.create_exclusive(b'{"owner": "a"}', "other.lock") is True
    assert store.read_json("other.lock") == {"owner": "a"}


def test_create_exclusive_race_has_one_winner(tmp_path):
    store = Storage(str(tmp_path / "out"))
    barrier = threading.Barrier(20)
    seen: list[bytes] = []

    def create(i: int) -> bool:
        barrier.wait()
        won = store.create_exclusive(f"owner-{i}".encode() * 1000, "race.lock")
        seen.append((tmp_path / "out/race.lock").read_bytes())  # never empty or partial
        return won

    with ThreadPoolExecutor(20) as pool:
        won = list(pool.map(create, range(20)))
    assert won.count(True) == 1
    winner = f"owner-{won.index(True)}".encode() * 1000
    assert (tmp_path / "out/race.lock").read_bytes() == winner
    assert set(seen) == {winner}


def test_create_exclusive_needs_a_store_that_has_it():
    with pytest.raises(NotImplementedError):
        Storage("memory://bottleneck-test").create_exclusive(b"x", "a.lock")


# -- what is retried -----------------------------------------------------------------------

def client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def translated(status: int, code: str) -> Exception:
    """What s3fs raises: a Python error `from` botocore's."""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(client_error(status, code))


def transient_errors() -> list[BaseException]:
    import aiohttp
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    return [
        translated(503, "SlowDown"), translated(500, "InternalError"),
        translated(429, "TooManyRequests"), client_error(409, "ConditionalRequestConflict"),
        ReadTimeoutError(endpoint_url="http://s3"), ConnectTimeoutError(endpoint_url="http://s3"),
        EndpointConnectionError(endpoint_url="http://s3"), aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut"), FSTimeoutError(), TimeoutError(),
        ConnectionResetError(errno.ECONNRESET, "reset"), OSError(errno.EAGAIN, "again"),
    ]


def permanent_errors() -> list[BaseException]:
    class ReadTimeout(Exception):  # a name alone says nothing: only the type counts
        pass

    return [
        translated(404, "NoSuchKey"), translated(403, "AccessDenied"),
        translated(400, "InvalidArgument"), translated(412, "PreconditionFailed"),
        FileNotFoundError("img-500.jpg"), PermissionError("denied"), ValueError("bad"),
        ReadTimeout("not a client's"), OSError(errno.EINVAL, "invalid"),
    ]


def test_transient_errors_by_type_and_status():
    for e in transient_errors():
        assert is_transient(e), repr(e)
    for e in permanent_errors():
        assert not is_transient(e), repr(e)


def test_the_store_answer_decides_over_the_wrapper():
    """A 404 wrapped in a time-out-looking error is still a 404."""
    try:
        try:
            raise client_error(404, "NoSuchKey")
        except Exception as e:
            raise TimeoutError("while reading") from e
    except TimeoutError as wrapped:
        assert not is_transient(wrapped)


def test_with_retries_stops_at_permanent_errors_and_after_its_attempts():
    calls = []

    def fails(exc: BaseException):
        def fn():
            calls.append(1)
            raise exc
        return fn

    with pytest.raises(FileNotFoundError):
        with_retries(fails(FileNotFoundError("x")), base_delay=0.001)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(TimeoutError):
        with_retries(fails(TimeoutError()), attempts=3, base_delay=0.001)
    assert len(calls) == 3

    answers = iter([TimeoutError(), ConnectionResetError(), "done"])

    def flaky():
        a = next(answers)
        if isinstance(a, BaseException):
            raise a
        return a

    assert with_retries(flaky, base_delay=0.001) == "done"
