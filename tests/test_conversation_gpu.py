"""Conversations on a real GPU (issue 18): the Llama-3.2-1B-shaped bf16 model on the CuPy
backend, deterministic mode. Turns reuse the conversation's KV from GPU memory, after eviction
from the log, and every call equals plain ``model.generate`` on its full prompt. Skipped (with
the reason) where no CUDA GPU with CuPy is present."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*past_key_values.*deprecated:FutureWarning")]


def test_turns_on_the_gpu_reuse_memory_then_the_log_and_equal_plain_generate(tmp_path, monkeypatch):
    import torch

    from concordia_agents import Runtime
    from integrations.testing import llama_1b
    from integrations.transformers import ConversationCall, ResidentConversations, conversation_generate

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        model = llama_1b("cuda")
        calls: list[ConversationCall] = []
        out = torch.zeros(1, 0, dtype=torch.int64, device="cuda")
        with Runtime.open(home=tmp_path, backend="cupy") as rt:
            pool = ResidentConversations()
            for turn in range(4):
                g = torch.Generator().manual_seed(turn)
                prompt = torch.cat([out, torch.randint(3, 30000, (1, 300), generator=g).cuda()], dim=1)
                if turn == 3:
                    pool = ResidentConversations()  # as in a new process: the KV comes from the log
                out = conversation_generate(model, prompt, "gpu-chat", f"t{turn}", runtime=rt, resident=pool,
                                            max_cache_len=2048, max_new_tokens=24, do_sample=False,
                                            on_call=calls.append)
                ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                     do_sample=False)
                assert torch.equal(out, ref), turn
        assert [c.source for c in calls] == ["none", "resident", "resident", "log"]
        assert [c.prefilled for c in calls] == [300, 301, 301, 301]
    finally:
        torch.use_deterministic_algorithms(False)
