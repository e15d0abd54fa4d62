"""Examples run as tests: each crashes by SIGKILL and resumes by session ID."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(home: Path, *args: str, example: str = "durable_generation.py") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONCORDIA_HOME": str(home)}
    return subprocess.run([sys.executable, f"examples/{example}", "--device", "cpu", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_durable_generation_example_crashes_then_resumes(tmp_path):
    """--crash-after 40 dies by SIGKILL; the rerun reuses 40 tokens and computes the other 80."""
    assert _run(tmp_path, "--crash-after", "40").returncode == -9
    time.sleep(2.2)  # the example's 2 s lease expires
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr
    assert "reused from the log: 40 new tokens" in r.stdout
    assert "computed now: 80 forward passes; first forward input length 1" in r.stdout


def test_durable_agent_example_crashes_in_llm_node_then_resumes(tmp_path):
    """The agent dies by SIGKILL after 100 tokens of its LLM node; --resume runs only llm and report,
    computes the 140 missing tokens one at a time, and a second --resume runs nothing."""
    assert _run(tmp_path, "--session", "ex", "--crash-after", "100", example="durable_agent.py").returncode == -9
    r = _run(tmp_path, "--session", "ex", "--resume", example="durable_agent.py")
    assert r.returncode == 0, r.stderr
    assert "240 tokens generated" in r.stdout
    assert "nodes run in this process: ['llm', 'report']" in r.stdout
    assert "forward passes here: 140; first input length 1" in r.stdout
    r = _run(tmp_path, "--session", "ex", "--resume", example="durable_agent.py")
    assert "nodes run in this process: none (already finished)" in r.stdout


def test_conversation_agent_example_crashes_mid_turn_then_resumes(tmp_path):
    """4 turns of 100-token user messages and 30-token replies, SIGKILLed mid-reply of turn 3: --resume
    continues that reply (its KV from the log, one token re-forwarded) and turn 4 prefills only its new
    message and the last reply token, reusing the rest from memory."""
    flags = ("--session", "chat", "--turns", "4", "--user-tokens", "100", "--reply-tokens", "30")
    assert _run(tmp_path, *flags, "--crash-in-turn", "3", example="conversation_agent.py").returncode == -9
    r = _run(tmp_path, *flags, "--resume", example="conversation_agent.py")
    assert r.returncode == 0, r.stderr
    assert "4 turns, conversation of 520 tokens" in r.stdout
    assert "prompt    360 tokens, reused    360 (log), prefilled     1, new 30, retried: continued" in r.stdout
    assert "prompt    490 tokens, reused    389 (resident), prefilled   101, new 30" in r.stdout
