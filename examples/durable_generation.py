"""Durable generation: kill it, run it again, and it continues where it stopped.

    python examples/durable_generation.py --crash-after 40   # dies by SIGKILL after 40 tokens
    python examples/durable_generation.py                    # resumes: no re-prefill

Runs a tiny random Llama on the CPU by default (no download); on a machine with
a GPU it uses a Llama-3.2-1B-shaped bf16 model and the CuPy backend
(``--device cpu`` forces the CPU). Prints what was reused from the log and what
was computed in this run.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from concordia_agents import Runtime
from integrations.testing import llama_1b, tiny_llama
from integrations.transformers import GenerateEvent, durable_generate
from tests._gen_child import prompt


def crash_after(n: int) -> Callable[[GenerateEvent], None]:
    """An ``on_event`` callback that SIGKILLs this process (a real crash: no
    cleanup) right after the epoch holding the ``n``-th new token is committed."""

    def on_event(e: GenerateEvent) -> None:
        if e.phase == "token_committed" and e.n_generated >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_event


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--session", default="example-generation")
    p.add_argument("--crash-after", type=int, default=0, help="SIGKILL this process after N new tokens")
    p.add_argument("--new-tokens", type=int, default=120)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--home", default=None, help="Concordia home (default: $CONCORDIA_HOME or ~/.concordia)")
    args = p.parse_args()
    gpu = args.device != "cpu"
    if gpu:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    model = llama_1b(args.device) if gpu else tiny_llama()
    ids, mask = prompt(1, False, 300 if gpu else 24, model.config.vocab_size)
    ids, mask = ids.to(args.device), mask.to(args.device)
    forwards: list[int] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: forwards.append(int((kw.get("input_ids") if kw.get("input_ids") is not None
                                              else a[0]).shape[1])), with_kwargs=True)
    rt = Runtime.open(home=args.home, backend="cupy" if gpu else "host", lease_ttl=2.0)
    t = time.perf_counter()
    out = durable_generate(model, ids, args.session, runtime=rt, attention_mask=mask, max_new_tokens=args.new_tokens,
                           on_event=crash_after(args.crash_after) if args.crash_after else None)
    dt = time.perf_counter() - t
    computed = len(forwards)
    reused = args.new_tokens - computed
    print(f"session {args.session!r} on {args.device} ({rt.backend.name} backend)")
    print(f"  generated sequence: {out.shape[1]} tokens ({ids.shape[1]} prompt + {args.new_tokens} new)")
    print(f"  reused from the log: {max(reused, 0)} new tokens and their KV")
    print(f"  computed now: {computed} forward passes; first forward input length "
          f"{forwards[0] if forwards else '-'} (1 = no re-prefill)")
    print(f"  took {dt:.2f} s; last tokens: {out[0, -8:].tolist()}")
    rt.close()


if __name__ == "__main__":
    main()
