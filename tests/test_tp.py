"""Tensor-parallel ``durable_generate`` (integrations/transformers/_tp.py) with two
real processes on the gloo backend (torchrun, CPU, a tiny Llama sharded with
``tp_plan="auto"``): a rank SIGKILLed mid-generation kills the job; a new job
resumes every rank at the newest token both logs hold and returns exactly the
uninterrupted job's tokens, each rank's first forward one token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._s3 import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    pytest.importorskip("accelerate", reason="transformers' tp_plan needs accelerate (the test extra has it)")
    from integrations.testing import tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


def _job(model_dir: Path, home: Path, session: str, *extra: str, nproc: int = 2) -> tuple[int, list[dict]]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "tests._tp_child", "--model", str(model_dir), "--home", str(home), "--session", session, *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    if not any("kill" in x for x in extra) and (r.returncode != 0 or len(lines) != nproc):
        lines.append({"rank": nproc, "stderr": "\n".join(x for x in r.stderr.splitlines() if "[rank" in x)[-6000:]})
    return r.returncode, sorted(lines, key=lambda d: d["rank"])


def _tokens_logged(home: Path) -> dict[str, int]:
    """Each rank session's committed token count (opened and released, not closed)."""
    from concordia_agents import Runtime

    out = {}
    with Runtime.open(home=home, backend="host", create=False) as rt:
        for info in rt.sessions():
            s = rt.session(info.id, create=False)
            out[info.id] = int((s.meta or {}).get("n_tokens", 0))
            s.release()
    return out


@pytest.mark.parametrize("flags", [[], ["--sample"], ["--scores"]], ids=["greedy", "sampled", "greedy-scores"])
def test_a_killed_rank_kills_the_job_and_a_new_job_resumes_every_rank_token_identical(model_dir, tmp_path, flags):
    """Rank 1 commits every 3 tokens and is SIGKILLed at its 8th token, uncommitted, so the ranks' logs end at
    different tokens; the new job agrees on the newest token both hold (rank 0 crops back to it; when
    sampling, every rank takes rank 1's generator state; with stored scores, those are cropped too) and
    returns exactly the uninterrupted job's tokens (and scores)."""
    flag = flags
    code, ref = _job(model_dir, tmp_path / "ref", "ref", *flag)
    assert code == 0 and len(ref) == 2 and "tokens" in ref[0], ref
    assert ref[0]["tokens"] == ref[1]["tokens"], "the ranks of one job generate the same tokens"
    home = tmp_path / "home"
    code, died = _job(model_dir, home, "crash", *flag, "--every", "1:3", "--kill-rank", "1", "--kill-token", "8")
    assert code != 0 and not any("tokens" in d for d in died), f"the job should die with its rank 1: {died}"
    logged = _tokens_logged(home)
    assert set(logged) == {"crash#tp:0/2", "crash#tp:1/2"}, (logged, died)
    assert logged["crash#tp:1/2"] == 8 + 6, f"rank 1 committed tokens 3 and 6: {logged}"
    assert logged["crash#tp:0/2"] > logged["crash#tp:1/2"], f"expected rank 0's log ahead of rank 1's: {logged}"
    code, resumed = _job(model_dir, home, "crash", *flag)
    assert code == 0 and len(resumed) == 2, resumed
    for d in resumed:
        assert d["tokens"] == ref[0]["tokens"], f"rank {d['rank']} resumed to other tokens"
        assert d.get("scores") == ref[0].get("scores"), f"rank {d['rank']}: the scores differ"
        assert d["first_forward"] == 1, f"rank {d['rank']}: first forward of {d['first_forward']} tokens, expected 1"


def test_a_tensor_parallel_session_refuses_another_layout(model_dir, tmp_path):
    """Resuming a 2-rank session on one device (no tensor parallelism) is refused, naming both layouts."""
    home = tmp_path / "home"
    code, _ = _job(model_dir, home, "tp2", "--kill-rank", "0", "--kill-at", "5")
    assert code != 0
    code, single = _job(model_dir, home, "tp2", "--no-tp", nproc=1)
    assert single and "ResumeMismatchError" in single[0].get("error", ""), single
    assert "tensor parallelism over 2 ranks" in single[0]["error"]


def test_conversation_generate_refuses_tensor_parallelism(model_dir, tmp_path):
    """Conversations are one session per conversation: under tensor parallelism every rank would open the
    same one. Refused with a ConcordiaError saying so, on every rank, before anything is opened."""
    _, out = _job(model_dir, tmp_path / "home", "chat", "--conversation")
    assert len(out) == 2 and all("does not support tensor parallelism" in d.get("error", "") for d in out), out
