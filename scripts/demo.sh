#!/usr/bin/env bash
# The README's first command: install into .venv, then run the whole job on real digit
# images (shipped in scikit-learn) on a local Ray. No cluster, no download at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=cpu,s3,demo . scripts/venv.sh
exec .venv/bin/bottleneck demo "${@:-demo-output}"
