"""One job at a time per OUTPUT: a lock file taken by exclusive create, kept by a heartbeat.

- Taking it: `_lock.json` is created only if absent (link(2) of a complete file locally,
  which fails on an existing name as O_EXCL does; a conditional PUT with
  `If-None-Match: *` on S3), so of two jobs started together exactly one wins.
- A lock left by a killed job is stale: at once when its process is gone from this host,
  else once its heartbeat is `stale_after` seconds old. A stale lock is taken over through
  a second exclusive create, `_lock.takeover-<its token>`, so of two jobs that find the
  same stale lock only one takes it.
- Keeping it: every `heartbeat` seconds the holder checks that the lock still holds its
  token and refreshes it. Once no beat has succeeded for `max_missed × heartbeat` seconds
  (failing or hanging requests alike), or a beat finds another job's token, the lock is
  lost: `check()` raises `LockLost`, and the runner stops its workers before they commit
  anything more (commits are atomic, so nothing is left half-written). That time is kept
  well under `stale_after`, so a holder gives up before anyone may take over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..errors import UsageError
from ..storage import Storage
from .manifest import OutputConflict

LOCK = "_lock.json"
TAKEOVER = "_lock.takeover-{token}"
STALE_AFTER = 30.0  # seconds without a heartbeat before another host may take over
HEARTBEAT = float(os.environ.get("BOTTLENECK_LOCK_HEARTBEAT_S", 5.0))
MAX_MISSED = 3


class LockLost(RuntimeError):
    """This job no longer holds OUTPUT's lock: it must stop writing."""


def _started(pid: int) -> float | None:
    """When process `pid` started (tells a reused pid apart), or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class OutputLock:
    """The lock on one OUTPUT (see the module doc). Use as a context manager."""

    def __init__(self, out: Storage, stale_after: float = STALE_AFTER,
                 heartbeat: float = HEARTBEAT, max_missed: int = MAX_MISSED):
        self.out = out
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.max_missed = max_missed
        self.token = uuid.uuid4().hex
        self.lost: str | None = None  # why, once another job's token was found
        self._last_beat = time.monotonic()  # the last successful refresh
        self._last_error = ""
        self._took_over: str | None = None  # the takeover marker this lock created
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_started": _started(os.getpid()),
                           "heartbeat": time.time()}).encode()

    def _is_live(self, held: dict[str, Any]) -> bool:
        """A fresh heartbeat from a process that still exists. On this host, a lock whose
        process is gone (killed) is stale at once: no need to wait for the heartbeat to age."""
        if time.time() - float(held.get("heartbeat", 0)) >= self.stale_after:
            return False
        if held.get("host") == socket.gethostname() and "pid" in held:
            started = _started(int(held["pid"]))
            return started is not None and started == held.get("pid_started", started)
        return True

    def _read(self) -> dict[str, Any] | None:
        try:
            held = self.out.read_json(LOCK)
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: treat as a dead holder's
            return {}
        return held if isinstance(held, dict) else {}

    def acquire(self) -> None:
        """Take the lock or raise OutputConflict saying who holds it (a UsageError, as is
        an OUTPUT on a store that cannot create a file exclusively)."""
        for _ in range(3):  # the holder may release between our create and our read
            try:
                created = self.out.create_exclusive(self._body(), LOCK)
            except NotImplementedError:
                raise UsageError(f"OUTPUT {self.out.url}: its store cannot create a file "
                                 "exclusively, which the lock on OUTPUT needs; use a local "
                                 "folder or S3") from None
            if created:
                break
            held = self._read()
            if held is None:
                continue
            if self._is_live(held):
                age = time.time() - float(held.get("heartbeat", 0))
                raise OutputConflict(
                    f"another job is writing to {self.out.url} (pid {held.get('pid')} on "
                    f"{held.get('host')}, alive {age:.0f}s ago). Wait for it to finish, or if "
                    f"it was killed on another machine, retry in {self.stale_after:.0f}s when "
                    "its lock goes stale.")
            marker = TAKEOVER.format(token=held.get("token", "unreadable"))
            if not self.out.create_exclusive(self._body(), marker):
                if self._marker_is_stale(marker):  # its taker died before writing the lock
                    self.out.rm(marker)
                    continue
                raise OutputConflict(f"another job took over the stale lock on {self.out.url} "
                                     "just now")
            self._took_over = marker
            self.out.write_bytes_atomic(self._body(), LOCK)
            break
        else:
            raise OutputConflict(f"the lock on {self.out.url} keeps changing hands; retry")
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="output-lock")
        self._thread.start()

    def _marker_is_stale(self, marker: str) -> bool:
        try:
            taker = self.out.read_json(marker)
        except (FileNotFoundError, ValueError):
            return True
        return time.time() - float(taker.get("heartbeat", 0)) >= self.stale_after

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                held = self._read()
                if not held or held.get("token") != self.token:
                    self.lost = (f"another job took over the lock on {self.out.url} (this job's "
                                 "heartbeat was too slow)")
                    return
                self.out.write_bytes_atomic(self._body(), LOCK)
                self._last_beat = time.monotonic()
            except Exception as e:  # noqa: BLE001 - `check` tells when it lasts too long
                self._last_error = f" (last error: {type(e).__name__}: {str(e)[:200]})"

    def check(self) -> None:
        """Raise LockLost once the lock is lost (see the module doc)."""
        silent = time.monotonic() - self._last_beat
        if not self.lost and silent > self.max_missed * self.heartbeat:
            self.lost = (f"lost the lock on {self.out.url}: no heartbeat reached it for "
                         f"{silent:.0f}s{self._last_error}")
        if self.lost:
            raise LockLost(f"{self.lost}; stopped before committing anything more. Rerun "
                           "the same command to resume.")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=30)
        if self.lost:
            return  # not ours any more: leave it to its holder
        try:
            held = self._read()
            if held and held.get("token") == self.token:
                self.out.rm("_tmp", recursive=True)  # leftovers of killed workers' commits
                self.out.rm(LOCK)
            if self._took_over:
                self.out.rm(self._took_over)
        except Exception:  # noqa: BLE001 - a lock left behind goes stale by itself
            pass

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
