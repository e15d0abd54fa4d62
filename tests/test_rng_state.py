"""The CUDA generator arithmetic of sampled durable decoding (integrations/transformers/_rng.py):
a state's Philox offset advanced per token, the seed kept. Pure byte arithmetic, runs on the CPU;
the GPU test of the sampled compiled path is in tests/test_step_commit_gpu.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from integrations.transformers._rng import advanced, cuda_rng_meta


def _state(seed: int, offset: int) -> torch.Tensor:
    raw = seed.to_bytes(8, "little") + offset.to_bytes(8, "little", signed=True)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


@given(seed=st.integers(0, 2**64 - 1), offset=st.integers(0, 2**40).map(lambda x: 4 * x),
       tokens=st.integers(0, 10**6), step=st.sampled_from([4, 8, 12, 16, 36]))
def test_advanced_moves_the_offset_only(seed, offset, tokens, step):
    out = advanced(_state(seed, offset), tokens * step)
    assert out.dtype == torch.uint8 and out.shape == (16,)
    assert out.numpy().tobytes() == _state(seed, offset + tokens * step).numpy().tobytes()


def test_advanced_refuses_a_state_of_another_size():
    with pytest.raises(ValueError, match="expected 16 bytes"):
        advanced(torch.zeros(8, dtype=torch.uint8), 4)


def test_meta_entry():
    assert cuda_rng_meta(300, 8) == {"at": 300, "step": 8}
