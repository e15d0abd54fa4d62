"""transformers ``Cache``s whose K/V live in one preallocated tensor (fixed
addresses, registered as a kv region by ``durable_generate``): a dynamic-style
one (``DurableCache``, eager ``generate``) and a static one
(``DurableStaticCache``, which ``generate`` compiles on a GPU)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.utils import is_torchdynamo_compiling

from concordia_agents import ConcordiaError

__all__ = ["DurableCache", "DurableLayer", "DurableStaticCache", "DurableStaticLayer"]

#: give each static layer's K and V a storage object of its own (``_unaliased``);
#: on since the GPU tests passed with it and the profile showed the aliasing's
#: cost gone (``compiled_decode_gpu-20261206T194846Z-console.txt``); off is
#: kept for the benchmark's comparison and the CPU tests of both
_SPLIT_STORAGE = True


_ARRANGEMENTS = (0, 1, 2)  # DurableStaticLayer.update indexes it with its stepping value


def _unaliased(view: torch.Tensor) -> torch.Tensor:
    """``view`` as a tensor with a storage object of its own over the same memory.

    Why: a compiled decode step takes every layer's K and V as graph inputs.
    Views of one storage are inputs that alias each other, and the compiled
    step of a ``DurableStaticCache`` ran slower than transformers'
    ``StaticCache`` (separate tensors), aliasing being the one difference
    found: on the H100, 1B shape, batch 8, the kernel fusing RoPE and the
    grouped-query K/V expansion took 1.49 ms per step against 0.99 ms (profile
    of ``compiled_decode_gpu-20261206T171518Z.json``). With storage objects of
    their own the compiled step's kernels took what ``StaticCache``'s took
    (3458 against 3460 µs per step at batch 8, 1898 against 1900 at batch 1,
    ``compiled_decode_gpu-20261206T194846Z-console.txt``). A DLPack
    round trip makes a new storage object that holds the old one alive, so the
    memory is still the one region the session registered and restores into;
    only the aliasing is hidden from the compiler, which is sound here because
    no compiled graph reads one layer's K or V through another's tensor."""
    return torch.from_dlpack(view) if _SPLIT_STORAGE else view


class _FixedBatch:
    """What both durable layers refuse: the storage's batch size is fixed (its
    address is registered), so generate may not grow or shrink it."""

    _k: torch.Tensor

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise ConcordiaError(f"a durable cache has a fixed batch size: expected it to stay {self._k.shape[0]}, "
                             f"found a request to repeat it {repeats} times; build the cache with the expanded "
                             "batch size instead")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ConcordiaError(f"a durable cache has a fixed batch size: expected it to stay {self._k.shape[0]}, "
                             f"found a request to keep {len(indices)} rows")


class DurableLayer(_FixedBatch, DynamicLayer):
    """One layer's K/V as views into the shared preallocated storage: written in
    place, never reallocated (fixed addresses for the GPU executor)."""

    def __init__(self, storage: torch.Tensor, index: int, cache: DurableCache) -> None:
        super().__init__()
        self._k = storage[2 * index]
        self._v = storage[2 * index + 1]
        self._cache = cache
        self._i = index
        self.device = storage.device
        self.is_initialized = True
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = self._cache.lengths[self._index]
        n = key_states.shape[-2]
        if t0 + n > self._k.shape[-2]:
            raise ConcordiaError(f"durable cache full: expected at most {self._k.shape[-2]} positions, "
                                 f"found {t0 + n}; pass a larger max_cache_len")
        # copy_ broadcasts: without this check a batch of 1 would silently fill
        # every row of a cache built for more, and other mismatches would surface
        # as torch shape errors deep inside attention. Every layer shares the
        # storage's shape, so the first layer of each forward checks for all
        # (this runs per layer per token: ~0.2 us a check on the CI machine).
        if self._i == 0:
            b, h, _, d = key_states.shape
            if b != self._k.shape[0] or h != self._k.shape[1] or d != self._k.shape[3]:
                raise ConcordiaError(_shape_mismatch(self._k.shape, key_states.shape))
        self._k[:, :, t0:t0 + n].copy_(key_states)
        self._v[:, :, t0:t0 + n].copy_(value_states)
        self._cache.lengths[self._index] = t0 + n
        self.keys, self.values = self._k[:, :, :t0 + n], self._v[:, :, :t0 + n]
        return self.keys, self.values

    @property
    def _index(self) -> int:
        return self._i

    def get_seq_length(self) -> int:
        return self._cache.lengths[self._index]

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop() takes a negative count of tokens to remove")
        i = self._index
        self._cache.lengths[i] = max(0, self._cache.lengths[i] + tokens_to_remove)
        n = self._cache.lengths[i]
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def reset(self) -> None:
        self._cache.lengths[self._index] = 0
        self.keys, self.values = self._k[:, :, :0], self._v[:, :, :0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``, in place.

        The inherited method rebinds ``keys``/``values`` to new tensors, which
        ``update`` never reads (it writes and returns the storage): beam search
        then ran on the unreordered rows and returned wrong beams silently."""
        batch = self._k.shape[0]
        if beam_idx.shape != (batch,):
            raise ConcordiaError(f"durable cache reorder: expected {batch} beam indices (the cache's batch size), "
                                 f"found shape {list(beam_idx.shape)}")
        n = self.get_seq_length()
        if n > 0:
            idx = beam_idx.to(self._k.device)
            # index_select makes a new tensor, so no source row is overwritten
            # before it is read; copy_ then keeps the storage's address.
            self._k[:, :, :n].copy_(self._k[:, :, :n].index_select(0, idx))
            self._v[:, :, :n].copy_(self._v[:, :, :n].index_select(0, idx))
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]


