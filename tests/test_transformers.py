"""durable_generate with real SIGKILLs on tiny random models (no download):
the resumed result equals the uninterrupted one, with no re-prefill."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_child(home: Path, model: str, *flags: str, env: dict[str, str] | None = None) -> dict | None:
    """Run one durable_generate call in a child; None if it died by SIGKILL."""
    e = {**os.environ, "CONCORDIA_LEASE_TTL": "0.5", **(env or {})}
    r = subprocess.run([sys.executable, "-m", "tests._gen_child", "--model", model, "--home", str(home),
                        "--session", "gen", *flags], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300,
                       check=False)
    if r.returncode == -9:
        time.sleep(0.6)  # the dead owner's lease expires
        return None
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def references(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Uninterrupted runs, computed once per configuration."""
    cache: dict[tuple, dict] = {}

    def get(model: str, *flags: str) -> dict:
        key = (model, *flags)
        if key not in cache:
            out = run_child(tmp_path_factory.mktemp("ref"), model, *flags)
            assert out is not None
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama", "qwen2", "mistral", "gpt2"])
def test_sigkill_mid_generation_then_rerun_equals_uninterrupted(tmp_path, references, model):
    """Killed after a random number of tokens, the same call finishes the generation with
    the uninterrupted tokens; its first forward receives one token per sequence."""
    ref = references(model)
    k = random.Random(model).randint(1, 25)
    assert run_child(tmp_path, model, "--kill-after-tokens", str(k)) is None
    out = run_child(tmp_path, model)
    assert out["tokens"] == ref["tokens"]
    assert out["forward_inputs"][0] == 1, out["forward_inputs"]  # no re-prefill
    assert len(out["forward_inputs"]) == 30 - k  # only the missing tokens were computed


def test_crash_before_the_first_epoch_starts_over(tmp_path, references):
    """A crash before anything was committed: the rerun generates everything, same result."""
    assert run_child(tmp_path, "llama", "--kill-before-first-epoch") is None
    out = run_child(tmp_path, "llama")
    assert out["tokens"] == references("llama")["tokens"]
    assert out["forward_inputs"][0] == 12  # the prompt, once


def test_crash_after_the_last_token_returns_stored_result(tmp_path, references):
    """After a crash past the final commit, the rerun returns the stored tokens without the model."""
    assert run_child(tmp_path, "llama", "--kill-after-done") is None
    out = run_child(tmp_path, "llama")
    assert out["tokens"] == references("llama")["tokens"] and out["forward_inputs"] == []


@pytest.mark.slow
def test_batch_of_three_with_left_padding(tmp_path, references):
    """A left-padded batch of 3 resumes to the uninterrupted tokens."""
    ref = references("llama", "--batch", "3", "--left-pad")
    assert run_child(tmp_path, "llama", "--batch", "3", "--left-pad",
                     "--kill-after-tokens", "9") is None
    out = run_child(tmp_path, "llama", "--batch", "3", "--left-pad")
    assert out["tokens"] == ref["tokens"] and out["forward_inputs"][0] == 1


@pytest.mark.slow
def test_sampling_with_a_seed_resumes_identically(tmp_path, references):
    """Sampling resumes with the persisted RNG state: the same tokens as uninterrupted."""
    ref = references("qwen2", "--sample")
    assert run_child(tmp_path, "qwen2", "--sample", "--kill-after-tokens", "11") is None
    out = run_child(tmp_path, "qwen2", "--sample")
    assert out["tokens"] == ref["tokens"]


def test_resume_with_other_prompt_or_arguments_is_refused(tmp_path):
    """Another prompt or other generation arguments raise ResumeMismatchError naming them."""
    from concordia_agents import Runtime
    from integrations.transformers import ResumeMismatchError, durable_generate
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        durable_generate(model, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=5)
        files = sorted(p.name for p in rt.session_dir("x").iterdir())
        with pytest.raises(ResumeMismatchError, match="prompt"):
            durable_generate(model, ids[:, 1:], "x", runtime=rt, max_new_tokens=5)
        # A refused resume leaves the session as it was: closed, the same files (issue 15, item 4).
        assert rt.info("x").status == "closed"
        assert sorted(p.name for p in rt.session_dir("x").iterdir()) == files
        with pytest.raises(ResumeMismatchError, match="generation"):
            durable_generate(model, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=6)
        other = build("qwen2")
        with pytest.raises(ResumeMismatchError, match="model"):
            durable_generate(other, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=5)
        # Observers are not part of the fingerprint: a resume may bring its own.
        from transformers import StoppingCriteriaList

        first = durable_generate(model, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=5)
        again = durable_generate(model, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=5,
                                 stopping_criteria=StoppingCriteriaList([]))
        assert torch.equal(first, again)


def test_an_error_inside_generate_leaves_the_session_resumable_not_closed(tmp_path):
    """A durable_generate call that fails mid-generation (an error in a user's stopping criterion) does
    not mark the session closed: it is released idle, and the next call continues from the last
    committed token to the uninterrupted result."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    from concordia_agents import Runtime
    from integrations.transformers import durable_generate
    from tests._gen_child import build, prompt

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
            if input_ids.shape[1] >= ids.shape[1] + 6:
                raise RuntimeError("boom")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path / "ref", backend="host") as rt:
        want = durable_generate(model, ids, "r", runtime=rt, attention_mask=mask, max_new_tokens=12)
    with Runtime.open(home=tmp_path / "h", backend="host") as rt:
        with pytest.raises(RuntimeError, match="boom"):
            durable_generate(model, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=12,
                             stopping_criteria=StoppingCriteriaList([Boom()]))
        info = rt.info("x")
        assert info.status == "idle" and info.last_epoch >= 5
        got = durable_generate(model, ids, "x", runtime=rt, attention_mask=mask, max_new_tokens=12)
        assert torch.equal(got, want)


def test_durable_cache_is_a_transformers_cache():
    """DurableCache works with model.generate directly and writes in place (no reallocation)."""
    from integrations.transformers import DurableCache
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    cache = DurableCache.for_model(model, batch_size=1, max_cache_len=64)
    ptr = cache.storage.data_ptr()
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10, do_sample=False)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1 and cache.storage.data_ptr() == ptr
