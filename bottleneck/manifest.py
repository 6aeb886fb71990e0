"""What OUTPUT remembers between runs: the job's manifest, its done-marker, and its lock.

- ``_bottleneck.json``: the settings, listing fingerprint and shard size the dataset was
  made with. A rerun with the same ones resumes; with others it is refused (or, with
  --overwrite, OUTPUT is cleared first).
- ``_SUCCESS.json``: written last, with the counts of a finished job.
- ``_lock.json``: held by a running job, refreshed every few seconds; a second job on the
  same OUTPUT is refused while it is fresh. A lock left by a killed job goes stale and is
  taken over, so it never blocks the next run for long.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .planning import PART_RE
from .storage import Storage

MANIFEST = "_bottleneck.json"
SUCCESS = "_SUCCESS.json"
LOCK = "_lock.json"
LOCK_STALE_AFTER = 30.0  # seconds without a heartbeat
LOCK_HEARTBEAT = 5.0


class OutputConflict(RuntimeError):
    """OUTPUT holds something this run must not touch."""


@dataclass
class Manifest:
    kind: str  # "features" or "predictions"
    settings: dict[str, Any]
    input_url: str
    listing_sha256: str
    images: int
    shard_size: int
    shards: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def mismatches(self, other: "Manifest", listing: bool = True) -> list[str]:
        """What differs between two manifests, in words; empty when a resume is safe.

        `listing=False` leaves out the listing fingerprint, for the check made before INPUT
        is listed."""
        diffs = []
        for k, name in (("kind", "kind"), ("input_url", "INPUT"), ("shard_size", "shard_size")):
            if getattr(self, k) != getattr(other, k):
                diffs.append(f"{name}: {getattr(other, k)!r} in OUTPUT, {getattr(self, k)!r} now")
        for k in sorted(set(self.settings) | set(other.settings)):
            a, b = self.settings.get(k), other.settings.get(k)
            if a != b:
                diffs.append(f"{k}: {b!r} in OUTPUT, {a!r} now")
        if (listing and self.input_url == other.input_url
                and self.listing_sha256 != other.listing_sha256):
            diffs.append(f"INPUT listing changed: {other.images} files when OUTPUT was made, "
                         f"{self.images} now ({self.input_url})")
        return diffs


def _conflict(out: Storage, diffs: list[str]) -> OutputConflict:
    return OutputConflict(
        f"OUTPUT {out.url} was made with other settings; refusing to mix them:\n  - "
        + "\n  - ".join(diffs)
        + "\nUse another OUTPUT, or --overwrite to replace what is there.")


def read_manifest(out: Storage) -> Manifest | None:
    """OUTPUT's manifest, None when it has none; OutputConflict when it is unreadable."""
    if not out.exists(MANIFEST):
        return None
    try:
        d = out.read_json(MANIFEST)
        return Manifest(**{k: d[k] for k in Manifest.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as e:
        raise OutputConflict(f"OUTPUT {out.url} has an unreadable {MANIFEST} ({e!r}); "
                             "use --overwrite to replace what is there") from None


def check_resumable(out: Storage, kind: str, settings: dict[str, Any], input_url: str,
                    shard_size: int) -> None:
    """Refuse early (before INPUT is listed or Ray starts) to add to an OUTPUT made with
    other settings, another INPUT or another shard size. Raises OutputConflict."""
    old = read_manifest(out)
    if old is None:
        return
    now = Manifest(kind=kind, settings=settings, input_url=input_url,
                   listing_sha256=old.listing_sha256, images=old.images,
                   shard_size=shard_size, shards=old.shards)
    diffs = now.mismatches(old, listing=False)
    if diffs:
        raise _conflict(out, diffs)


def result_names(out: Storage) -> list[str]:
    """Names in OUTPUT that are results or ours; users' files are left alone by --overwrite."""
    return [n for n in out.ls_names()
            if PART_RE.match(n) or n in (MANIFEST, SUCCESS, "_errors", "_tmp")]


def prepare_output(out: Storage, manifest: Manifest, overwrite: bool) -> bool:
    """Check OUTPUT against this run; returns True when it resumes earlier work.

    Raises OutputConflict naming each difference when OUTPUT was made with other settings
    or another input, unless `overwrite`, which removes the earlier results first.
    """
    old = read_manifest(out)
    if old is None and not overwrite:
        stray = [n for n in out.ls_names() if PART_RE.match(n)]
        if stray:
            raise OutputConflict(
                f"OUTPUT {out.url} holds part files but no {MANIFEST}: it was not made by this "
                "tool or its manifest was lost. Use --overwrite to replace them.")
    if old is not None and not overwrite:
        diffs = manifest.mismatches(old)
        if diffs:
            raise _conflict(out, diffs)
    if overwrite:
        for name in result_names(out):
            out.rm(name, recursive=True)
        old = None
    # Until this run ends well, OUTPUT is not finished: no marker from an earlier run may
    # vouch for it (say a part was deleted and this run fails to redo it).
    out.rm(SUCCESS)
    out.rm("_tmp", recursive=True)  # leftovers of a killed run; never read
    out.write_json_atomic(manifest.to_dict(), MANIFEST)
    return old is not None


def _started(pid: int) -> float | None:
    """When process `pid` started (tells a reused pid apart), or None if there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class OutputLock:
    """A heartbeat lock file in OUTPUT (see the module doc). Use as a context manager."""

    def __init__(self, out: Storage, stale_after: float = LOCK_STALE_AFTER):
        self.out = out
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": _started(os.getpid()), "heartbeat": time.time()}

    def _is_live(self, held: dict[str, Any]) -> bool:
        """A fresh heartbeat from a process that still exists. On this host, a lock whose
        process is gone (killed) is stale at once: no need to wait for the heartbeat to age."""
        if time.time() - float(held.get("heartbeat", 0)) >= self.stale_after:
            return False
        if held.get("host") == socket.gethostname() and "pid" in held:
            started = _started(int(held["pid"]))
            return started is not None and started == held.get("pid_started", started)
        return True

    def acquire(self) -> None:
        if self.out.exists(LOCK):
            try:
                held = self.out.read_json(LOCK)
            except (ValueError, FileNotFoundError):
                held = None
            if held and self._is_live(held):
                raise OutputConflict(
                    f"another job is writing to {self.out.url} (pid {held.get('pid')} on "
                    f"{held.get('host')}, alive {time.time() - held['heartbeat']:.0f}s ago). "
                    f"Wait for it to finish, or if it was killed, retry in {self.stale_after:.0f}s "
                    "when its lock goes stale.")
        self.out.write_json_atomic(self._body(), LOCK)
        # Two jobs that raced past the check both wrote; the last write wins, the other backs off.
        time.sleep(0.2)
        if self.out.read_json(LOCK).get("token") != self.token:
            raise OutputConflict(f"another job took the lock on {self.out.url} just now")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="output-lock")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT):
            try:
                self.out.write_json_atomic(self._body(), LOCK)
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        try:
            if self.out.read_json(LOCK).get("token") == self.token:
                # Commits go through _tmp; once the job is over, nothing is left in it.
                self.out.rm("_tmp", recursive=True)
                self.out.rm(LOCK)
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
