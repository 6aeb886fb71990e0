"""`ray start --head` + `ray job submit` with token authentication, end to end, as users run it.

The sequence lives in scripts/ray_local_e2e.sh (so CI and people can run it by hand); this test
runs it against a real head and checks what it leaves in OUTPUT.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "ray_local_e2e.sh"
TIMEOUT_S = 900

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run_e2e(work: Path) -> tuple[int, str, float]:
    """Run the script in its own process group; on timeout, TERM the group so that its trap
    stops the head it started. Returns (exit status, output, seconds)."""
    # Without the caller's RAY_* variables: an inherited RAY_ADDRESS or RAY_AUTH_TOKEN would
    # point the script at someone else's cluster or token.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT), str(work)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"scripts/ray_local_e2e.sh ran over {TIMEOUT_S} s:\n{out[-6000:]}")
    return proc.returncode, out, time.monotonic() - start


def test_job_submit_with_token_auth_extracts_and_trains(tmp_path):
    work = tmp_path / "e2e"
    rc, out, seconds = run_e2e(work)
    print(f"scripts/ray_local_e2e.sh: exit {rc} in {seconds:.0f} s")
    assert rc == 0, out[-8000:]
    assert "e2e: OK" in out

    # The script checked these too; check again from outside, on the kept WORKDIR.
    features = work / "features"
    assert len(list(features.glob("part-*.parquet"))) == 2
    success = json.loads((features / "_SUCCESS.json").read_text())
    assert success["rows"] == 16 and success["errors"] == 0
    if (ROOT / "jobs" / "train_head.py").exists():
        assert any((work / "model").iterdir())
    else:
        assert "training skipped" in out

    # The auth token (64 hex digits) never reaches the logs.
    assert not re.search(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])", out)
