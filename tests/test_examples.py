"""Examples run as tests: the durable generation example crashes and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONCORDIA_HOME": str(home)}
    return subprocess.run([sys.executable, "examples/durable_generation.py", "--device", "cpu", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_durable_generation_example_crashes_then_resumes(tmp_path):
    """--crash-after 40 dies by SIGKILL; the rerun reuses 40 tokens and computes the other 80."""
    assert _run(tmp_path, "--crash-after", "40").returncode == -9
    time.sleep(2.2)  # the example's 2 s lease expires
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reused from the log: 40 new tokens" in r.stdout
    assert "computed now: 80 forward passes; first forward input length 1" in r.stdout
