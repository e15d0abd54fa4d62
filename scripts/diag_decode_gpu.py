"""Diagnostic (not a benchmark of record): where does durable decode time go on the GPU?
Prints ms/step for plain generate, DurableCache alone, and durable_generate under
executor settings; plus prefill+1 token time at 8k/32k for the 8B shape."""
from __future__ import annotations

import json, shutil, statistics, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_transformers_gpu import SHAPES  # noqa: E402


def build(shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=40000, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return m.eval()


def per_step(fn, new):
    torch.cuda.synchronize(); t = time.perf_counter(); fn(1); torch.cuda.synchronize(); one = time.perf_counter() - t
    t = time.perf_counter(); fn(new); torch.cuda.synchronize(); full = time.perf_counter() - t
    return (full - one) / (new - 1) * 1e3


def main():
    from concordia_agents import Runtime
    from integrations.transformers import DurableCache, durable_generate
    out = {}
    for shape, batch in (("llama-3-8b", 1), ("llama-3.2-1b", 8), ("llama-3-8b", 8)):
        model = build(shape) if shape not in out.get("_m", {}) else out["_m"][shape]
        out.setdefault("_m", {})[shape] = model
        ids = torch.randint(3, 1000, (batch, 2048), device="cuda"); mask = torch.ones_like(ids)
        res = {}
        def plain(n): model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        def cache_only(n):
            c = DurableCache.for_model(model, batch_size=batch, max_cache_len=2048 + n + 1)
            model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, past_key_values=c)
        variants = [("plain", plain), ("cache_only", cache_only)]
        rts = []
        for label, opts in (("dur_b8_idle10", dict(blocks=8, idle_ms=10.0)), ("dur_b8_idle0.2", dict(blocks=8, idle_ms=0.2)),
                            ("dur_b1_idle0.2", dict(blocks=1, idle_ms=0.2))):
            home = Path(tempfile.mkdtemp())
            rt = Runtime.open(home=home, backend="cupy", fsync="none", ring_bytes=1 << 30, segment_bytes=1 << 30,
                              max_record_bytes=4 << 20, compact_bytes=0, backend_options=opts)
            rts.append((rt, home)); k = [0]
            def dur(n, rt=rt, label=label, k=k):
                k[0] += 1
                durable_generate(model, ids, f"d-{label}-{shape}-{batch}-{k[0]}", runtime=rt, attention_mask=mask,
                                 max_new_tokens=n, do_sample=False, checkpoint_every=1)
            variants.append((label, dur))
        for label, fn in variants:
            fn(2)
            res[label] = statistics.median(per_step(fn, 24) for _ in range(3))
            print(shape, batch, label, round(res[label], 3), flush=True)
        for rt, home in rts:
            rt.close(); shutil.rmtree(home, ignore_errors=True)
        out[f"{shape}_b{batch}"] = res
    model = out["_m"]["llama-3-8b"]
    for n in (8192, 32768):
        ids = torch.randint(3, 1000, (1, n), device="cuda")
        ts = []
        for _ in range(3):
            torch.cuda.synchronize(); t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
            torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
        print("prefill+1 8b", n, [round(x, 3) for x in ts], flush=True)
    out.pop("_m")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
