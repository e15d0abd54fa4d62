"""Random-weight Llama models built from configs (no download), for demos, examples and tests.

Seeded: every process that builds one gets the same weights, which is what a
crash-and-resume comparison across processes needs.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["llama_1b", "tiny_llama"]


def _build(config: Any, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def tiny_llama(device: str = "cpu", *, max_positions: int = 512) -> Any:
    """A 2-layer, 64-wide fp32 Llama with a 256-token vocabulary."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return _build(cfg, device, torch.float32)


def llama_1b(device: str) -> Any:
    """A Llama-3.2-1B-shaped model in bf16."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                      bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=True)
    return _build(cfg, device, torch.bfloat16)
