#!/usr/bin/env bash
# End to end, the way a user runs it: a local Ray head with token authentication on,
# `ray job submit --working-dir .` of jobs/extract.py (then jobs/train_head.py once it exists),
# checks on OUTPUT, then the head is stopped.
#
#   scripts/ray_local_e2e.sh [WORKDIR]
#
# WORKDIR (default: a temporary folder, removed on exit) receives images/, features/ and model/
# and is kept. Exit status: 0 when every step passed, non-zero otherwise.
#
# Differences from the README's commands, so that it can run next to other Ray instances on the
# same machine (other test processes calling ray.init()):
# - the head gets a private --temp-dir and free ports instead of 6379/8265/10001/52365;
# - the token lives in a private file (RAY_AUTH_TOKEN_PATH), not in ~/.ray/auth_token;
# - the head runs under `ray start --block` and is stopped by signalling that process, because
#   `ray stop` terminates every Ray process on the machine, whoever started it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# The job's entrypoint `python` and the head's workers must be the venv's: put it first.
[ -x .venv/bin/python ] || { echo "e2e: no .venv (run scripts/test.sh once)" >&2; exit 2; }
export PATH="$ROOT/.venv/bin:$PATH"
export TF_CPP_MIN_LOG_LEVEL=2 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_TOKEN

