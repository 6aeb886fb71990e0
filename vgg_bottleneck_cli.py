"""The `bottleneck` console script: check that `import bottleneck` is this project, then run
its CLI.

It lives outside the `bottleneck` package because PyPI's Bottleneck (pandas' accelerator)
installs the same import name: where that one wins, `bottleneck.cli` does not exist, and a
script pointed straight at it would die with a traceback instead of saying why.
"""

from __future__ import annotations

import os
import sys

DISTRIBUTION = "vgg-bottleneck"
EXIT_USAGE = 2


def clash_message(module) -> str | None:
    """The one-line error when `module` (what `import bottleneck` gave) is not this project,
    else None."""
    if getattr(module, "__distribution__", None) == DISTRIBUTION:
        return None
    file = getattr(module, "__file__", None)
    where = os.path.dirname(file) if file else ", ".join(getattr(module, "__path__", []))
    if hasattr(module, "nanmean"):
        return (f"bottleneck: error: `import bottleneck` finds PyPI's Bottleneck (pandas' "
                f"accelerator) at {where}, not {DISTRIBUTION}: the two share an import name. "
                f"Install {DISTRIBUTION} in its own virtual environment, or here "
                f"`pip uninstall Bottleneck` and then reinstall {DISTRIBUTION} "
                f"(both own bottleneck/__init__.py).")
    # What is left after Bottleneck was installed over this project and then uninstalled.
    return (f"bottleneck: error: `import bottleneck` finds another package at {where}, not "
            f"{DISTRIBUTION} (installing or uninstalling PyPI's Bottleneck in the same "
            f"environment overwrites or removes bottleneck/__init__.py). Reinstall "
            f"{DISTRIBUTION}, in a virtual environment of its own.")


def main() -> int:
    import bottleneck

    message = clash_message(bottleneck)
    if message:
        print(message, file=sys.stderr)
        return EXIT_USAGE
    from bottleneck.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
