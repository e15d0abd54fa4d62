"""transformers on the GPU (issue 4): decode overhead of durable_generate
(checkpoint_every=1, CuPy backend) against plain ``model.generate`` and against
the naive baseline that copies the whole KV cache to the CPU after every token.
Random bf16 weights in Llama-3.2-1B and Llama-3-8B shapes (no download), 2k
prompt, batch 1 and 8. Per-step time = (time for N tokens - time for 1) / (N - 1),
so prefill and the first commit of the prompt's KV cancel out. Medians.

Recovery time against prefill (the issue's second figure) is not measured yet.

    python bench/bench_transformers_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import versions, write  # noqa: E402

SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def build(shape: str):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=40000, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


def sync() -> None:
    torch.cuda.synchronize()


def decode_ms_per_step(fn, prompt_len: int, new: int) -> float:  # type: ignore[no-untyped-def]
    """ms per decode step: (time for `new` tokens - time for 1 token) / (new - 1)."""
    sync()
    t = time.perf_counter()
    fn(1)
    sync()
    one = time.perf_counter() - t
    t = time.perf_counter()
    fn(new)
    sync()
    full = time.perf_counter() - t
    return (full - one) / (new - 1) * 1e3


def decode_section(rt, model, shape: str, batch: int, prompt_len: int, new: int, repeats: int) -> dict:  # type: ignore[no-untyped-def]
    from integrations.transformers import durable_generate

    ids = torch.randint(3, 1000, (batch, prompt_len), device="cuda")
    mask = torch.ones_like(ids)
    counter = [0]

    def plain(n: int) -> None:
        model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)

    def durable(n: int) -> None:
        counter[0] += 1
        durable_generate(model, ids, f"bench-{shape}-{batch}-{counter[0]}", runtime=rt, attention_mask=mask,
                         max_new_tokens=n, do_sample=False, checkpoint_every=1)

    class Naive:
        """Baseline: copy the whole KV cache to the CPU after every token."""

        def __call__(self, n: int) -> None:
            from transformers import StoppingCriteria, StoppingCriteriaList

            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()

            class Copy(StoppingCriteria):
                def __call__(self, input_ids, scores, **kw):  # type: ignore[no-untyped-def]
                    for layer in cache.layers:
                        layer.keys.to("cpu")
                        layer.values.to("cpu")
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

            model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, past_key_values=cache,
                           stopping_criteria=StoppingCriteriaList([Copy()]))

    out = {}
    for name, fn in (("plain", plain), ("durable", durable), ("naive_copy_all", Naive())):
        fn(2)  # warm-up
        runs = [decode_ms_per_step(fn, prompt_len, new) for _ in range(repeats)]
        out[f"{name}_ms_per_step"] = statistics.median(runs)
    out["durable_overhead"] = out["durable_ms_per_step"] / out["plain_ms_per_step"] - 1
    out["naive_over_plain"] = out["naive_copy_all_ms_per_step"] / out["plain_ms_per_step"]
    out["tokens_per_s_plain"] = batch * 1e3 / out["plain_ms_per_step"]
    out["tokens_per_s_durable"] = batch * 1e3 / out["durable_ms_per_step"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.use_deterministic_algorithms(False)
    from concordia_agents import Runtime

    home = Path(tempfile.mkdtemp())
    rt = Runtime.open(home=home, backend="cupy", fsync="none", ring_bytes=1 << 30, segment_bytes=1 << 30,
                      max_record_bytes=4 << 20, compact_bytes=0)
    result: dict = {"benchmark": "transformers_gpu", "device": torch.cuda.get_device_name(0),
                    "versions": versions("transformers", "cupy-cuda13x"), "prompt_len": 2048}
    try:
        for shape in ("llama-3.2-1b", "llama-3-8b"):
            model = build(shape)
            for batch in (1, 8):
                key = f"decode_{shape}_b{batch}"
                try:
                    result[key] = decode_section(rt, model, shape, batch, 2048, 16 if args.quick else 32,
                                                 1 if args.quick else 3)
                except Exception:  # noqa: BLE001 - record and go on
                    result[key] = {"error": traceback.format_exc()[-2000:]}
                print(key, json.dumps(result[key])[:400], flush=True)
            del model
            torch.cuda.empty_cache()
    finally:
        rt.close()
        shutil.rmtree(home, ignore_errors=True)
    path = write("transformers_gpu" + ("-quick" if args.quick else ""), result)
    if os.environ.get("OUT"):
        shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    print(json.dumps(result, indent=1)[-4000:])


if __name__ == "__main__":
    main()
