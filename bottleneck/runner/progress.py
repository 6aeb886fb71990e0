"""A live progress bar for long work: done of total, img/s, ETA, errors so far, and while
INPUT is still being listed, the keys found and listing requests a second."""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    """tqdm on stderr (tqdm.auto: a widget in a Jupyter notebook). In a terminal or a
    notebook it redraws in place; in a log (ray job logs, CI) it prints a line every 10
    seconds instead of flooding the log."""

    def __init__(self, total: int | None, unit: str = "img", enabled: bool = True,
                 desc: str = "extract"):
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty() or "ipykernel" in sys.modules
        self._bar: Any = tqdm(total=total, unit=unit, desc=desc, disable=not enabled,
                              dynamic_ncols=tty, mininterval=0.5 if tty else 10.0,
                              file=sys.stderr, smoothing=0.1)
        self._notes: dict[str, Any] = {"errors": 0}
        self._shown: dict[str, Any] = {}

    def set_total(self, total: int) -> None:
        """The total grows while INPUT is still being listed into the plan."""
        if total != self._bar.total:
            self._bar.total = total

    def note(self, **values: Any) -> None:
        """Values shown after the bar (listed=…, req_s=…); None removes one."""
        for k, v in values.items():
            if v is None:
                self._notes.pop(k, None)
            else:
                self._notes[k] = v

    def update(self, done: int, errors: int = 0) -> None:
        """Set the absolute count (not an increment): retried shards do not count twice."""
        delta = done - self._bar.n
        self._notes["errors"] = errors
        if self._notes != self._shown:
            self._shown = dict(self._notes)
            self._bar.set_postfix(self._shown, refresh=False)
        if delta:
            self._bar.update(delta)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
