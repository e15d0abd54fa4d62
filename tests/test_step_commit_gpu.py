"""The in-step producer on a real GPU (issue 17): epochs committed by a kernel
launched inside the model step, captured with it into transformers' compiled
decode (CUDA graphs), with no host work per step.

* byte identity: for the same steps the kernel writes the log the host
  backend writes (ROWS records, the COMMIT body formatted on the device,
  checkpoint every token and every 4);
* compiled ``durable_generate(cache_implementation="static")`` returns
  compiled plain ``generate``'s tokens (deterministic mode), commits one epoch
  per step from the device, and a SIGKILL at a random token resumes to the
  same tokens with a one-token first forward.

Skipped (with the reason) where no CUDA GPU with CuPy is present."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import remove_rings

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")]

SID = "steps"


def _drive(home: Path, backend: str, every: int, *, start: int = 10,
           meta_bytes: int = 0) -> tuple[list[tuple[Any, ...]], Any]:
    """Steps of a 2-layer cache: a host step to length ``start``, then 30
    one-token steps (launched kernels on the GPU, host commits on the host
    backend). ``meta_bytes``: a meta of about that many bytes (a
    conversation's: the body template the kernel formats)."""
    import torch

    from concordia_agents import Runtime
    from tests.conformance.test_log_bytes import _log_records

    device = "cuda" if backend == "cupy" else "cpu"
    end, rows = start + 30, start + 38
    g = torch.Generator().manual_seed(3)
    storage = torch.randn(4, 2, 2, rows, 16, generator=g).to(torch.bfloat16).to(device)  # [2L, B, H, T, D]
    tokens = torch.zeros(2, rows, dtype=torch.int64, device=device)
    ids_all = torch.randint(3, 30000, (2, rows), generator=g).to(device)
    try:
        with Runtime.open(home=home, backend=backend, fsync="none", compact_bytes=1 << 40, compact_epochs=0) as rt:
            s = rt.session(SID)
            s.register("kv", storage, kind="kv", seq_axis=3)
            s.register("tokens", tokens, kind="kv", seq_axis=1)
            meta = {"fingerprint": {"model": "abc"}, "prompt_len": start, "n_tokens": start, "done": False,
                    "calls": [{"id": f"call-{i}-\u00e9\"q\"", "end": 100 * i} for i in range(meta_bytes // 40)]}
            tokens[:, :start] = ids_all[:, :start]
            s.commit(dict(meta), rows={"tokens": start})
            steps = s.step_commits(kv="kv", tokens="tokens", meta=meta, length_key="n_tokens", every=every,
                                   device=backend == "cupy")
            steps.host_step(start, force=True)
            length = torch.zeros((), dtype=torch.int64, device=device)
            stream = torch.cuda.current_stream().cuda_stream if device == "cuda" else 0
            steps.arm(stream)
            for n in range(start + 1, end + 1):
                ids = ids_all[:, n - 1:n]  # a view with row stride `rows`, as generate's input_ids slice
                if steps.device is not None:
                    length.fill_(n)
                    steps.device.launch(stream, length.data_ptr(), ids.data_ptr(), 1, ids.stride(0))
                else:
                    tokens[:, n - 1:n] = ids
                    steps.host_step(n)
            state = steps.close()
            assert s.epoch == 2 + 30 // every, (s.epoch, state)
            s.commit({**meta, "n_tokens": end, "done": True}, rows={"kv": end, "tokens": end})
            assert s.flush(timeout=60) == s.epoch
            records = _log_records(rt.session_dir(SID))
            assert torch.equal(tokens[:, :end].cpu(), ids_all[:, :end].cpu())
            s.close()
    finally:
        remove_rings(home)
    return records, state


@pytest.mark.parametrize(("every", "start", "meta_bytes"), [(1, 10, 0), (4, 10, 0), (1, 85, 3000)])
def test_in_step_commits_write_the_host_backends_bytes(tmp_path, every, start, meta_bytes):
    """Also with a body template of about 3 KB (the kernel's threads share its bytes) and lengths
    passing 99 -> 100 (each place of the length takes one more digit)."""
    want, _ = _drive(tmp_path / "host", "host", every, start=start, meta_bytes=meta_bytes)
    got, state = _drive(tmp_path / "gpu", "cupy", every, start=start, meta_bytes=meta_bytes)
    assert state.commits == 30 // every and state.error is None and state.steps == 30
    assert len(got) == len(want) and [r[1] for r in got] == [r[1] for r in want]
    assert got == want


def _child(home: Path, *flags: str, model: str = "llama-1b") -> dict | None:
    from tests.test_transformers import run_child

    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return run_child(home, model, "--backend", "cupy", "--device", "cuda", "--prompt-len", "300",
                     "--new-tokens", "40", "--extra", json.dumps({"cache_implementation": "static"}), *flags, env=env)


def test_compiled_durable_generate_equals_compiled_plain_and_resumes_after_sigkill(tmp_path):
    """Compiled plain generate (StaticCache) and compiled durable_generate give the same tokens;
    SIGKILLed at a random token, the rerun returns them too, its first forward one token."""
    ref = _child(tmp_path / "ref", "--plain-static")
    out = _child(tmp_path / "durable", "--report")
    assert out is not None and ref is not None
    assert out["tokens"] == ref["tokens"]
    report = out["report"]
    assert report["compiled"] and report["commit_paths"]["general"] >= 1
    assert report["device_commits"] >= 38, report  # every step after the eager first one
    k = random.Random().randint(5, 35)
    assert _child(tmp_path / "crash", "--kill-at-token", str(k)) is None
    resumed = _child(tmp_path / "crash", "--report")
    assert resumed is not None and resumed["tokens"] == ref["tokens"], k
    assert resumed["forward_inputs"][0] == 1, (k, resumed["forward_inputs"][:3])


def test_compiled_checkpoint_every_4_resumes_equal(tmp_path):
    """checkpoint_every=4 inside the graph (the tiny fp32 Llama): killed after 21 tokens, resumed equal."""
    ref = _child(tmp_path / "ref", "--plain-static", model="llama")
    extra = ("--every", "4")
    assert _child(tmp_path / "crash", *extra, "--kill-at-token", "21", model="llama") is None
    resumed = _child(tmp_path / "crash", *extra, "--report", model="llama")
    assert ref is not None and resumed is not None and resumed["tokens"] == ref["tokens"]
    assert resumed["forward_inputs"][0] == 1
    assert resumed["report"]["compiled"] and resumed["report"]["device_commits"] >= 4, resumed["report"]


def test_two_compiled_calls_in_one_process_both_equal_compiled_plain(tmp_path):
    """A second durable_generate in the same process may replay the first call's CUDA graph (torch's
    allocator hands the new cache the old addresses): its producer is found at run time, so both
    calls commit into their own sessions and return compiled plain generate's tokens."""
    ref = _child(tmp_path / "ref", "--plain-static", model="llama")
    out = _child(tmp_path / "twice", "--twice", "--report", model="llama")
    assert ref is not None and out is not None
    assert out["tokens"] == ref["tokens"] and out["tokens2"] == ref["tokens"]


def test_compiled_seeded_sampling_resumes_equal(tmp_path):
    """Seeded sampling on the compiled path: epochs from the device (no host copy of the CUDA generator per
    token; its state at a step follows from the length), the same tokens as compiled plain generate with the
    same seed, and after a SIGKILL at a random token too, the first resumed forward one token."""
    ref = _child(tmp_path / "ref", "--plain-static", "--sample", model="llama")
    out = _child(tmp_path / "durable", "--sample", "--report", model="llama")
    assert ref is not None and out is not None and out["tokens"] == ref["tokens"]
    assert out["report"]["compiled"] and out["report"]["device_commits"] >= 38, out["report"]
    k = random.Random().randint(5, 35)
    assert _child(tmp_path / "crash", "--sample", "--kill-at-token", str(k), model="llama") is None
    resumed = _child(tmp_path / "crash", "--sample", "--report", model="llama")
    assert resumed is not None and resumed["tokens"] == ref["tokens"], k
    assert resumed["forward_inputs"][0] == 1, (k, resumed["forward_inputs"][:3])
