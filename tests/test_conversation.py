"""Conversations (issue 18) on the CPU: successive calls of one conversation reuse the KV of
the prefix it holds (from this process's memory or from the log), crop a diverging prompt
durably, survive a SIGKILL mid-call (real child processes), and every call returns what plain
``model.generate`` returns on its full prompt (greedy and seeded sampling)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from concordia_agents import ConcordiaError, Runtime
from integrations.transformers import (
    ConversationCall,
    ResidentConversations,
    ResumeMismatchError,
    conversation_generate,
)
from tests._gen_child import build

pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return build("llama")


def _tokens(seed: int, n: int) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _plain(model, prompt: torch.Tensor, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)


IMPLEMENTATIONS = pytest.mark.parametrize("implementation", [None, "static"], ids=["dynamic", "static"])


@IMPLEMENTATIONS
def test_turns_reuse_the_held_prefix_and_equal_plain_generate(tmp_path, model, implementation):
    """Four turns, each prompt the last output plus new tokens: every call equals plain generate;
    from turn 2 on only the new suffix (and the last output token) is prefilled, from memory.
    With the static cache every decode step's epoch is committed by the step commits (one epoch
    per new token, as with the dynamic cache's token-boundary commits)."""
    calls: list[ConversationCall] = []
    epochs = []
    out = torch.zeros(1, 0, dtype=torch.int64)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        pool = ResidentConversations()
        for turn in range(4):
            prompt = torch.cat([out, _tokens(turn, 9)], dim=1)
            out = conversation_generate(model, prompt, "c", f"t{turn}", runtime=rt, resident=pool,
                                        max_new_tokens=8, do_sample=False, on_call=calls.append,
                                        cache_implementation=implementation)
            assert torch.equal(out, _plain(model, prompt, max_new_tokens=8, do_sample=False)), turn
            assert calls[-1].new_tokens == 8 and calls[-1].prompt_tokens == prompt.shape[1]
            s = rt.session("conversation:c")
            epochs.append(s.epoch)
            assert s.meta["n_tokens"] == out.shape[1] and s.meta["call"]["done"]
            s.cancel()
    assert [c.source for c in calls] == ["none", "resident", "resident", "resident"]
    assert [c.prefilled for c in calls] == [9, 10, 10, 10]  # 9 new tokens + the previous output's last token
    assert [c.reused for c in calls] == [0, 16, 33, 50]
    # the crop epoch, an epoch per step (the prefill and 7 decode steps), the final one
    assert [b - a for a, b in zip([0, *epochs], epochs, strict=False)] == [10] * 4


def test_a_diverging_prompt_keeps_the_common_prefix_durably(tmp_path, model):
    """A prompt that shares only its first 7 tokens with the conversation reuses 7 and crops the
    rest in the log: a later call in a fresh process state (KV from the log) continues the
    cropped conversation and still equals plain generate."""
    calls: list[ConversationCall] = []
    first = _tokens(1, 12)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        out1 = conversation_generate(model, first, "c", "a", runtime=rt, max_new_tokens=6, do_sample=False,
                                     resident=ResidentConversations(), on_call=calls.append)
        second = torch.cat([first[:, :7], _tokens(2, 6)], dim=1)
        out2 = conversation_generate(model, second, "c", "b", runtime=rt, max_new_tokens=6, do_sample=False,
                                     resident=ResidentConversations(), on_call=calls.append)
        third = torch.cat([out2, _tokens(3, 4)], dim=1)
        out3 = conversation_generate(model, third, "c", "c", runtime=rt, max_new_tokens=6, do_sample=False,
                                     resident=ResidentConversations(), on_call=calls.append)
    assert torch.equal(out1, _plain(model, first, max_new_tokens=6, do_sample=False))
    assert torch.equal(out2, _plain(model, second, max_new_tokens=6, do_sample=False))
    assert torch.equal(out3, _plain(model, third, max_new_tokens=6, do_sample=False))
    assert [(c.reused, c.source) for c in calls] == [(0, "none"), (7, "log"), (out2.shape[1] - 1, "log")]