def _shape_mismatch(expected: torch.Size, found: torch.Size) -> str:
    b, h, _, d = expected
    msg = (f"durable cache: expected key/value states of shape [batch={b}, kv_heads={h}, *, head_dim={d}] "
           f"(the shape it was built with), found {list(found)}")
    if found[0] != b:
        msg += (f"; it was built for batch_size={b} and generate runs {found[0]} sequences (generate expands the "
                "batch num_beams * num_return_sequences times: build the cache with that batch size)")
    return msg


def _geometry(model: Any) -> dict[str, Any]:
    """Layers, KV heads, head size, dtype and device of ``model``'s cache."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    world = getattr(model, "tp_size", None) or 1
    if world > 1:  # tensor parallel: this rank's shard of the KV heads (_tp.py)
        if kv_heads % world:
            raise ConcordiaError(f"durable cache: expected the {kv_heads} KV heads to split evenly over the "
                                 f"{world} tensor-parallel ranks, found a remainder of {kv_heads % world}")
        kv_heads //= world
    return {"num_layers": cfg.num_hidden_layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": model.dtype,
            "device": model.device}


class DurableCache(Cache):
    """A transformers ``Cache`` whose K/V live in one preallocated tensor
    ``storage[2 * layer + (0: K, 1: V)] = [batch, kv_heads, max_len, head_dim]``."""

    def __init__(self, *, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, max_cache_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.storage = torch.zeros(2 * num_layers, batch_size, kv_heads, max_cache_len, head_dim,
                                   dtype=dtype, device=device)
        self.lengths = [0] * num_layers
        self.durable_layers = [DurableLayer(self.storage, i, self) for i in range(num_layers)]
        super().__init__(layers=list[Any](self.durable_layers))

    @classmethod
    def for_model(cls, model: Any, *, batch_size: int, max_cache_len: int) -> DurableCache:
        return cls(**_geometry(model), batch_size=batch_size, max_cache_len=max_cache_len)

    @property
    def length(self) -> int:
        return self.lengths[0]

    def set_length(self, n: int) -> None:
        for i, layer in enumerate(self.durable_layers):
            self.lengths[i] = n
            layer.keys, layer.values = layer._k[:, :, :n], layer._v[:, :, :n]


class DurableStaticLayer(_FixedBatch, StaticLayer):
    """transformers' ``StaticLayer`` on a slice of the shared storage: the same
    update (``index_copy_`` at ``cumulative_length``, a device tensor, then
    ``add_``), compileable, but its keys/values are views of
    ``storage[2 * index + (0: K, 1: V)]`` bound at construction instead of
    tensors allocated at the first update, so the addresses are fixed before
    any forward and registered as one region. The position lives in
    ``cumulative_length`` in both supported transformers versions (5.17, 5.24+),
    so restoring a session sets it (``DurableStaticCache.set_length``).

    ``stepping`` is nonzero exactly while ``durable_generate``'s step hooks
    (``_steps.StepCheckpointer``) are attached to submodules (the decoder
    stack, and for the overlapped commit the output embeddings too) of the
    model this cache runs in, and says which arrangement (``_steps``: 1 the
    decoder hook, 2 the overlapped pair). ``update`` reads it, and only so
    that a compiled step's guards include it: dynamo does not guard on a
    submodule's hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``),
    so without this read a step compiled before the hook was put on the
    decoder stack would be replayed without it (no commits), one compiled
    with it replayed after it was removed, and one compiled with one
    arrangement replayed under the other. With it, each value gets a graph
    of its own."""

    #: which durable_generate step hooks are attached, 0 for none (class docs: read for dynamo's guards)
    stepping: int = 0

    def __init__(self, storage: torch.Tensor, index: int) -> None:
        super().__init__(max_cache_len=int(storage.shape[-2]))
        self._k, self._v, self._i = _unaliased(storage[2 * index]), _unaliased(storage[2 * index + 1]), index
        self.device = storage.device
        self.dtype = storage.dtype  # 5.17 reads it in update paths; 5.24+ ignores it
        self.batch_size, self.num_heads = int(storage.shape[1]), int(storage.shape[2])
        self.k_head_dim = self.v_head_dim = int(storage.shape[-1])
        self.keys, self.values = self._k, self._v
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=storage.device)
        if not is_torchdynamo_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True  # bound at construction: nothing to allocate

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        # Shapes are Python ints (no device sync, nothing for a compiled graph to
        # guard on beyond what StaticLayer does); the first layer checks for all.
        if self._i == 0:
            b, h, _, d = key_states.shape
            if b != self._k.shape[0] or h != self._k.shape[1] or d != self._k.shape[3]:
                raise ConcordiaError(_shape_mismatch(self._k.shape, key_states.shape))
        # Read so that a compiled step's guards hold the value (class docs): an
        # index, which no bytecode compiler drops, as it may an empty ``if``.
        _ = _ARRANGEMENTS[self.stepping]
        return super().update(key_states, value_states, *args, **kwargs)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``, in place (the
        inherited method would rebind keys/values to new tensors, losing the
        storage)."""
        batch = self._k.shape[0]
        if beam_idx.shape != (batch,):
            raise ConcordiaError(f"durable static cache reorder: expected {batch} beam indices (the cache's batch "
                                 f"size), found shape {list(beam_idx.shape)}")
        idx = beam_idx.to(self._k.device)
        self._k.copy_(self._k.index_select(0, idx))
        self._v.copy_(self._v.index_select(0, idx))


