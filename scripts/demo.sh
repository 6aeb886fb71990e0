#!/usr/bin/env bash
# The README's first command: install into .venv, then run the whole job on real digit
# images (shipped in scikit-learn) on a local Ray. No cluster, no download at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[cpu,s3,demo]'
export TF_CPP_MIN_LOG_LEVEL=2
exec .venv/bin/bottleneck demo "${@:-demo-output}"