@IMPLEMENTATIONS
def test_seeded_sampling_turns_equal_plain_generate(tmp_path, model, implementation):
    out = torch.zeros(1, 0, dtype=torch.int64)
    kw = {"max_new_tokens": 7, "do_sample": True, "top_k": 0, "temperature": 1.0}
    with Runtime.open(home=tmp_path, backend="host") as rt:
        for turn in range(3):
            prompt = torch.cat([out, _tokens(10 + turn, 5)], dim=1)
            torch.manual_seed(turn)
            out = conversation_generate(model, prompt, "s", f"t{turn}", runtime=rt,
                                        cache_implementation=implementation, **kw)
            torch.manual_seed(turn)
            assert torch.equal(out, _plain(model, prompt, **kw)), turn


def test_calls_may_switch_cache_implementation_and_restore_from_the_log(tmp_path, model):
    """One log serves both caches (the same storage layout): a call with the other
    implementation than the resident copy's restores the conversation from the log and still
    equals plain generate; an unknown implementation is refused before anything changes."""
    calls: list[ConversationCall] = []
    out = torch.zeros(1, 0, dtype=torch.int64)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        pool = ResidentConversations()
        for turn, implementation in enumerate(["static", "static", "dynamic", "static"]):
            prompt = torch.cat([out, _tokens(30 + turn, 6)], dim=1)
            out = conversation_generate(model, prompt, "sw", f"t{turn}", runtime=rt, resident=pool,
                                        max_new_tokens=5, do_sample=False, cache_implementation=implementation,
                                        on_call=calls.append)
            assert torch.equal(out, _plain(model, prompt, max_new_tokens=5, do_sample=False)), turn
        epoch = rt.session("conversation:sw")
        before = epoch.epoch
        epoch.cancel()
        with pytest.raises(ConcordiaError, match="expected cache_implementation None, 'dynamic' or 'static', found "
                                                 "'offloaded'"):
            conversation_generate(model, torch.cat([out, _tokens(40, 3)], dim=1), "sw", "bad", runtime=rt,
                                  resident=pool, max_new_tokens=2, cache_implementation="offloaded")
        after = rt.session("conversation:sw")
        assert after.epoch == before
        after.cancel()
    assert [c.source for c in calls] == ["none", "resident", "log", "log"]


def test_a_static_calls_meta_fits_the_in_step_producers_commit_body():
    """The in-step producer formats each epoch's COMMIT body from a template of at most
    MAX_BODY bytes; a conversation remembering 32 finished calls with UUID IDs would pass it,
    so a static call forgets the oldest until its meta fits, and keeps them all when they do."""
    import uuid

    from concordia_agents import Session, StepCommits
    from gpu_runtime.cuda.step_commit import MAX_BODY
    from integrations.transformers._conversation import _fit_step_body

    def call(i: int) -> dict:
        return {"id": str(uuid.UUID(int=i)), "prompt": "a" * 24, "generation": "b" * 24, "start": 30000 + i,
                "max_new": 512, "reused": 29999 + i, "end": 30512 + i}

    def body(meta: dict) -> int:
        template, _ = StepCommits.template(Session._commit_body, meta, "n_tokens",
                                           {"kv": 1, "tokens": 1, "rng": 5056}, ("kv", "tokens"))
        return len(template) + 20 * 3  # the producer writes up to 20 digits at each of its 3 places

    meta = {"fingerprint": {"model": "m" * 24}, "n_tokens": 31000, "calls": [call(i) for i in range(32)],
            "call": {**call(99), "done": False}, "cuda_rng": {"at": 31000, "step": 12}}
    assert body(meta) > MAX_BODY  # the case: unfitted, the producer would refuse the call
    _fit_step_body(meta)
    assert body(meta) <= MAX_BODY and 10 <= len(meta["calls"]) < 32
    assert meta["calls"][-1]["id"] == str(uuid.UUID(int=31))  # the newest kept
    few = {**meta, "calls": [call(i) for i in range(3)]}
    _fit_step_body(few)
    assert len(few["calls"]) == 3


