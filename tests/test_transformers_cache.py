"""DurableCache with model.generate directly: beam search reorders the
preallocated storage in place (the beams equal DynamicCache's), and a cache
built for another batch size raises a ConcordiaError naming expected and found."""

from __future__ import annotations

import pytest
import torch

# 5.24+ warns that generate's `past_key_values` is now `cache`; 5.17 accepts only the old name.
pytestmark = pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")


def test_beam_search_equals_dynamic_cache_beams():
    """num_beams=3 on a batch of 2 with a cache built for 6 rows: the same sequences, sequence
    scores and beam indices as with DynamicCache, the storage never reallocated."""
    from integrations.transformers import DurableCache
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(2, True)
    args = {"attention_mask": mask, "num_beams": 3, "max_new_tokens": 12, "do_sample": False,
            "return_dict_in_generate": True, "output_scores": True}
    ref = model.generate(ids, **args)
    cache = DurableCache.for_model(model, batch_size=2 * 3, max_cache_len=64)
    ptr = cache.storage.data_ptr()
    out = model.generate(ids, past_key_values=cache, **args)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.sequences_scores, ref.sequences_scores)
    assert torch.equal(out.beam_indices, ref.beam_indices)
    assert cache.storage.data_ptr() == ptr


def test_reorder_cache_permutes_rows_in_place():
    """reorder_cache(beam_idx) makes row i the old row beam_idx[i] in every layer, at the same address."""
    from integrations.transformers import DurableCache

    cache = DurableCache(num_layers=2, batch_size=3, kv_heads=2, head_dim=4, max_cache_len=8, dtype=torch.float32,
                         device="cpu")
    for layer in range(2):
        cache.update(torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), layer)
    before = cache.storage.clone()
    ptr = cache.storage.data_ptr()
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    assert torch.equal(cache.storage[:, :, :, :5], before[:, idx, :, :5])
    assert torch.equal(cache.layers[1].keys, before[2][idx, :, :5])
    assert cache.storage.data_ptr() == ptr


def test_beam_search_with_a_cache_for_the_unexpanded_batch_raises():
    """num_beams=3 with a cache built for the 2 prompt rows (generate runs 6) raises a ConcordiaError
    at the first forward, naming expected and found, before any token is produced."""
    from concordia_agents import ConcordiaError
    from integrations.transformers import DurableCache
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(2, False)
    cache = DurableCache.for_model(model, batch_size=2, max_cache_len=64)
    with pytest.raises(ConcordiaError, match=r"expected .*batch=2.* found \[6, .*num_beams"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, num_beams=3, max_new_tokens=4)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize(("built", "run"), [(2, 3), (3, 2), (2, 1)])
def test_wrong_batch_size_raises_naming_expected_and_found(built, run):
    """A cache built for one batch size used with another raises a ConcordiaError (not a torch shape
    error, and no silent broadcast of a single row) that names both sizes."""
    from concordia_agents import ConcordiaError
    from integrations.transformers import DurableCache
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(run, False)
    cache = DurableCache.for_model(model, batch_size=built, max_cache_len=64)
    with pytest.raises(ConcordiaError, match=rf"expected .*batch={built}.* found \[{run}, "):
        model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False)


def test_durable_generate_refuses_beam_search_from_a_generation_config(tmp_path):
    """num_beams set through generation_config (not only the keyword) is refused with expected and found."""
    from transformers import GenerationConfig

    from concordia_agents import ConcordiaError, Runtime
    from integrations.transformers import durable_generate
    from tests._gen_child import build, prompt

    model = build("llama")
    ids, mask = prompt(1, False)
    with Runtime.open(home=tmp_path, backend="host") as rt, \
            pytest.raises(ConcordiaError, match="expected num_beams=1, found 2"):
        durable_generate(model, ids, "b", runtime=rt, attention_mask=mask,
                         generation_config=GenerationConfig(num_beams=2, max_new_tokens=4))
