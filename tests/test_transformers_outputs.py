"""durable_generate returns what the uninterrupted generate call returns: the same
type and fields (sequences, per-step scores and logits, the cache) after a
SIGKILL and resume and after the session finished; plain calls return a tensor;
fields it cannot rebuild are refused at the call."""

from __future__ import annotations

import json

import pytest
import torch

from tests.test_transformers import run_child

# Sampling with a repetition penalty: processed scores differ from raw logits,
# and the RNG state matters across the crash.
DICT_ARGS = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True,
             "repetition_penalty": 1.3}
FLAGS = ("--sample", "--batch", "3", "--left-pad")


def child(tmp_path, name: str, extra: dict, *kill: str) -> dict | None:  # type: ignore[no-untyped-def]
    """One durable_generate call in a child (home tmp_path/home); what it returned, or None if killed
    (``kill``: the child's --kill-* flags)."""
    path = tmp_path / f"{name}.pt"
    if run_child(tmp_path / "home", "llama", *FLAGS, "--extra", json.dumps(extra), "--save", str(path),
                 *kill) is None:
        return None
    return torch.load(path, weights_only=False)


def assert_same_output(got: dict, ref: dict, new_tokens: int = 30) -> None:
    assert got["type"] == ref["type"] == "GenerateDecoderOnlyOutput"
    assert got["keys"] == ref["keys"]
    assert torch.equal(got["sequences"], ref["sequences"])
    for field in ("scores", "logits"):
        assert len(got[field]) == len(ref[field]) == new_tokens, field
        for step, (a, b) in enumerate(zip(got[field], ref[field], strict=True)):
            assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), (field, step)
    assert got["attentions"] is None and got["hidden_states"] is None
    assert got["cache_type"] == ref["cache_type"] == "DurableCache"
    assert got["cache_len"] == ref["cache_len"] and torch.equal(got["kv"], ref["kv"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:  # type: ignore[no-untyped-def]
    """The uninterrupted run's output (computed once)."""
    out = child(tmp_path_factory.mktemp("ref"), "ref", DICT_ARGS)
    assert out is not None
    return out


def test_sigkill_mid_generation_then_resume_returns_the_uninterrupted_output(tmp_path, reference):
    """Killed after 11 of 30 tokens, the resumed call returns the uninterrupted type, sequences,
    all 30 steps' scores and logits (bit-equal) and the cache."""
    assert child(tmp_path, "killed", DICT_ARGS, "--kill-after-tokens", "11") is None
    assert_same_output(child(tmp_path, "resumed", DICT_ARGS), reference)


def test_sigkill_with_commits_every_four_tokens_resumes_the_same_output(tmp_path, reference):
    """With checkpoint_every=4 a kill loses the uncommitted steps; the resume recomputes them and
    returns the uninterrupted output."""
    extra = {**DICT_ARGS, "checkpoint_every": 4}
    assert child(tmp_path, "killed", extra, "--kill-after-tokens", "9") is None
    assert_same_output(child(tmp_path, "resumed", extra), reference)


def test_call_after_a_crash_past_the_last_token_returns_the_same_output(tmp_path, reference):
    """A crash after the final commit: the next call returns the same type and fields without the model."""
    assert child(tmp_path, "killed", DICT_ARGS, "--kill-after-done") is None
    assert_same_output(child(tmp_path, "stored", DICT_ARGS), reference)


def test_call_after_the_session_finished_returns_the_same_type_and_fields(tmp_path):
    """Called again on a finished session, it returns the first call's output type and fields."""
    from concordia_agents import Runtime
    from integrations.transformers import DurableCache, durable_generate
    from tests._gen_child import build, describe_output, prompt

    model = build("llama")
    ids, mask = prompt(2, True)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        for sid, extra in (("scores", DICT_ARGS), ("plain-dict", {"return_dict_in_generate": True})):
            first = durable_generate(model, ids, sid, runtime=rt, attention_mask=mask, max_new_tokens=8, **extra)
            again = durable_generate(model, ids, sid, runtime=rt, attention_mask=mask, max_new_tokens=8, **extra)
            a, b = describe_output(first), describe_output(again)
            assert a["type"] == b["type"] == "GenerateDecoderOnlyOutput" and a["keys"] == b["keys"]
            assert isinstance(again["cache" if "cache" in again else "past_key_values"], DurableCache)
            assert torch.equal(a["sequences"], b["sequences"]) and a["cache_len"] == b["cache_len"] == 19
            assert torch.equal(a["kv"], b["kv"])
            for field in ("scores", "logits"):
                if f"output_{field}" in extra:
                    assert len(b[field]) == 8
                    assert all(torch.equal(x, y) for x, y in zip(a[field], b[field], strict=True))
                else:
                    assert a[field] is None and b[field] is None


def test_plain_calls_return_a_tensor_and_store_no_scores(tmp_path):
    """Without return_dict_in_generate (output_scores alone changes nothing) a fresh and a finished
    call return the sequences tensor, and no scores or logits are written to the log."""
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        for _ in range(2):
            out = durable_generate(model, ids, "p", runtime=rt, attention_mask=mask, max_new_tokens=6,
                                   do_sample=False, output_scores=True, output_logits=True)
            assert type(out) is torch.Tensor and torch.equal(out, ref)
        with rt.session("p") as s:
            assert set(s.recorded) == {"kv", "tokens"}


@pytest.mark.parametrize("option", ["output_attentions", "output_hidden_states"])
def test_attentions_and_hidden_states_are_refused_at_the_call(tmp_path, option):
    """With return_dict_in_generate, output_attentions / output_hidden_states raise a ConcordiaError
    naming the option before anything is generated or committed."""
    from concordia_agents import ConcordiaError, Runtime
    from integrations.transformers import durable_generate
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        with pytest.raises(ConcordiaError, match=f"{option}=True is not supported.*expected {option}=False"):
            durable_generate(model, ids, "a", runtime=rt, attention_mask=mask, max_new_tokens=4,
                             return_dict_in_generate=True, **{option: True})
        with rt.session("a") as s:
            assert s.epoch == 0


def test_num_return_sequences_is_refused(tmp_path):
    """num_return_sequences > 1 (generate would expand the batch behind the cache) raises a
    ConcordiaError saying expected and found."""
    from concordia_agents import ConcordiaError, Runtime
    from integrations.transformers import durable_generate
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path, backend="host") as rt, \
            pytest.raises(ConcordiaError, match="expected num_return_sequences=1, found 2"):
        durable_generate(model, ids, "n", runtime=rt, attention_mask=mask, max_new_tokens=4, do_sample=True,
                         num_return_sequences=2)


def test_resume_that_needs_unstored_scores_is_refused(tmp_path):
    """A run that stored no scores, called again with the model's generation_config asking for them,
    raises ResumeMismatchError instead of returning scores it never kept."""
    from concordia_agents import Runtime
    from integrations.transformers import ResumeMismatchError, durable_generate
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        durable_generate(model, ids, "u", runtime=rt, attention_mask=mask, max_new_tokens=4)
        model.generation_config.return_dict_in_generate = True
        model.generation_config.output_scores = True
        with pytest.raises(ResumeMismatchError, match="generation"):
            durable_generate(model, ids, "u", runtime=rt, attention_mask=mask, max_new_tokens=4)
