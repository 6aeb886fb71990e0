"""A live progress bar for long work: done of total, img/s, ETA, and errors so far."""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    """tqdm on stderr (tqdm.auto: a widget in a Jupyter notebook). In a terminal or a
    notebook it redraws in place; in a log (ray job logs, CI) it prints a line every 10
    seconds instead of flooding the log."""

    def __init__(self, total: int, unit: str = "img", enabled: bool = True, desc: str = "extract"):
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty() or "ipykernel" in sys.modules
        self._bar: Any = tqdm(total=total, unit=unit, desc=desc, disable=not enabled,
                              dynamic_ncols=tty, mininterval=0.5 if tty else 10.0,
                              file=sys.stderr, smoothing=0.1)
        self._errors = -1

    def update(self, done: int, errors: int = 0) -> None:
        """Set the absolute count (not an increment): retried shards do not count twice."""
        delta = done - self._bar.n
        if errors != self._errors:
            self._errors = errors
            self._bar.set_postfix(errors=errors, refresh=False)
        if delta:
            self._bar.update(delta)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
