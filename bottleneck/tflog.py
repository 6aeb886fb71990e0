"""TensorFlow without its start-up notices: a Ray worker calls `quiet_tensorflow()` first.

Ray forwards every worker's stderr to the driver's terminal, so each actor that imports
TensorFlow would print the same lines again. Dropped:
- native INFO lines such as cpu_feature_guard's "This TensorFlow binary is optimized…",
  through TF_CPP_MIN_LOG_LEVEL=1 (unless the caller chose a level);
- the lines that TensorFlow's shared libraries log while they load, before any setting can
  reach them (see `LOAD_NOISE`).
Kept: TensorFlow's native warnings and errors after start-up, its Python logger, Python
warnings, and everything the worker itself prints.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType

# Logged by static initialisers of libtensorflow_framework.so and the plugins that
# `import tensorflow` loads, each with its own copy of absl logging that has not been
# initialised yet: absl then writes to stderr whatever TF_CPP_MIN_LOG_LEVEL says, and no
# environment variable or API call can reach it before the library's own load runs.
LOAD_NOISE: tuple[bytes, ...] = (
    b"All log messages before absl::InitializeLog() is called are written to STDERR",
    b"oneDNN custom operations are on",
    # The CUDA build: each plugin library registers the same factories again.
    b"Attempting to register factory for plugin",
    b"computation placer already registered",
)


def quiet_tensorflow() -> ModuleType:
    """Import TensorFlow with its start-up notices dropped and return the module.

    Call it in a worker before anything imports TensorFlow; later `import tensorflow` statements
    get the same module. If TensorFlow is already imported, it only returns it.
    TF_ENABLE_ONEDNN_OPTS is left alone: it changes numerics, not just logging.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with stderr_without(LOAD_NOISE):
        import tensorflow
    return tensorflow


@contextmanager
def stderr_without(noise: Sequence[bytes]) -> Iterator[None]:
    """Within the block, pass every line written to file descriptor 2 (native code included)
    on to the real stderr, except lines containing one of `noise`.

    A file descriptor, not sys.stderr: the lines come from C++ code that writes to fd 2.
    """
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines, os.fdopen(real, "wb", closefd=False) as out:
            for line in lines:
                if not any(n in line for n in noise):
                    out.write(line)
                    out.flush()

    pumping = threading.Thread(target=pump, name="stderr_without", daemon=True)
    pumping.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end, so the pump reaches its end
        # A copy of fd 2 made inside the block would keep the pipe open: then the pump
        # keeps forwarding from the daemon thread, and the real fd stays open for it.
        pumping.join(timeout=10)
        if not pumping.is_alive():
            os.close(real)
