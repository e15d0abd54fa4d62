"""The durable static cache (``DurableStaticCache``, ``durable_generate(..., cache_implementation="static")``)
on the CPU: the same tokens as transformers' own ``StaticCache``, fixed storage, and crash/resume with real
SIGKILLs equal to the uninterrupted run (eager here; a GPU compiles it)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from tests._gen_child import build, prompt
from tests.test_transformers import run_child

STATIC = ("--extra", json.dumps({"cache_implementation": "static"}))
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _no_step_hook_override(monkeypatch):
    """The tests here choose the step hook's placement themselves (``_steps._PLACEMENT``): a
    ``CONCORDIA_STEP_HOOK`` in the environment would override them."""
    monkeypatch.delenv("CONCORDIA_STEP_HOOK", raising=False)


def _plain_static(model_name: str, batch: int, new_tokens: int, **kw: object) -> torch.Tensor:
    """transformers' own StaticCache run of the child's model and prompt (the fastest path a user picks)."""
    from transformers import StaticCache

    model = build(model_name)
    ids, mask = prompt(batch, batch > 1)
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 1)
    return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new_tokens, **kw)


@pytest.mark.parametrize("split", [False, True])
def test_durable_static_cache_equals_static_cache_and_keeps_its_storage(monkeypatch, split):
    """model.generate with a DurableStaticCache returns StaticCache's tokens, writes into the one storage
    tensor it was built with (same address), is compileable, and holds prompt + new - 1 positions — also
    with each layer's K and V given a storage object of its own (``_cache._SPLIT_STORAGE``: distinct
    storage objects over the same memory)."""
    from transformers import StaticCache

    from integrations.transformers import DurableStaticCache, _cache

    monkeypatch.setattr(_cache, "_SPLIT_STORAGE", split)
    model = build("llama")
    ids, mask = prompt(2, True)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         past_key_values=StaticCache(config=model.config, max_cache_len=ids.shape[1] + 12))
    cache = DurableStaticCache.for_model(model, batch_size=2, max_cache_len=ids.shape[1] + 12)
    ptr = cache.storage.data_ptr()
    layer = cache.durable_layers[1]
    same_storage = layer.values.untyped_storage().data_ptr() == cache.storage.untyped_storage().data_ptr()
    assert same_storage is not split and layer.values.data_ptr() == cache.storage[3].data_ptr()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert torch.equal(out, ref)
    assert cache.is_compileable and cache.storage.data_ptr() == ptr
    assert cache.length == ids.shape[1] + 10 - 1
    assert cache.storage.abs().sum() > 0  # the K/V went into the storage, not into tensors of the layers' own


def test_the_step_sink_is_the_caches_one_zeroed_int64_on_its_device():
    """A cache's step sink is one tensor for its life (a conversation's calls on one kept cache give the
    compiled step the same input address), an int64 zero on the storage's device; another cache has its own."""
    from integrations.transformers import DurableStaticCache

    model = build("llama")
    a = DurableStaticCache.for_model(model, batch_size=1, max_cache_len=16)
    b = DurableStaticCache.for_model(model, batch_size=1, max_cache_len=16)
    sink = a.step_sink()
    assert a.step_sink() is sink and b.step_sink() is not sink
    assert sink.dtype == torch.int64 and sink.shape == (1,) and int(sink) == 0
    assert sink.device == a.storage.device


def test_a_static_cache_of_another_batch_size_is_refused_by_name():
    """A DurableStaticCache built for batch 1 used with a batch of 2 raises ConcordiaError naming both sizes."""
    from concordia_agents import ConcordiaError
    from integrations.transformers import DurableStaticCache

    model = build("llama")
    ids, mask = prompt(2, True)
    cache = DurableStaticCache.for_model(model, batch_size=1, max_cache_len=32)
    with pytest.raises(ConcordiaError, match=r"batch_size=1 and generate runs 2"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, past_key_values=cache)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_static_sigkill_mid_generation_then_rerun_equals_uninterrupted(tmp_path, model):
    """Killed by SIGKILL after a random token of a static-cache durable_generate, the same call finishes with
    the uninterrupted tokens (which are transformers' StaticCache tokens), its first forward one token."""
    ref = run_child(tmp_path / "ref", model, *STATIC)
    assert ref is not None
    assert ref["tokens"] == _plain_static(model, 1, 30, do_sample=False).tolist()
    k = random.Random(f"static-{model}").randint(1, 25)
    assert run_child(tmp_path / "crash", model, *STATIC, "--kill-after-tokens", str(k)) is None
    out = run_child(tmp_path / "crash", model, *STATIC)
    assert out is not None and out["tokens"] == ref["tokens"]
    assert out["forward_inputs"][0] == 1, out["forward_inputs"]  # no re-prefill
    assert len(out["forward_inputs"]) == 30 - k


