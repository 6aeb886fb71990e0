"""Bad input beyond extract's arguments: each is one `bottleneck: error:` line and exit 2,
before any work (conftest's `run_cli` reports whether Ray was even imported)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import error_lines, run_cli, write_images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == "NO-RAY"
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith("bottleneck: error: "), lines
    assert needle in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("usage")
    write_images(root / "in", {"a": 3, "b": 3}, size=(32, 32))
    return root


@pytest.mark.parametrize("command", ["extract", "predict", "train"])
def test_an_unreachable_ray_address_is_refused_before_any_work(images, tmp_path, command):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = {"extract": ["extract", str(images / "in"), str(tmp_path / "out")],
            "predict": ["predict", str(tmp_path / "model"), str(images / "in")],
            "train": ["train", str(tmp_path / "features"), str(tmp_path / "model")]}[command]
    line = assert_one_line_exit_2(run_cli(*args, "--address", address), "cannot reach Ray at")
    assert address in line
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = run_cli(*args, env={**env, "RAY_ADDRESS": address})
    assert_one_line_exit_2(proc, f"cannot reach Ray at {address}")
    assert not (tmp_path / "out").exists()


def make_model_dir(path, features_json: object = None) -> None:
    """A MODEL_DIR's small files; classifier.keras is a placeholder, never loaded here."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "classifier.keras").write_bytes(b"placeholder")
    (path / "head.keras").write_bytes(b"placeholder")
    (path / "classes.json").write_text(json.dumps(["a", "b"]))
    settings = {"weights": "random:0", "image_size": 32, "interpolation": "bilinear"}
    (path / "features.json").write_text(json.dumps(
        {"settings": settings} if features_json is None else features_json))


@pytest.mark.parametrize("features_json", [{"head": {}}, ["settings"], {"settings": {}}])
def test_a_malformed_model_dir_is_named(images, tmp_path, features_json):
    model = tmp_path / "model"
    make_model_dir(model, features_json)
    proc = run_cli("predict", str(model), str(images / "in"), "--address", "local")
    assert_one_line_exit_2(proc, "malformed classes.json or features.json")
    proc = run_cli("evaluate", str(model), str(images / "features"))
    assert_one_line_exit_2(proc, "malformed classes.json or features.json")


def test_a_missing_predict_input_is_exit_2(images, tmp_path):
    make_model_dir(tmp_path / "model")
    proc = run_cli("predict", str(tmp_path / "model"), str(images / "nope"), "--address", "local")
    assert_one_line_exit_2(proc, "INPUT does not exist")


@pytest.mark.parametrize("command", [["demo"], ["benchmark", "--count", "4"]])
def test_demo_and_benchmark_without_scikit_learn_say_how_to_install_it(tmp_path, command):
    # The one stand-in here: this environment has scikit-learn (the tests need it), so the
    # child process hides it the way a missing package looks to an import.
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("the user's")
    args = [*command, str(workdir)] if command == ["demo"] else [*command, "--workdir",
                                                                   str(workdir)]
    proc = run_cli(*args, prelude="import sys\nsys.modules['sklearn'] = None\n")
    assert_one_line_exit_2(proc, "pip install 'vgg-bottleneck[demo]'")
    assert (workdir / "keep.txt").exists()  # refused before touching the workdir


@pytest.mark.ray
def test_train_finds_its_weights_file_and_names_it_when_it_moved(tmp_path, ray_cluster):
    from bottleneck.extraction import ExtractOptions, run_extract
    from bottleneck.model import build_conv_base, resolve_weights
    from bottleneck.training import HeadConfig, TrainOptions, check_train, run_train

    weights = tmp_path / "w" / "vgg16.weights.h5"
    weights.parent.mkdir()
    build_conv_base(resolve_weights("random:3"), 32).save_weights(weights)
    write_images(tmp_path / "in", {"a": 4, "b": 4}, size=(32, 32))
    features, model = tmp_path / "features", tmp_path / "model"
    s = run_extract(ExtractOptions(str(tmp_path / "in"), str(features), weights=str(weights),
                                   image_size=32, shard_size=8, batch_size=4, progress=False))
    assert s.ok
    # Where the features came from is recorded next to the hash: no --weights needed.
    spec = check_train(TrainOptions(str(features), str(model)))
    assert spec.url == str(weights)

    moved = tmp_path / "elsewhere.weights.h5"
    shutil.move(weights, moved)
    proc = run_cli("train", str(features), str(model), "--address", "local")
    line = assert_one_line_exit_2(proc, "weights file not found")
    assert str(weights) in line and "--weights" in line
    assert not (model / "classifier.keras").exists()

    metrics = run_train(TrainOptions(str(features), str(model), weights=str(moved),
                                     head=HeadConfig(epochs=1), verbose=0))
    assert metrics["train_rows"] > 0 and (model / "classifier.keras").exists()


OTHER_RAY = """
import sys, ray
from ray._private import state
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
for _ in sys.stdin:
    print(len(state.jobs()), flush=True)
"""


@pytest.mark.ray
def test_a_job_never_joins_a_ray_that_another_program_started(images, tmp_path):
    # A notebook, a test run, a colleague's script: a Ray of their own, started with ray.init().
    other = subprocess.Popen([sys.executable, "-c", OTHER_RAY], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = run_cli("extract", str(images / "in"), str(tmp_path / "out"), "--weights",
                       "random", "--image-size", "32", "--no-progress", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on a private Ray started for this job" in proc.stderr
        assert other.poll() is None  # the other program's Ray still runs
        other.stdin.write("jobs?\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "1"  # its own driver, and no other job
    finally:
        other.kill()
        other.wait(timeout=60)


def test_the_demo_never_clears_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's")
    proc = run_cli("demo", str(tmp_path))
    assert_one_line_exit_2(proc, "holds files the demo did not write (notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "the user's"
