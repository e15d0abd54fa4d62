"""DurableCache and durable_generate's dict output on a real GPU (CuPy backend):
scores and logits regions committed asynchronously survive a SIGKILL, and beam
search reorders device storage in place. Skipped (with the reason) where no
CUDA GPU with CuPy is present."""

from __future__ import annotations

import pytest
import torch

from tests.test_transformers_outputs import DICT_ARGS, assert_same_output

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")]


def test_durable_generate_1b_dict_output_resumes_equal(tmp_path):
    """Llama-3.2-1B-shaped bf16 model on the CuPy backend, deterministic mode, scores and logits
    kept (128k vocabulary): SIGKILLed after 20 of 40 tokens, the rerun returns the uninterrupted
    type, sequences, all 40 steps' scores and logits (bit-equal) and the cache's K/V."""
    import json

    from tests.test_transformers import run_child

    flags = ("--backend", "cupy", "--device", "cuda", "--prompt-len", "300", "--new-tokens", "40",
             "--extra", json.dumps(DICT_ARGS))
    env = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}

    def run(home: str, name: str, *extra: str) -> dict | None:
        path = tmp_path / f"{name}.pt"
        if run_child(tmp_path / home, "llama-1b", *flags, *extra, "--save", str(path), env=env) is None:
            return None
        return torch.load(path, weights_only=False, map_location="cpu")

    ref = run("ref", "ref")
    assert ref is not None
    assert run("crash", "killed", "--kill-after-tokens", "20") is None
    assert_same_output(run("crash", "resumed"), ref, new_tokens=40)


def test_beam_search_on_gpu_equals_dynamic_cache_beams():
    """num_beams=4 on CUDA with a cache built for batch * beams: DynamicCache's beams, same storage address."""
    from integrations.testing import tiny_llama
    from integrations.transformers import DurableCache
    from tests._gen_child import prompt

    model = tiny_llama("cuda")
    ids, mask = (t.cuda() for t in prompt(2, True))
    args = {"attention_mask": mask, "num_beams": 4, "max_new_tokens": 16, "do_sample": False,
            "return_dict_in_generate": True, "output_scores": True}
    ref = model.generate(ids, **args)
    cache = DurableCache.for_model(model, batch_size=2 * 4, max_cache_len=64)
    ptr = cache.storage.data_ptr()
    out = model.generate(ids, past_key_values=cache, **args)
    assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.beam_indices, ref.beam_indices)
    assert cache.storage.data_ptr() == ptr
