"""``durable_generate`` under transformers' tensor parallelism (``tp_plan="auto"``,
one process per rank, e.g. ``torchrun``).

Each rank holds a shard of every layer's KV heads. Protocol:

1. **One session per rank** of one logical session: rank ``r`` of ``w`` logs
   its shard under ``rank_session_id(session_id, r, w)`` =
   ``"<session_id>#tp:<r>/<w>"``, committing its own epochs token by token
   with no collective of its own (the decode step's all-reduces are the only
   synchronisation, as without Concordia).
2. **The job's durable point is the newest token every rank has**: at the
   start of a call the ranks agree over the process group (``agree``: one
   all-reduce of the token counts, and of the finished flags) on ``n`` = the
   smallest count of committed tokens any rank's log holds. A rank whose log
   holds more tokens crops its cache and tokens to ``n``: KV rows are
   position-indexed, so the state at ``n`` is the newer one cut short, and
   the tokens after it are generated again, the same (deterministic mode).
   A run counts as finished only when every rank's log says so.
3. **Sampling** resumes from the random generator state of a rank that holds
   exactly ``n`` tokens, broadcast to all (the other ranks' states belong to
   later tokens), so every rank draws the same tokens as before.
4. A job restarted with another number of ranks, or without tensor
   parallelism, is refused (``ResumeMismatchError``): the shards do not fit.

What is not agreed per token: a crash leaves the ranks' logs at different
tokens (at most a few apart); step 2 makes that invisible. No consensus
beyond the all-reduce at the start: the process group is the membership (a
job with a dead rank is dead, as with torchrun).
"""

from __future__ import annotations

from typing import Any

import torch

from ._errors import ResumeMismatchError

__all__ = ["TensorParallel", "agree", "check_layout", "rank_session_id", "tensor_parallel"]

TP_SEP = "#tp:"


class TensorParallel:
    """This process's place in a tensor-parallel model: ``rank`` of ``world``."""

    def __init__(self, rank: int, world: int, group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world={self.world})"


def tensor_parallel(model: Any) -> TensorParallel | None:
    """The model's tensor-parallel layout (transformers' ``tp_size`` > 1, its
    weights DTensors on a device mesh), or None for a model on one device."""
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 0
    if size <= 1:
        return None
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)
    if mesh is None or not dist.is_initialized():
        return None
    names = mesh.mesh_dim_names or ()
    group = mesh.get_group("tp") if "tp" in names else mesh.get_group()
    return TensorParallel(dist.get_rank(group), dist.get_world_size(group), group)


def rank_session_id(session_id: str, tp: TensorParallel) -> str:
    return f"{session_id}{TP_SEP}{tp.rank}/{tp.world}"


def agree(tp: TensorParallel, n_tokens: int, done: bool, states: list[torch.Tensor | None]
          ) -> tuple[int, bool, list[torch.Tensor | None]]:
    """Step 2 and 3 of the module docs: ``(n, all done, generator states at n)``;
    ``states`` are this rank's generator-state regions (CPU, CUDA; None where
    absent), replaced by those of a rank that holds exactly ``n`` tokens."""
    import torch.distributed as dist

    # NCCL (transformers' backend on GPUs) moves CUDA tensors only; gloo, CPU ones.
    nccl = dist.get_backend(tp.group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    # One all-reduce: MIN of (n, rank) pairs packed so that the smallest n wins and,
    # among equals, the lowest rank; and MIN of the done flags.
    packed = torch.tensor([n_tokens * tp.world + tp.rank, int(done)], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MIN, group=tp.group)
    n, src_rank = divmod(int(packed[0]), tp.world)
    src = dist.get_global_rank(tp.group, src_rank) if tp.group is not None else src_rank
    out: list[torch.Tensor | None] = []
    for state in states:
        if state is None:
            out.append(None)
            continue
        buf = state.detach().to(device).clone()
        dist.broadcast(buf, src=src, group=tp.group)
        out.append(buf.to(state.device))
    return n, bool(packed[1]), out


def check_layout(rt: Any, session_id: str, tp: TensorParallel | None) -> None:
    """Step 4: refuse a session recorded with another tensor-parallel layout."""
    worlds = sorted({i.id[len(session_id) + len(TP_SEP):].partition("/")[2]
                     for i in rt.catalog.list(prefix=session_id + TP_SEP)})
    if tp is None and worlds:
        raise ResumeMismatchError(f"session {session_id!r} was recorded with tensor parallelism over {worlds[0]} "
                                  "ranks; expected a model sharded the same way (tp_plan, torchrun), found one on a "
                                  "single device")
    if tp is not None and any(w != str(tp.world) for w in worlds):
        raise ResumeMismatchError(f"session {session_id!r} was recorded with tensor parallelism over "
                                  f"{', '.join(worlds)} ranks; this job has {tp.world}: each rank's KV shard would "
                                  "not fit")
    if tp is not None and not worlds:
        try:
            recorded = rt.catalog.get(session_id)
        except Exception:  # noqa: BLE001 - not recorded without TP either: a new run
            return
        if recorded.last_epoch:
            raise ResumeMismatchError(f"session {session_id!r} was recorded on a single device; this job shards the "
                                      f"model over {tp.world} ranks")
