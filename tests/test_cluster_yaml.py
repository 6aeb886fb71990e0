"""cluster.yaml: a valid Ray cluster-launcher config for AWS that installs this project with
TensorFlow's CUDA build on GPU workers scaling from zero, with token auth and no credentials."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


def ray_package_dir() -> Path:
    """The installed ray package, found without importing it."""
    spec = importlib.util.find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def all_commands(config: dict) -> list[str]:
    cmds = []
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        cmds += config.get(key) or []
    for node_type in config["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            cmds += node_type.get(key) or []
    return cmds


def gpu_node_types(config: dict) -> dict[str, dict]:
    return {name: t for name, t in config["available_node_types"].items()
            if t.get("resources", {}).get("GPU", 0) >= 1}


def test_valid_against_the_schema_in_the_installed_ray(config):
    import jsonschema

    schema = json.loads((ray_package_dir() / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)


def test_ray_accepts_it_once_filled_out_with_the_aws_defaults(config):
    # What `ray up` does before launching anything: merge defaults.yaml, then validate
    # (schema plus checks such as head_node_type naming a defined node type).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_aws_cpu_head_and_gpu_workers_scaling_from_zero(config):
    assert config["provider"]["type"] == "aws"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpus = gpu_node_types(config)
    assert gpus, "no worker type declares GPU resources"
    for name, node_type in gpus.items():
        assert name != config["head_node_type"]
        assert node_type["min_workers"] == 0, f"{name} does not scale from zero"
        assert node_type["max_workers"] >= 1
        assert node_type["resources"]["CPU"] >= 1
        # A GPU instance family (g*/p*), on an image with the NVIDIA driver.
        assert re.match(r"^[gp]\d", node_type["node_config"]["InstanceType"])
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", node_type["node_config"]["ImageId"])


def test_the_ami_is_named_with_a_way_to_look_up_the_current_id(text):
    assert "Deep Learning Base OSS Nvidia Driver GPU AMI" in text
    assert "aws ssm get-parameter" in text


def test_setup_installs_this_project_with_the_gpu_extra(config):
    installs = [c for c in config["setup_commands"] if "pip install" in c and " -e " in c]
    assert installs, "setup_commands do not pip install -e this project"
    m = re.search(r'-e\s+"?(?P<path>[^"\s\[]+)\[(?P<extras>[\w,-]+)\]', installs[0])
    assert m, installs[0]
    assert {"gpu", "s3"} <= set(m["extras"].split(","))
    # The installed path is this project, synced there by file_mounts.
    remote = m["path"].replace("$HOME", "~")
    assert config["file_mounts"].get(remote) == "."

    # The gpu extra is TensorFlow's CUDA build.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("tensorflow[and-cuda]") for dep in extras["gpu"])


def test_the_local_venv_and_git_are_not_synced(config):
    excluded = " ".join(config.get("rsync_exclude", []))
    assert ".venv" in excluded and ".git" in excluded


def test_ray_starts_with_token_auth_and_the_token_comes_from_a_file_mount(config):
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert "RAY_AUTH_MODE=token ray start" in cmd
    # The token itself is never in the file: each node gets the user's ~/.ray/auth_token.
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


CREDENTIAL_KEY = re.compile(r"(?i)(access_key|secret|password|session_token|private_key)")
CREDENTIAL_VALUE = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                # AWS access key ids
    re.compile(r"(?<![0-9A-Za-z/+])[0-9A-Za-z/+]{40}(?![0-9A-Za-z/+=])"),  # AWS secret keys
    re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])"),      # a Ray auth token
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)\b(AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)\s*="),
]


def walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", str(k), None
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")
    else:
        yield path, None, str(node)


def test_no_credentials_in_keys_values_or_comments(config, text):
    for path, key, value in walk(config):
        if key is not None:
            assert not CREDENTIAL_KEY.search(key), f"credential-like key at {path}"
        else:
            for pattern in CREDENTIAL_VALUE:
                assert not pattern.search(value), f"credential-like value at {path}"
    for pattern in CREDENTIAL_VALUE:
        assert not pattern.search(text), f"credential-like text matching {pattern.pattern}"
    assert "ssh_private_key" not in config.get("auth", {})


def test_the_credential_checks_catch_credentials():
    # AWS's documented example key pair, and a made-up token: the patterns must see them.
    samples = ["AKIA" + "IOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY",
               "0123456789abcdef" * 4, "export RAY_AUTH_TOKEN=abc"]
    for sample in samples:
        assert any(p.search(sample) for p in CREDENTIAL_VALUE), sample
    assert CREDENTIAL_KEY.search("aws_secret_access_key")