def test_a_static_call_whose_own_meta_cannot_fit_is_refused_before_it_commits(tmp_path, model):
    """A static call whose own entry (an ID of 4000 characters) would not fit the producer's COMMIT body
    raises MetaError naming both sizes, before its crop epoch: the log is as it was, and the next call
    (short ID) reuses the conversation and equals plain generate."""
    from concordia_agents import MetaError

    calls: list[ConversationCall] = []
    with Runtime.open(home=tmp_path, backend="host") as rt:
        out = conversation_generate(model, _tokens(60, 6), "big", "t0", runtime=rt, max_new_tokens=4,
                                    do_sample=False, cache_implementation="static")
        before = rt.session("conversation:big")
        epoch, meta = before.epoch, before.meta
        before.cancel()
        prompt = torch.cat([out, _tokens(61, 5)], dim=1)
        with pytest.raises(MetaError, match=r"call ID of 4000 characters.*expected at most 3072 bytes of JSON "
                                            r"with no finished calls remembered, found \d{4}"):
            conversation_generate(model, prompt, "big", "x" * 4000, runtime=rt, max_new_tokens=4,
                                  do_sample=False, cache_implementation="static")
        after = rt.session("conversation:big")
        assert (after.epoch, after.meta) == (epoch, meta)
        after.cancel()
        got = conversation_generate(model, prompt, "big", "t1", runtime=rt, max_new_tokens=4, do_sample=False,
                                    cache_implementation="static", on_call=calls.append)
        assert torch.equal(got, _plain(model, prompt, max_new_tokens=4, do_sample=False))
        # the refused call took the resident copy out of the pool and did not put it back
        assert (calls[-1].reused, calls[-1].source) == (out.shape[1] - 1, "log")


def _alternate(model, rt: Runtime, pool: ResidentConversations,  # type: ignore[no-untyped-def]
               calls: list[ConversationCall]) -> dict[str, torch.Tensor]:
    """Two conversations, three turns each, alternating; every call equal to plain
    generate. From the second call on, ``pool`` holds one conversation's KV."""
    outs = {"x": torch.zeros(1, 0, dtype=torch.int64), "y": torch.zeros(1, 0, dtype=torch.int64)}
    for turn in range(3):
        for conv in ("x", "y"):
            prompt = torch.cat([outs[conv], _tokens(turn + ord(conv), 6)], dim=1)
            outs[conv] = conversation_generate(model, prompt, conv, f"t{turn}", runtime=rt, resident=pool,
                                               max_new_tokens=5, do_sample=False, max_cache_len=128,
                                               on_call=calls.append)
            assert torch.equal(outs[conv], _plain(model, prompt, max_new_tokens=5, do_sample=False))
            if pool.budget_bytes is None:
                pool.budget_bytes = pool.nbytes  # one conversation's worth, from now on
    return outs


def test_least_recently_used_conversations_are_evicted_and_restored_from_the_log(tmp_path, model):
    """A budget of one conversation's KV with two conversations alternating: each call finds the
    other's KV evicted, restores its own from the log, and still equals plain generate."""
    calls: list[ConversationCall] = []
    with Runtime.open(home=tmp_path, backend="host") as rt:
        pool = ResidentConversations()
        _alternate(model, rt, pool, calls)
    assert pool.evictions >= 4
    assert [c.source for c in calls[2:]] == ["log"] * 4


def test_evicted_conversations_are_parked_in_host_memory_and_copied_back(tmp_path, model):
    """With a host budget, the conversation evicted from device memory is parked in
    host memory; its next call copies it back ("host") instead of reading the log,
    still equal to plain generate. A host budget too small for one parks nothing."""
    calls: list[ConversationCall] = []
    with Runtime.open(home=tmp_path, backend="host") as rt:
        pool = ResidentConversations(host_budget_bytes=1 << 30)
        outs = _alternate(model, rt, pool, calls)
        assert pool.parked >= 4 and pool.host_nbytes == pool.nbytes  # the other conversation, parked
        assert [c.source for c in calls[2:]] == ["host"] * 4
        # the new user message, and the last reply token (whose KV no forward computed)
        assert [c.prefilled for c in calls[2:]] == [7] * 4
        small = ResidentConversations(budget_bytes=pool.nbytes, host_budget_bytes=pool.nbytes - 1)
        for conv in ("x", "y", "x"):
            prompt = torch.cat([outs[conv], _tokens(ord(conv), 3)], dim=1)
            outs[conv] = conversation_generate(model, prompt, conv, f"s-{len(calls)}", runtime=rt, resident=small,
                                               max_new_tokens=3, do_sample=False, on_call=calls.append)
        assert small.parked == 0 and small.host_nbytes == 0 and calls[-1].source == "log"


