#!/usr/bin/env bash
# The README's test command: installs what the tests need into .venv, lints, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test . scripts/venv.sh
export TF_CPP_MIN_LOG_LEVEL=2 PYTHONWARNINGS="ignore:Pandas requires version"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