def test_static_sampling_with_a_seed_and_a_padded_batch_resumes_identically(tmp_path):
    """Seeded sampling on a left-padded batch of 3 with the static cache: killed and resumed, the same
    tokens as uninterrupted (the RNG state and every row of the batch restored)."""
    flags = (*STATIC, "--sample", "--batch", "3", "--left-pad")
    ref = run_child(tmp_path / "ref", "llama", *flags)
    assert run_child(tmp_path / "crash", "llama", *flags, "--kill-after-tokens", "13") is None
    out = run_child(tmp_path / "crash", "llama", *flags)
    assert ref is not None and out is not None
    assert out["tokens"] == ref["tokens"] and out["forward_inputs"][0] == 1


def test_a_run_resumes_only_with_the_cache_it_started_with(tmp_path):
    """A session started with the static cache and resumed without it (or with an unknown implementation)
    is refused: ResumeMismatchError naming the generation arguments / ConcordiaError naming the choices;
    the session stays resumable with the right one."""
    from concordia_agents import ConcordiaError, Runtime
    from integrations.transformers import ResumeMismatchError, durable_generate

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        def stop_at_5(event: Any) -> None:
            if event.phase == "token_committed" and event.n_generated >= 5:
                raise RuntimeError("stop here")

        with pytest.raises(RuntimeError, match="stop here"):
            durable_generate(model, ids, "s", runtime=rt, attention_mask=mask, max_new_tokens=12,
                             cache_implementation="static", on_event=stop_at_5)
        with pytest.raises(ResumeMismatchError, match="generation"):
            durable_generate(model, ids, "s", runtime=rt, attention_mask=mask, max_new_tokens=12)
        with pytest.raises(ConcordiaError, match="expected cache_implementation None, 'dynamic' or 'static'"):
            durable_generate(model, ids, "s", runtime=rt, attention_mask=mask, max_new_tokens=12,
                             cache_implementation="offloaded")
        out = durable_generate(model, ids, "s", runtime=rt, attention_mask=mask, max_new_tokens=12,
                               cache_implementation="static")
    assert out.tolist() == _plain_static("llama", 1, 12, do_sample=False).tolist()


def test_beam_search_on_a_durable_static_cache_equals_dynamic_cache_beams():
    """num_beams=4 with a static durable cache built for batch * beams: DynamicCache's beams and scores, the
    beams reordered in place in the same storage."""
    from integrations.transformers import DurableStaticCache

    model = build("llama")
    ids, mask = prompt(2, True)
    args = {"attention_mask": mask, "num_beams": 4, "max_new_tokens": 12, "do_sample": False,
            "return_dict_in_generate": True, "output_scores": True}
    ref = model.generate(ids, **args)
    cache = DurableStaticCache.for_model(model, batch_size=8, max_cache_len=ids.shape[1] + 14)
    ptr = cache.storage.data_ptr()
    out = model.generate(ids, past_key_values=cache, **args)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.beam_indices, ref.beam_indices)
    assert cache.storage.data_ptr() == ptr