def test_a_retried_call_returns_its_result_and_a_changed_prompt_is_refused(tmp_path, model):
    calls: list[ConversationCall] = []
    prompt = _tokens(4, 10)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        out = conversation_generate(model, prompt, "r", "once", runtime=rt, max_new_tokens=5, do_sample=False)
        again = conversation_generate(model, prompt, "r", "once", runtime=rt, max_new_tokens=5, do_sample=False,
                                      on_call=calls.append)
        assert torch.equal(out, again) and calls[-1].retried == "finished" and calls[-1].prefilled == 0
        with pytest.raises(ResumeMismatchError, match="call 'once' was made with another prompt"):
            conversation_generate(model, _tokens(5, 10), "r", "once", runtime=rt, max_new_tokens=5,
                                  do_sample=False)
        with pytest.raises(ConcordiaError, match=r"expected input_ids of shape \[1, prompt_len\]"):
            conversation_generate(model, torch.cat([prompt, prompt]), "r", "two", runtime=rt, max_new_tokens=5)
        with pytest.raises(ConcordiaError, match="attention_mask is not supported"):
            conversation_generate(model, prompt, "r", "mask", runtime=rt, attention_mask=torch.ones_like(prompt))


def _child(home: Path, *flags: str) -> list[dict] | None:
    r = subprocess.run([sys.executable, "-m", "tests._conv_child", "--home", str(home), *flags], cwd=ROOT,
                       env={**os.environ, "CONCORDIA_LEASE_TTL": "0.5"}, capture_output=True, text=True,
                       timeout=300, check=False)
    if r.returncode == -9:
        time.sleep(0.6)  # the dead owner's lease expires
        return None
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("sample", "static", "kill_at"),
                         [(False, False, 4), (True, False, 4), (False, True, 4), (True, True, 4), (True, False, 1),
                          (True, True, 1)],
                         ids=["greedy", "sampled", "greedy-static", "sampled-static", "sampled-first-token",
                              "sampled-static-first-token"])
def test_sigkill_mid_turn_then_rerun_equals_plain_generate(tmp_path, sample, static, kill_at):
    """A 3-turn conversation SIGKILLed at token 4 of turn 2; rerun with the same call IDs, turn 1
    returns its stored result, turn 2 continues (no re-prefill), turn 3 reuses the conversation:
    every turn equals plain generate on its full prompt. Also with the static cache, whose
    epochs the step commits make. Killed at turn 2's first token (before any epoch holds a new
    token: the log ends at its crop, or with the static cache at its prefill's step), the rerun
    prefills turn 2's suffix again from the crop (6 tokens) and samples from the generator
    states the call started with, not the last call's."""
    flags = (("--sample",) if sample else ()) + (("--static",) if static else ())
    ref = _child(tmp_path / "plain", "--plain", *(f for f in flags if f != "--static"))
    assert _child(tmp_path / "conv", "--kill-turn", "2", "--kill-at", str(kill_at), *flags) is None
    got = _child(tmp_path / "conv", *flags)
    assert ref is not None and got is not None
    assert [t["tokens"] for t in got] == [t["tokens"] for t in ref]
    calls = [t["call"] for t in got]
    assert [c["retried"] for c in calls] == ["finished", "continued", "no"]
    assert calls[1]["prefilled"] == (1 if kill_at > 1 else 6)
    assert calls[2]["source"] == "resident" and calls[2]["prefilled"] == 6


def test_a_conversation_full_for_a_call_says_so_and_keeps_its_log(tmp_path, model):
    """The cache's length is fixed at the first call (here 40): a call whose prompt and new tokens
    would pass it raises ConcordiaError naming both, and the conversation is left as it was."""
    first = _tokens(6, 20)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        out = conversation_generate(model, first, "full", "a", runtime=rt, max_cache_len=40, max_new_tokens=5,
                                    do_sample=False)
        s = rt.session("conversation:full")
        epoch = s.epoch
        s.cancel()
        longer = torch.cat([out, _tokens(7, 14)], dim=1)
        with pytest.raises(ConcordiaError, match=r"expected the prompt \(39\) and max_new_tokens \(5\) to fit its "
                                                 r"cache of 40 positions, found 44"):
            conversation_generate(model, longer, "full", "b", runtime=rt, max_new_tokens=5, do_sample=False)
        s = rt.session("conversation:full")
        assert s.epoch == epoch and s.meta["call"]["id"] == "a"
        s.cancel()
