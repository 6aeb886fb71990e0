"""The exceptions a user can cause, in one family: the CLI maps every `UsageError` to exit 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad argument, a missing INPUT, an unwritable OUTPUT, unusable features: the job
    refuses before any work. The message is one line a user can act on."""


def require_positive(**values: int | float | None) -> None:
    """Raise UsageError for the first value that is given and not positive; keyword names are
    the option names with `_` for `-` (batch_size → --batch-size)."""
    for name, v in values.items():
        if v is not None and v <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, not {v}")
