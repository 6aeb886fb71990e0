#!/usr/bin/env bash
# The README's test command: installs what the tests need into .venv, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONWARNINGS="ignore:Pandas requires version"
exec .venv/bin/python -m pytest -q "$@"