def test_step_hook_module(monkeypatch) -> None:
    """The step hook's module (``_steps._step_module``): the model; with
    ``_PLACEMENT`` or ``CONCORDIA_STEP_HOOK`` ``decoder`` or ``overlap`` the
    decoder stack (inlined into the forward's compiled graph), or the model
    itself when it names no decoder. The overlapped commit's join goes on the
    output embeddings, only with ``overlap`` and only where they are not part
    of the hooked module."""
    from integrations.transformers import _steps

    model = build("llama")
    monkeypatch.setattr(_steps, "_PLACEMENT", "model")
    assert _steps._step_module(model) is model
    assert _steps._join_module(model, model) is None

    class Broken(torch.nn.Module):
        def get_decoder(self) -> Any:
            raise AttributeError("no decoder")

    broken, plain = Broken(), torch.nn.Linear(2, 2)
    for placement in ("decoder", "overlap"):
        monkeypatch.setattr(_steps, "_PLACEMENT", placement)
        assert _steps._step_module(model) is model.get_decoder() is model.model
        assert _steps._step_module(plain) is plain
        assert _steps._step_module(broken) is broken
        assert _steps._join_module(broken, broken) is None
    monkeypatch.setattr(_steps, "_PLACEMENT", "decoder")
    assert _steps._join_module(model, model.model) is None
    monkeypatch.setattr(_steps, "_PLACEMENT", "overlap")
    assert _steps._join_module(model, model.model) is model.lm_head
    assert _steps._join_module(model, model) is None  # the step hook on the model itself: joined at once
    # CONCORDIA_STEP_HOOK chooses over the module's default, either way; a value it does not know is refused.
    monkeypatch.setenv("CONCORDIA_STEP_HOOK", "model")
    assert _steps._step_module(model) is model
    monkeypatch.setattr(_steps, "_PLACEMENT", "model")
    monkeypatch.setenv("CONCORDIA_STEP_HOOK", "overlap")
    assert _steps._step_module(model) is model.model and _steps.hook_placement() == "overlap"
    monkeypatch.setenv("CONCORDIA_STEP_HOOK", "layers")
    from concordia_agents import ConcordiaError

    expected = r"CONCORDIA_STEP_HOOK: expected one of \['model', 'decoder', 'overlap'\], found 'layers'"
    with pytest.raises(ConcordiaError, match=expected):
        _steps._step_module(model)