class DurableStaticCache(Cache):
    """The static (compileable) form of :class:`DurableCache`: the same storage
    layout ``[2 * layers, batch, kv_heads, max_len, head_dim]`` (so the same kv
    region and log), with ``DurableStaticLayer`` layers. ``generate`` compiles
    its decode step with it on a GPU, as with transformers' ``StaticCache``;
    on a CPU it runs eager. ``durable_generate(..., cache_implementation=
    "static")`` uses it."""

    def __init__(self, *, num_layers: int, batch_size: int, kv_heads: int, head_dim: int, max_cache_len: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.storage = torch.zeros(2 * num_layers, batch_size, kv_heads, max_cache_len, head_dim,
                                   dtype=dtype, device=device)
        self.durable_layers = [DurableStaticLayer(self.storage, i) for i in range(num_layers)]
        super().__init__(layers=list[Any](self.durable_layers))
        self._sink: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: Any, *, batch_size: int, max_cache_len: int) -> DurableStaticCache:
        return cls(**_geometry(model), batch_size=batch_size, max_cache_len=max_cache_len)

    @property
    def length(self) -> int:
        """Positions held (a device read: one sync per call on a GPU)."""
        return int(self.durable_layers[0].cumulative_length)

    def step_sink(self) -> torch.Tensor:
        """The in-step commit op's sink (``_steps``), one per cache: a cache kept
        between calls (a conversation's) then gives every call's compiled step
        the same static-address input, so the sink is no reason for a later
        call to record its CUDA graphs again (whether it replays the earlier
        call's graphs is not measured)."""
        if self._sink is None:
            self._sink = torch.zeros(1, dtype=torch.int64, device=self.storage.device)
            torch._dynamo.mark_static_address(self._sink)
        return self._sink

    def set_stepping(self, arrangement: int) -> None:
        """Mark which step hooks are attached, 0 for none, on every layer
        (``DurableStaticLayer.stepping``)."""
        if arrangement not in _ARRANGEMENTS:
            raise ConcordiaError(f"step hook arrangement: expected one of {list(_ARRANGEMENTS)}, found {arrangement}")
        for layer in self.durable_layers:
            layer.stepping = arrangement

    def set_length(self, n: int) -> None:
        for layer in self.durable_layers:
            layer.cumulative_length.fill_(n)
