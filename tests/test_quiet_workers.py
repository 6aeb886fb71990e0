"""quiet_tensorflow() keeps TensorFlow's start-up lines out of the driver's terminal, where Ray
forwards every worker's stderr, and lets real output through. A real local Ray in a
subprocess, real TensorFlow, and a tiny real VGG16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

DRIVER = '''
import time
import ray

ray.init(address="local", num_cpus=2, include_dashboard=False)


def work(quiet):
    if quiet:
        from bottleneck.tflog import quiet_tensorflow
        quiet_tensorflow()
    import keras
    import tensorflow as tf
    model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    model(tf.zeros((1, 32, 32, 3)))
    tf.get_logger().warning("visible-warning")
    print("visible-print", flush=True)


@ray.remote
class Quiet:
    def run(self):
        work(quiet=True)


@ray.remote
class Noisy:
    def run(self):
        work(quiet=False)


@ray.remote
class NoisyAtLevel2:
    def run(self):
        work(quiet=False)


actors = [Quiet.remote(), Noisy.remote(),
          NoisyAtLevel2.options(runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}).remote()]
ray.get([a.run.remote() for a in actors])
time.sleep(3)  # the log monitor forwards workers' output a moment later
ray.shutdown()
'''

NOISE = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "This TensorFlow binary is optimized")


@pytest.fixture(scope="module")
def driver_output(tmp_path_factory) -> dict[str, str]:
    """The driver's stdout and stderr together, split by the actor class Ray prefixes each
    forwarded line with."""
    cwd = tmp_path_factory.mktemp("quiet-driver")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_ADDRESS")}
    # One line per actor and message: no merging of similar lines across workers.
    env.update(PYTHONPATH=str(ROOT), RAY_DEDUP_LOGS="0")
    r = subprocess.run([sys.executable, "-c", DRIVER], check=False, cwd=cwd, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert r.returncode == 0, r.stdout
    by_actor: dict[str, str] = {"Quiet": "", "Noisy": "", "NoisyAtLevel2": ""}
    for line in r.stdout.splitlines():
        for name in by_actor:
            if f"({name} pid=" in line:
                by_actor[name] += line + "\n"
    return by_actor


def test_stderr_without_drops_only_the_noise_lines(tmp_path):
    # A subprocess, so that sys.stderr is the process's real fd 2 as in a worker.
    code = """if True:
        import os, sys
        from bottleneck.tflog import stderr_without
        with stderr_without([b"noise"]):
            os.write(2, b"kept 1\\nsome noise here\\nkept 2\\n")
            print("kept 3", file=sys.stderr)
            os.write(2, b"kept 4, no newline")
        os.write(2, b"\\nafter, noise and all\\n")
    """
    r = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path, text=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "kept 1\nkept 2\nkept 3\nkept 4, no newline\nafter, noise and all\n"


@pytest.mark.ray
@pytest.mark.slow
def test_quiet_worker_prints_no_start_up_lines(driver_output):
    out = driver_output["Quiet"]
    for noise in NOISE:
        assert noise not in out, out


@pytest.mark.ray
@pytest.mark.slow
def test_quiet_worker_still_shows_warnings_and_prints(driver_output):
    out = driver_output["Quiet"]
    assert "visible-warning" in out and "visible-print" in out, out


@pytest.mark.ray
@pytest.mark.slow
def test_without_it_the_start_up_lines_reach_the_driver(driver_output):
    # The control: the same worker without quiet_tensorflow().
    out = driver_output["Noisy"]
    for noise in NOISE:
        assert noise in out, out
    assert "visible-warning" in out and "visible-print" in out, out


@pytest.mark.ray
@pytest.mark.slow
def test_tf_cpp_min_log_level_2_alone_leaves_the_load_time_lines(driver_output):
    # Why the level is not enough: these lines are logged before TensorFlow reads it.
    out = driver_output["NoisyAtLevel2"]
    assert "oneDNN custom operations are on" in out, out
    assert "absl::InitializeLog" in out, out
