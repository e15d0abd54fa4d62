"""One rank of a tensor-parallel ``durable_generate`` job (``python -m
torch.distributed.run --nproc_per_node 2 -m tests._tp_child ...``, gloo on CPU).

Prints one JSON line per rank: its tokens and the length of its first forward's
input. ``--kill-rank R --kill-at N``: rank R SIGKILLs itself once it has
committed N generated tokens; ``--kill-token N``: once it has sampled the Nth,
before committing it (torchrun then ends the other rank: the job dies).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch


def _say(data: dict) -> None:
    """One line, one write: the ranks share the job's stdout."""
    os.write(1, (json.dumps(data) + "\n").encode())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--home", required=True)
    ap.add_argument("--session", required=True)
    ap.add_argument("--sample", action="store_true")
    ap.add_argument("--scores", action="store_true", help="return_dict_in_generate with output_scores (stored)")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--kill-token", type=int, default=0,
                    help="rank --kill-rank SIGKILLs itself once it has sampled N tokens, before committing the Nth")
    ap.add_argument("--every", default="", help="R:K: rank R commits every K tokens (the others every token)")
    ap.add_argument("--no-tp", action="store_true", help="load the model on one device (a refused resume)")
    ap.add_argument("--conversation", action="store_true", help="call conversation_generate (refused under TP)")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    rank = int(os.environ.get("RANK", "0"))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                                 **({} if a.no_tp else {"tp_plan": "auto"}))
    first: list[int] = []

    def record(_module, args, kwargs):  # type: ignore[no-untyped-def]
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]
        if not first:
            first.append(int(ids.shape[1]))


    model.register_forward_pre_hook(record, with_kwargs=True)

    def on_event(e):  # type: ignore[no-untyped-def]
        if rank == a.kill_rank and a.kill_at and e.phase == "token_committed" and e.n_generated >= a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])

    class KillAt(StoppingCriteria):
        """Runs before durable_generate's own criterion: the Nth token dies uncommitted."""

        def __call__(self, input_ids, scores, **kw):  # type: ignore[no-untyped-def]
            if rank == a.kill_rank and a.kill_token and input_ids.shape[1] - ids.shape[1] >= a.kill_token:
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    try:
        rt = Runtime.open(home=a.home, backend="host", lease_ttl=2.0)
    except Exception as e:
        _say({"rank": rank, "error": f"Runtime.open: {type(e).__name__}: {e}"})
        raise
    every = 1
    if a.every:
        r, k = (int(x) for x in a.every.split(":"))
        every = k if r == rank else 1
    kwargs = {"max_new_tokens": 24, "do_sample": a.sample, "checkpoint_every": every,
              "stopping_criteria": StoppingCriteriaList([KillAt()])}
    if a.scores:
        kwargs.update(return_dict_in_generate=True, output_scores=True)
    if a.sample:
        kwargs.update(top_k=40, temperature=1.3)
        torch.manual_seed(1234)
    try:
        if a.conversation:
            from integrations.transformers import conversation_generate

            out = conversation_generate(model, ids, a.session, "call-1", runtime=rt, max_new_tokens=4)
        else:
            out = durable_generate(model, ids, session_id=a.session, runtime=rt, on_event=on_event, **kwargs)
        seqs = out.sequences if hasattr(out, "sequences") else out
        extra = {"scores": [round(float(x.max()), 4) for x in out.scores]} if a.scores else {}
        _say({"rank": rank, "tokens": seqs[0].tolist(), "first_forward": first[0] if first else None, **extra})
    except Exception as e:  # noqa: BLE001 - reported to the test
        _say({"rank": rank, "error": f"{type(e).__name__}: {e}"})
    finally:
        rt.close()


if __name__ == "__main__":
    main()
