"""What OUTPUT remembers between runs: the job's manifest, its done-marker, and its lock.

- ``_bottleneck.json``: the settings, INPUT and shard size the dataset was made with. A
  rerun with the same ones resumes; with others it is refused (or, with --overwrite,
  OUTPUT is cleared first).
- ``_plan/``: the shard plan, as listed (see `plan`).
- ``_SUCCESS.json``: written last, with the counts of a finished job.
- ``_lock.json``: held by a running job (see `lock.OutputLock`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..storage import Storage
from .output import ERRORS_DIR
from .plan import PLAN_DIR
from .planning import PART_RE

MANIFEST = "_bottleneck.json"
SUCCESS = "_SUCCESS.json"


class OutputConflict(UsageError):
    """OUTPUT holds something this run must not touch."""


@dataclass
class Manifest:
    kind: str  # "features" or "predictions"
    settings: dict[str, Any]
    input_url: str
    shard_size: int
    # INPUT's --input-format and what else changes its rows (a label field); None in the
    # manifests of OUTPUTs made before they were recorded: not compared.
    input_format: str | None = None
    input_options: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def mismatches(self, other: "Manifest") -> list[str]:
        """What differs between two manifests, in words; empty when a resume is safe."""
        diffs = []
        for k, name in (("kind", "kind"), ("input_url", "INPUT"), ("shard_size", "shard_size"),
                        ("input_format", "INPUT format"), ("input_options", "INPUT options")):
            a, b = getattr(self, k), getattr(other, k)
            if a != b and a is not None and b is not None:
                diffs.append(f"{name}: {getattr(other, k)!r} in OUTPUT, {getattr(self, k)!r} now")
        for k in sorted(set(self.settings) | set(other.settings)):
            a, b = self.settings.get(k), other.settings.get(k)
            if a != b:
                diffs.append(f"{k}: {b!r} in OUTPUT, {a!r} now")
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
        return Manifest(**{k: d[k] for k in Manifest.__dataclass_fields__ if k in d})
    except (ValueError, KeyError, TypeError) as e:
        raise OutputConflict(f"OUTPUT {out.url} has an unreadable {MANIFEST} ({e!r}); "
                             "use --overwrite to replace what is there") from None


def check_resumable(out: Storage, manifest: Manifest) -> None:
    """Refuse early (before INPUT is listed or Ray starts) to add to an OUTPUT made with
    other settings, another INPUT or another shard size. Raises OutputConflict."""
    old = read_manifest(out)
    diffs = manifest.mismatches(old) if old is not None else []
    if diffs:
        raise _conflict(out, diffs)


def result_names(out: Storage) -> list[str]:
    """Names in OUTPUT that are results or ours; users' files are left alone by --overwrite."""
    return [n for n in out.ls_names()
            if PART_RE.match(n) or n in (MANIFEST, SUCCESS, ERRORS_DIR, PLAN_DIR, "_tmp")]


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