T0=$SECONDS
if [ $# -ge 1 ]; then
    WORK=$(mkdir -p "$1" && cd "$1" && pwd); KEEP_WORK=1
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/bn-e2e.XXXXXX"); KEEP_WORK=0
fi
# Ray puts unix sockets under its temp dir, and their paths must stay under 107 bytes.
RAY_TMP=$(mktemp -d /tmp/bnray.XXXXXX)
HEAD_LOG=$RAY_TMP/ray-start.log
HEAD_PID=
CHILD_PID=

# Long steps run in the background and are waited for: bash runs a trap only between commands,
# and `wait` is the one it interrupts, so Ctrl-C or a TERM stops the head at once.
run() {
    local rc=0
    "$@" &
    CHILD_PID=$!
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=
    return "$rc"
}

stop_head() {
    [ -n "$HEAD_PID" ] || return 0
    echo "e2e: stopping the head (pid $HEAD_PID)"
    kill -TERM "$HEAD_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$HEAD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$HEAD_PID" 2>/dev/null || true
    # Anything of this head still alive names its private temp dir on its command line.
    local left
    left=$(pgrep -f -- "$RAY_TMP/" | grep -vx "$$" || true)
    if [ -n "$left" ]; then
        echo "e2e: killing leftover processes of this head: $(echo $left)"
        kill -KILL $left 2>/dev/null || true
    fi
    HEAD_PID=
}

cleanup() {
    local rc=$?
    set +e
    [ -z "$CHILD_PID" ] || kill -TERM "$CHILD_PID" 2>/dev/null
    stop_head
    if [ "$rc" -ne 0 ] && [ -f "$HEAD_LOG" ]; then
        echo "e2e: FAILED (exit $rc); last lines of the head's log:" >&2
        tail -n 30 "$HEAD_LOG" >&2
    fi
    rm -rf "$RAY_TMP"
    [ "$KEEP_WORK" = 1 ] || rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step() { echo; echo "=== e2e [$((SECONDS - T0)) s] $*"; }

step "writing a small image set"
IMAGES=$WORK/images OUTPUT=$WORK/features MODEL_DIR=$WORK/model
rm -rf "$IMAGES" "$OUTPUT" "$MODEL_DIR"
python - "$IMAGES" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for label in ("cat", "dog"):
    d = Path(sys.argv[1]) / label
    d.mkdir(parents=True)
    for i in range(8):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / f"img-{i:03d}.jpg", "JPEG")
EOF

step "token authentication: RAY_AUTH_MODE=token, token in a private file"
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$RAY_TMP/auth_token
(umask 077 && python -c 'import secrets; print(secrets.token_hex(32), end="")' >"$RAY_AUTH_TOKEN_PATH")
TOKEN=$(ray get-auth-token 2>/dev/null)  # what every Ray CLI and process here will send
if [ -z "$TOKEN" ] || [ "$TOKEN" != "$(cat "$RAY_AUTH_TOKEN_PATH")" ]; then
    echo "e2e: ray get-auth-token does not return the token in RAY_AUTH_TOKEN_PATH" >&2; exit 1
fi

read -r GCS_PORT DASH_PORT CLIENT_PORT AGENT_HTTP_PORT AGENT_GRPC_PORT RUNTIME_ENV_PORT \
    METRICS_PORT NODE_MANAGER_PORT OBJECT_MANAGER_PORT < <(python - <<'EOF'
import socket
socks = [socket.socket() for _ in range(9)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
DASH=http://127.0.0.1:$DASH_PORT

step "ray start --head (GCS :$GCS_PORT, dashboard :$DASH_PORT, temp dir $RAY_TMP)"
ray start --head --block --num-cpus 2 --num-gpus 0 \
    --port "$GCS_PORT" --include-dashboard=true --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASH_PORT" --ray-client-server-port "$CLIENT_PORT" \
    --dashboard-agent-listen-port "$AGENT_HTTP_PORT" --dashboard-agent-grpc-port "$AGENT_GRPC_PORT" \
    --runtime-env-agent-port "$RUNTIME_ENV_PORT" --metrics-export-port "$METRICS_PORT" \
    --node-manager-port "$NODE_MANAGER_PORT" --object-manager-port "$OBJECT_MANAGER_PORT" \
    --min-worker-port 0 --max-worker-port 0 \
    --temp-dir "$RAY_TMP" --disable-usage-stats >"$HEAD_LOG" 2>&1 &
HEAD_PID=$!

http_code() { curl -s -o /dev/null -w '%{http_code}' "$@" || true; }
for i in $(seq 240); do
    kill -0 "$HEAD_PID" 2>/dev/null || { echo "e2e: ray start exited early" >&2; exit 1; }
    [ "$(http_code "$DASH/api/gcs_healthz")" = 200 ] && break
    [ "$i" -lt 240 ] || { echo "e2e: the dashboard did not come up in 120 s" >&2; exit 1; }
    sleep 0.5
done

step "the dashboard refuses requests without the token, and accepts it"
code=$(http_code "$DASH/api/jobs/")
[ "$code" = 401 ] || { echo "e2e: expected 401 without a token, got $code" >&2; exit 1; }
code=$(http_code -H "Authorization: Bearer wrong-token" "$DASH/api/jobs/")
[ "$code" = 403 ] || { echo "e2e: expected 403 with a wrong token, got $code" >&2; exit 1; }
code=$(http_code -H "Authorization: Bearer $TOKEN" "$DASH/api/jobs/")
[ "$code" = 200 ] || { echo "e2e: expected 200 with the token, got $code" >&2; exit 1; }

submit() {  # submit NAME -- ENTRYPOINT...: run a job, stream its logs, fail when it fails
    local name=$1; shift; shift
    local t=$SECONDS
    run ray job submit --address "$DASH" --working-dir . --submission-id "$name-$$" -- "$@"
    echo "e2e: job $name-$$ succeeded in $((SECONDS - t)) s"
}

step "ray job submit -- python jobs/extract.py"
submit extract -- python jobs/extract.py "$IMAGES" "$OUTPUT" \
    --weights random --image-size 32 --shard-size 8 --batch-size 4

step "checking OUTPUT"
ls -l "$OUTPUT"
parts=$(find "$OUTPUT" -maxdepth 1 -name 'part-*.parquet' | wc -l)
[ "$parts" -eq 2 ] || { echo "e2e: expected 2 part files (16 images / 8), found $parts" >&2; exit 1; }
[ -s "$OUTPUT/_SUCCESS.json" ] || { echo "e2e: no _SUCCESS.json in $OUTPUT" >&2; exit 1; }
python - "$OUTPUT" <<'EOF'
import json, sys
from pathlib import Path

import pyarrow.parquet as pq

out = Path(sys.argv[1])
rows = sum(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet"))
assert rows == 16, f"expected 16 feature rows, found {rows}"
print("e2e: 16 rows; _SUCCESS.json:", json.dumps(json.loads((out / "_SUCCESS.json").read_text()))[:300])
EOF

step "the uploaded working dir left out .venv and .git"
pkg=$(find "$RAY_TMP" -path '*runtime_resources/working_dir_files/*' -name extract.py -path '*/jobs/*' \
      | head -n 1)
[ -n "$pkg" ] || { echo "e2e: no uploaded working dir found under $RAY_TMP" >&2; exit 1; }
pkg=$(dirname "$(dirname "$pkg")")
for d in .venv .git; do
    [ ! -e "$pkg/$d" ] || { echo "e2e: $d was uploaded with the working dir" >&2; exit 1; }
done
echo "e2e: working dir package $(basename "$pkg"): $(du -sh "$pkg" | cut -f1)"

if [ -f jobs/train_head.py ]; then
    step "ray job submit -- python jobs/train_head.py"
    submit train -- python jobs/train_head.py "$OUTPUT" "$MODEL_DIR" --epochs 2
    [ -n "$(ls -A "$MODEL_DIR" 2>/dev/null)" ] || { echo "e2e: MODEL_DIR is empty" >&2; exit 1; }
    ls -l "$MODEL_DIR"
else
    step "jobs/train_head.py does not exist yet: training skipped"
fi

step "stopping the head"
stop_head
echo "e2e: OK in $((SECONDS - T0)) s"