def test_a_compiled_step_runs_the_step_hook_exactly_while_it_is_attached(monkeypatch):
    """Dynamo does not guard on a submodule's hooks, so a decode step compiled before durable_generate's hook
    was put on the decoder stack would be replayed without it (no commits), and one compiled with it replayed
    after it was removed. The cache's ``stepping`` flag, read by every layer's update, keeps the two graphs
    apart. A compiled step (dynamo with the ``aot_eager`` backend on the CPU): two steps compiled with no
    hook, three with a counting hook on the decoder stack and the flag set, three after both are removed,
    then a second cache and a second hook object, then the overlapped arrangement (a second hook on the LM
    head, value 2) and the decoder's alone again: the hooks run in exactly their own steps."""
    from integrations.transformers import DurableStaticCache, _steps

    monkeypatch.setattr(_steps, "_PLACEMENT", "decoder")
    torch._dynamo.reset()
    model = build("llama")
    step = torch.compile(model.__call__, backend="aot_eager")
    ids, _ = prompt(1, False)
    n = ids.shape[1]

    class Counting:
        def __init__(self) -> None:
            self.count = torch.zeros((), dtype=torch.int64)

        def __call__(self, module: Any, args: Any, kwargs: Any, output: Any) -> None:
            self.count.add_(1)

    def steps(cache: Any, first: int, k: int) -> None:
        with torch.no_grad():
            for t in range(first, first + k):
                step(ids[:, :1], past_key_values=cache, cache_position=torch.tensor([t]), use_cache=True)

    def attached(cache: Any, hook: Counting, first: int, k: int, head: Counting | None = None) -> None:
        handles = [_steps._step_module(model).register_forward_hook(hook, with_kwargs=True)]
        if head is not None:  # the overlapped arrangement: a second hook, on the LM head
            handles.append(model.lm_head.register_forward_hook(head, with_kwargs=True))
        cache.set_stepping(1 if head is None else 2)
        try:
            steps(cache, first, k)
        finally:
            for handle in handles:
                handle.remove()
            cache.set_stepping(0)

    try:
        cache = DurableStaticCache.for_model(model, batch_size=1, max_cache_len=n + 16)
        with torch.no_grad():
            model(ids, past_key_values=cache, cache_position=torch.arange(n), use_cache=True)
        steps(cache, n, 2)  # compiled with no hook
        first = Counting()
        attached(cache, first, n + 2, 3)
        assert int(first.count) == 3, f"the hook ran in {int(first.count)} of 3 steps"
        steps(cache, n + 5, 3)
        assert int(first.count) == 3, f"a removed hook ran {int(first.count) - 3} more times"
        other, second = DurableStaticCache.for_model(model, batch_size=1, max_cache_len=n + 16), Counting()
        with torch.no_grad():
            model(ids, past_key_values=other, cache_position=torch.arange(n), use_cache=True)
        attached(other, second, n, 4)
        assert (int(first.count), int(second.count)) == (3, 4)
        # The overlapped arrangement (2) after the decoder's alone (1), then 1 again: the LM head's hook runs in
        # exactly its own steps, so neither arrangement's graph is replayed under the other.
        third, head = Counting(), Counting()
        attached(other, third, n + 4, 3, head=head)
        assert (int(third.count), int(head.count)) == (3, 3)
        attached(other, third, n + 7, 2)
        assert (int(third.count), int(head.count)) == (5, 3), "the LM head's hook ran without its arrangement"
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("placement", ["decoder", "overlap", "model"])
def test_durable_generate_sets_the_stepping_flag_only_while_it_runs(tmp_path, monkeypatch, placement):
    """durable_generate's static path with its step hook on the decoder stack sets the cache's ``stepping`` value
    (1, or 2 with the overlapped commit's join on the LM head) when it attaches its hooks and sets it back to 0
    when the call ends (the value is what the compiled step's guards hold, test above); with the hook on the
    model (its own compiled frame) it leaves the value alone. The overlap's join hook is on the LM head exactly
    while the call runs."""
    from concordia_agents import Runtime
    from integrations.transformers import DurableStaticCache, _steps, durable_generate

    monkeypatch.setattr(_steps, "_PLACEMENT", placement)

    seen: list[int] = []
    original = DurableStaticCache.set_stepping

    def recording(self: Any, arrangement: int) -> None:
        seen.append(arrangement)
        original(self, arrangement)

    monkeypatch.setattr(DurableStaticCache, "set_stepping", recording)
    model = build("llama")
    ids, mask = prompt(1, False)
    during: list[int] = []  # the value last set, at each committed token
    head_hooks: list[int] = []  # hooks on the LM head, at each committed token

    def on_event(e: Any) -> None:
        if e.phase == "token_committed":
            during.append(seen[-1] if seen else 0)
            head_hooks.append(len(model.lm_head._forward_hooks))

    with Runtime.open(home=tmp_path, backend="host") as rt:
        durable_generate(model, ids, "s", runtime=rt, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         cache_implementation="static", on_event=on_event)
    value = _steps._PLACEMENTS[placement]
    assert len(during) == 4 and head_hooks == [1 if placement == "overlap" else 0] * 4, (during, head_hooks)
    assert not model.lm_head._forward_hooks and not model.model._forward_hooks and not model._forward_hooks
    if value:
        assert seen == [value, 0] and during == [value] * 4, (seen, during)
    else:
        assert seen == [] and during == [0] * 4, (seen, during)


@pytest.mark.parametrize("placement", ["decoder", "overlap", "model"])
def test_step_hook_commits_every_step(tmp_path, monkeypatch, placement):
    """With the hook on the decoder stack (alone or with the overlap's join on the LM head) or on the model
    (the default), durable_generate's static path (eager
    on the CPU: host commits) returns transformers' static-cache tokens and commits an epoch per model step,
    the prompt's included."""
    from concordia_agents import Runtime
    from integrations.transformers import _steps, durable_generate

    model = build("llama")
    ids, mask = prompt(1, False)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    events: list[Any] = []
    monkeypatch.setattr(_steps, "_PLACEMENT", placement)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        out = durable_generate(model, ids, "s", runtime=rt, attention_mask=mask, max_new_tokens=8,
                               do_sample=False, cache_implementation="static", on_event=events.append)
    assert torch.equal(out, ref)
    committed = [e.n_generated for e in events if e.phase == "token_committed"]
    assert committed == list(range(0, 8)), committed  # the prefill's step (0 generated), then one per step
