"""The pip name is vgg-bottleneck, not PyPI's Bottleneck; the two share the import name
`bottleneck`. Real parts: the real Bottleneck wheel from the package index, the launcher in a
subprocess, and the installed pandas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What the installed `bottleneck` script runs.
LAUNCH = "import sys; from vgg_bottleneck_cli import main; sys.exit(main())"


def run_python(args: list[str], path: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    """Run this interpreter with exactly `path` on PYTHONPATH, from `cwd` (kept free of any
    `bottleneck` folder, since -c puts the working directory first on sys.path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    return subprocess.run([sys.executable, *args], check=False, env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def pypi_bottleneck(tmp_path_factory) -> Path:
    """A folder holding the real PyPI Bottleneck, installed with pip --target."""
    target = tmp_path_factory.mktemp("pypi-bottleneck")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                        "--quiet", "--no-deps", "--target", str(target), "Bottleneck"],
                       check=False, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or not (target / "bottleneck" / "__init__.py").exists():
        pytest.fail("these tests need PyPI's Bottleneck, and `pip install --target ... "
                    f"Bottleneck` failed (is the package index reachable?):\n{r.stdout}{r.stderr}")
    return target


def test_distribution_name_and_console_script():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "vgg-bottleneck"
    assert meta["project"]["scripts"] == {"bottleneck": "vgg_bottleneck_cli:main"}
    assert meta["tool"]["setuptools"]["py-modules"] == ["vgg_bottleneck_cli"]
    import bottleneck

    assert bottleneck.__distribution__ == meta["project"]["name"]


def test_launcher_names_pypi_bottleneck_when_it_shadows_ours(pypi_bottleneck, tmp_path):
    r = run_python(["-c", LAUNCH, "--help"], [pypi_bottleneck, ROOT], tmp_path)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("bottleneck: error: `import bottleneck` finds PyPI's Bottleneck")
    assert str(pypi_bottleneck / "bottleneck") in lines[0]
    assert "own virtual environment" in lines[0] and "pip uninstall Bottleneck" in lines[0]
    assert r.stdout == ""


def test_launcher_names_a_package_left_without_our_init(tmp_path):
    # Bottleneck installed over this project and then uninstalled takes __init__.py with it.
    broken = tmp_path / "site"
    shutil.copytree(ROOT / "bottleneck", broken / "bottleneck",
                    ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    shutil.copy(ROOT / "vgg_bottleneck_cli.py", broken)
    # Only `broken` on the path: a regular package anywhere on it would beat this one.
    r = run_python(["-c", LAUNCH, "--help"], [broken], tmp_path)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert f"finds another package at {broken / 'bottleneck'}" in r.stderr
    assert "Reinstall vgg-bottleneck" in r.stderr


def test_launcher_runs_our_cli_when_ours_comes_first(pypi_bottleneck, tmp_path):
    r = run_python(["-c", LAUNCH, "--help"], [ROOT, pypi_bottleneck], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: bottleneck")
    assert r.stderr == ""


def test_pandas_import_next_to_ours_is_silent(tmp_path):
    # Both orders: pandas first imports ours itself, through its optional-dependency check.
    for code in ("import pandas", "import bottleneck, pandas"):
        r = run_python(["-W", "error::UserWarning", "-c", code], [ROOT], tmp_path)
        assert r.returncode == 0 and r.stderr == "", (code, r.stderr)


def test_pandas_does_find_ours_and_would_warn(tmp_path):
    # The control for the test above: with our filter reset, pandas warns about our package.
    code = ("import warnings, bottleneck; warnings.resetwarnings(); "
            "warnings.simplefilter('error', UserWarning); import pandas")
    r = run_python(["-c", code], [ROOT], tmp_path)
    assert r.returncode != 0
    assert "Pandas requires version" in r.stderr and "of 'bottleneck'" in r.stderr
