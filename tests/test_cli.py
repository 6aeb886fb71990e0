"""`bottleneck extract` error paths, run as a user runs them: a separate process.

Each bad command must fail with exit code 2 and a `bottleneck: error: ...` line before any
Ray work: conftest's `run_cli` reports whether `ray` was even imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, error_lines, run_cli, write_images

CONSOLE_SCRIPT = Path(sys.executable).parent / "bottleneck"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    write_images(root / "in", {"a": 3, "b": 3}, size=(32, 32))
    (root / "a-file").write_text("not a folder")
    return {"root": root, "input": root / "in", "file": root / "a-file"}


def cases(d: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name → (arguments after `extract INPUT OUTPUT`-ish, text the error must contain)."""
    inp, out = str(d["input"]), str(d["root"] / "out")
    return {
        "image-size-below-32": ([inp, out, "--image-size", "16"],
                                "--image-size must be at least 32"),
        "zero-batch-size": ([inp, out, "--batch-size", "0"], "--batch-size must be positive"),
        "bad-pooling": ([inp, out, "--pooling", "sum"], "--pooling"),
        "bad-interpolation": ([inp, out, "--interpolation", "lanczos"], "--interpolation"),
        "bad-storage-options-json": ([inp, out, "--storage-options", "{anon: true"],
                                     "not valid JSON"),
        "storage-options-not-an-object": ([inp, out, "--storage-options", "[1]"],
                                          "must be a JSON object"),
        "missing-input": ([str(d["root"] / "nope"), out], "INPUT does not exist"),
        "input-is-a-file": ([str(d["file"]), out], "INPUT must be a folder"),
        "unwritable-output": ([inp, str(d["file"] / "out")], "OUTPUT is not writable"),
        "output-inside-input": ([inp, str(d["input"] / "features")], "must not be inside INPUT"),
        "missing-weights-file": ([inp, out, "--weights", str(d["root"] / "nope.h5")],
                                 "weights file not found"),
        "weights-file-not-hdf5": ([inp, out, "--weights", str(d["file"])],
                                  "not an HDF5 weights file"),
        "bad-random-seed": ([inp, out, "--weights", "random:x"], "integer seed"),
    }


NAMES = ["image-size-below-32", "zero-batch-size", "bad-pooling", "bad-interpolation",
         "bad-storage-options-json", "storage-options-not-an-object", "missing-input",
         "input-is-a-file", "unwritable-output", "output-inside-input", "missing-weights-file",
         "weights-file-not-hdf5", "bad-random-seed"]


@pytest.mark.parametrize("name", NAMES)
def test_usage_errors_exit_2_at_once_without_ray(data, name):
    args, needle = cases(data)[name]
    proc = run_cli("extract", *args, "--address", "local")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == "NO-RAY"
    lines = error_lines(proc)
    assert needle in lines[-1], lines
    assert "error: " in lines[-1]
    assert "Traceback" not in proc.stderr
    # A refused command leaves no trace: no OUTPUT made, nothing added to INPUT.
    assert not (data["root"] / "out").exists()
    assert not (data["input"] / "features").exists()


@pytest.mark.parametrize("name", NAMES)
def test_usage_errors_are_one_bottleneck_error_line(data, name):
    args, needle = cases(data)[name]
    proc = run_cli("extract", *args, "--address", "local")
    lines = error_lines(proc)
    assert len(lines) == 1, lines
    assert lines[0].startswith("bottleneck: error: ") and needle in lines[0]


def test_the_console_script_is_installed_and_fails_the_same_way(data):
    proc = subprocess.run([str(CONSOLE_SCRIPT), "extract", str(data["root"] / "nope"),
                           str(data["root"] / "out"), "--address", "local"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bottleneck: error: INPUT does not exist")
    assert "Ray" not in proc.stderr


def test_help_needs_no_ray_or_tensorflow():
    code = ("import sys\nfrom bottleneck.cli import main\n"
            "try:\n    main(['extract', '--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(rc, 'ray' in sys.modules, 'tensorflow' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.stdout.splitlines()[-1] == "0 False False"
    assert "--image-size" in proc.stdout and "--pooling" in proc.stdout


@pytest.mark.ray
def test_a_real_run_then_a_settings_mismatch_exits_2(data):
    out = data["root"] / "features"
    base = ["extract", str(data["input"]), str(out), "--weights", "random", "--image-size", "32",
            "--shard-size", "4", "--batch-size", "4", "--address", "local", "--no-progress"]
    proc = run_cli(*base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 rows written, 0 unreadable" in proc.stdout
    assert json.loads((out / "_SUCCESS.json").read_text())["rows"] == 6

    proc = run_cli(*[a if a != "32" else "48" for a in base], "--pooling", "avg")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == "NO-RAY"  # refused before Ray
    text = "\n".join(error_lines(proc))
    assert text.startswith("bottleneck: error: OUTPUT ")
    assert "image_size: 32 in OUTPUT, 48 now" in text
    assert "pooling: 'none' in OUTPUT, 'avg' now" in text
    assert "--overwrite" in text

    # The same command again is a no-op that succeeds.
    proc = run_cli(*base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 run now, 2 already done" in proc.stdout
