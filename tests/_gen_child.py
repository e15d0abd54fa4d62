"""Child process for the transformers crash tests: one durable_generate call.

Prints one JSON line: the returned sequences and the input lengths of every
forward call the model made (to prove that a resume does not re-prefill).
``--extra`` adds generate arguments (JSON); ``--save`` writes what was returned
(its type, every output field, the cache's K/V) with ``torch.save``.

A crash test picks where the child dies by SIGKILL: ``--kill-after-tokens N``
(right after the first commit holding N or more new tokens),
``--kill-before-first-epoch`` (the session open, nothing committed) or
``--kill-after-done`` (the final epoch durable, the session not closed). The
child passes ``durable_generate`` an ``on_event`` callback (``kill_switch``)
that kills it there."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from integrations.testing import llama_1b as build_1b
from integrations.testing import tiny_llama

if TYPE_CHECKING:
    from integrations.transformers import GenerateEvent

__all__ = ["build", "build_1b", "describe_output", "gen_kwargs", "kill_switch", "prompt"]


def build(name: str):  # type: ignore[no-untyped-def]
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 1,
              "eos_token_id": None, "pad_token_id": 0}
    torch.manual_seed(0)
    if name == "llama":
        return tiny_llama()
    if name == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=8)).eval()
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    raise ValueError(name)


def prompt(batch: int, left_pad: bool, length: int = 12, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if left_pad:
        for row, pad in enumerate([0, 3, 5][:batch]):
            ids[row, :pad] = 0
            mask[row, :pad] = 0
    return ids, mask


def gen_kwargs(sample: bool, new_tokens: int = 30) -> dict:
    if sample:
        return {"max_new_tokens": new_tokens, "do_sample": True, "top_k": 0, "temperature": 1.0}
    return {"max_new_tokens": new_tokens, "do_sample": False}


def describe_output(out: Any) -> dict[str, Any]:
    """What durable_generate returned, as plain tensors (comparable across processes)."""
    if isinstance(out, torch.Tensor):
        return {"type": "Tensor", "sequences": out}
    cache = out["cache" if "cache" in out else "past_key_values"]  # the field's name: 5.24+ / 5.17
    d: dict[str, Any] = {"type": type(out).__name__, "keys": sorted(out.keys()), "sequences": out.sequences,
                         "scores": out.scores, "logits": out.logits, "attentions": out.attentions,
                         "hidden_states": out.hidden_states, "cache_type": type(cache).__name__}
    if cache is not None:
        n = cache.get_seq_length()
        d["cache_len"] = n
        d["kv"] = cache.storage[:, :, :, :n].clone() if hasattr(cache, "storage") else None
    return d


def kill_switch(*, after_tokens: int = 0, before_first_epoch: bool = False, after_done: bool = False
                ) -> Callable[[GenerateEvent], None] | None:
    """A ``durable_generate`` ``on_event`` that SIGKILLs this process at the
    chosen point (a real crash: no cleanup, no flush), or None if none is chosen."""
    if not (after_tokens or before_first_epoch or after_done):
        return None

    def on_event(e: GenerateEvent) -> None:
        if ((e.phase == "token_committed" and after_tokens and e.n_generated >= after_tokens)
                or (e.phase == "opened" and before_first_epoch) or (e.phase == "done" and after_done)):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_event


def main() -> None:
    # A child that hangs (a device wait that never ends) prints every thread's stack and exits before
    # run_child's 300 s timeout, so the test's failure shows where it stopped.
    faulthandler.dump_traceback_later(float(os.environ.get("CONCORDIA_TEST_CHILD_STACKS_S", "240")), exit=True)
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--home", required=True)
    p.add_argument("--session", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--left-pad", action="store_true")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--backend", default="host")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--extra", default="{}", help="more generate arguments, JSON")
    p.add_argument("--save", help="torch.save describe_output(result) here")
    p.add_argument("--kill-after-tokens", type=int, default=0, help="SIGKILL after the commit reaching N new tokens")
    p.add_argument("--kill-before-first-epoch", action="store_true", help="SIGKILL once the session is open")
    p.add_argument("--kill-after-done", action="store_true", help="SIGKILL once the final epoch is durable")
    p.add_argument("--kill-at-token", type=int, default=0,
                   help="SIGKILL at a token boundary once N new tokens exist (a stopping criterion: compiled "
                        "steps commit with no host callback)")
    p.add_argument("--every", type=int, default=1, help="checkpoint_every")
    p.add_argument("--plain-static", action="store_true",
                   help="plain model.generate(cache_implementation='static'), no Concordia: the reference")
    p.add_argument("--report", action="store_true", help="add the backend's commit paths and the call's facts")
    p.add_argument("--twice", action="store_true",
                   help="then a second call in this process (a new session): its tokens as 'tokens2'")
    args = p.parse_args()
    if args.device != "cpu":
        torch.use_deterministic_algorithms(True)  # token identity on a GPU (notes: transformers item 7)
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    model = build_1b(args.device) if args.model == "llama-1b" else build(args.model).to(args.device)
    calls: list[int] = []
    extra = json.loads(args.extra)

    def count(m: Any, a: Any, kw: Any) -> None:
        calls.append(int((kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]))
        if extra.get("cache_implementation") == "static" and args.device != "cpu":
            hook.remove()  # the first (eager) forward only: a hook would be traced into the compiled step

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    ids, mask = prompt(args.batch, args.left_pad, args.prompt_len, model.config.vocab_size)
    ids, mask = ids.to(args.device), mask.to(args.device)
    torch.manual_seed(1234)
    if args.plain_static:
        out = model.generate(ids, attention_mask=mask, **gen_kwargs(args.sample, args.new_tokens), **extra)
        print(json.dumps({"tokens": out.tolist(), "forward_inputs": calls}), flush=True)
        return
    rt = Runtime.open(home=args.home, backend=args.backend)
    kill = kill_switch(after_tokens=args.kill_after_tokens, before_first_epoch=args.kill_before_first_epoch,
                       after_done=args.kill_after_done)
    events: list[GenerateEvent] = []

    def on_event(e: GenerateEvent) -> None:
        events.append(e)
        if kill is not None:
            kill(e)

    if args.kill_at_token:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class KillAt(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                if input_ids.shape[1] - ids.shape[1] >= args.kill_at_token:
                    os.kill(os.getpid(), signal.SIGKILL)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        extra["stopping_criteria"] = StoppingCriteriaList([KillAt()])
    if args.every != 1:
        extra["checkpoint_every"] = args.every
    out = durable_generate(model, ids, args.session, runtime=rt, attention_mask=mask, on_event=on_event,
                           **gen_kwargs(args.sample, args.new_tokens), **extra)
    if args.save:
        torch.save(describe_output(out), args.save)
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    result: dict[str, Any] = {"tokens": seqs.tolist(), "forward_inputs": calls}
    if args.twice:  # the compiled graph of the first call may be replayed by the second (same cache addresses)
        extra.pop("stopping_criteria", None)
        again = durable_generate(model, ids, args.session + "-2", runtime=rt, attention_mask=mask,
                                 **gen_kwargs(args.sample, args.new_tokens), **extra)
        result["tokens2"] = (again if isinstance(again, torch.Tensor) else again.sequences).tolist()
    if args.report:
        done = [e for e in events if e.phase == "done"]
        result["report"] = {
            "commit_paths": rt.backend.describe().get("commit_paths"),
            "device_commits": done[-1].in_step_epochs if done else None,
            "compiled": bool(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        }
    print(json.dumps(result), flush=True)
    rt.close()


if __name__ == "__main__":
    main()
