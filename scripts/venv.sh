# Sourced by demo.sh and test.sh: make .venv (Python 3.11) and install the project with the
# extras named in $EXTRAS into it.
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
export TF_CPP_MIN_LOG_LEVEL=2
