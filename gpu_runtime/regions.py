"""State regions: what a registered array is, independent of where it lives.

A :class:`RegionSpec` is the durable description of a region (it is written
into the log as the payload of a REGION record, JSON). The array adapters here
turn NumPy arrays, torch tensors and CuPy arrays into that description without
importing torch or CuPy unless the caller's array comes from them.

Two kinds:

* ``pages`` — an opaque byte image tracked by per-page hashes. A page is
  ``page_size`` bytes; the last page may be short.
* ``kv`` — append-only along ``seq_axis``. Viewed as ``[outer, rows, inner]``
  (outer = product of the dimensions before the axis, inner = bytes of one row
  slice after it), a delta for rows ``[t0, t1)`` is the gathered block
  ``[outer, t1 - t0, inner]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from .errors import RegionError

__all__ = ["ArrayInfo", "RegionKind", "RegionSpec", "allocate", "describe", "host_bytes"]

RegionKind = Literal["pages", "kv"]

# dtype names shared by NumPy, torch and CuPy, with their item sizes.
_ITEMSIZE = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return math.prod(shape) * _ITEMSIZE[dtype]


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """What Concordia needs to know about a user's array."""

    library: str  #: "numpy", "torch" or "cupy"
    dtype: str
    shape: tuple[int, ...]
    device: str  #: "cpu" or "cuda:N"
    contiguous: bool

    itemsize = property(lambda self: _ITEMSIZE[self.dtype])
    nbytes = property(lambda self: _nbytes(self.shape, self.dtype))

    @property
    def on_device(self) -> bool:
        return self.device != "cpu"


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """The durable description of a registered region (JSON in REGION records)."""

    name: str
    region_id: int
    kind: RegionKind
    dtype: str
    shape: tuple[int, ...]
    library: str
    device: str
    page_size: int = 4096
    seq_axis: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("pages", "kv"):
            raise RegionError(f"region {self.name!r}: expected kind 'pages' or 'kv', found {self.kind!r}")
        if self.dtype not in _ITEMSIZE:
            raise RegionError(
                f"region {self.name!r}: unsupported dtype {self.dtype!r}; expected one of {sorted(_ITEMSIZE)}")
        if self.kind == "pages" and (self.page_size <= 0 or self.page_size % 8):
            raise RegionError(
                f"region {self.name!r}: expected a page size that is a positive multiple of 8, found {self.page_size}")
        if self.kind == "kv":
            if not self.shape:
                raise RegionError(f"region {self.name!r}: a kv region needs at least one dimension")
            if not 0 <= self.seq_axis < len(self.shape):
                raise RegionError(
                    f"region {self.name!r}: expected seq_axis in [0, {len(self.shape)}), found {self.seq_axis}")

    itemsize = property(lambda self: _ITEMSIZE[self.dtype])
    nbytes = property(lambda self: _nbytes(self.shape, self.dtype))

    @property
    def rows(self) -> int:
        """Capacity along the sequence axis (kv regions)."""
        return self.shape[self.seq_axis]

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.seq_axis])

    @property
    def row_bytes(self) -> int:
        """Bytes of one row within one outer slice: ``prod(shape[axis+1:]) * itemsize``."""
        return math.prod(self.shape[self.seq_axis + 1:]) * self.itemsize

    @property
    def npages(self) -> int:
        return -(-self.nbytes // self.page_size)

    def compatible_with(self, info: ArrayInfo) -> str | None:
        """``None`` if ``info`` can hold this region, else what differs."""
        if info.dtype != self.dtype:
            return f"expected dtype {self.dtype}, found {info.dtype}"
        if tuple(info.shape) != tuple(self.shape):
            return f"expected shape {tuple(self.shape)}, found {tuple(info.shape)}"
        return None

    def to_json(self) -> bytes:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RegionSpec:
        d = json.loads(data)
        d["shape"] = tuple(d["shape"])
        return cls(**d)


def describe(array: Any) -> ArrayInfo:
    """Describe a NumPy array, torch tensor or CuPy array; RegionError otherwise."""
    mod = type(array).__module__.split(".")[0]
    if isinstance(array, np.ndarray):
        dt = array.dtype.name
        return ArrayInfo("numpy", dt, tuple(array.shape), "cpu", bool(array.flags.c_contiguous))
    if mod == "torch":
        dt = str(array.dtype).removeprefix("torch.")
        dev = "cpu" if array.device.type == "cpu" else f"{array.device.type}:{array.device.index or 0}"
        return ArrayInfo("torch", dt, tuple(array.shape), dev, bool(array.is_contiguous()))
    if mod == "cupy":
        return ArrayInfo("cupy", array.dtype.name, tuple(array.shape), f"cuda:{array.device.id}",
                         bool(array.flags.c_contiguous))
    raise RegionError(f"expected a NumPy array, torch tensor or CuPy array, found {type(array).__qualname__}")


def host_bytes(array: Any) -> np.ndarray:
    """A writable, flat uint8 NumPy view of a host array's memory (no copy)."""
    info = describe(array)
    if info.on_device:
        raise RegionError(f"expected an array in host memory, found one on {info.device}")
    if not info.contiguous:
        raise RegionError("expected a C-contiguous array, found a strided view; register the base tensor")
    if info.library == "numpy":
        if not array.flags.writeable:
            raise RegionError("expected a writable array, found a read-only one")
        return array.reshape(-1).view(np.uint8)
    # torch: numpy() refuses bf16 and friends, so reinterpret as bytes first.
    flat = array.detach().reshape(-1)
    return flat.view(__import__("torch").uint8).numpy() if flat.numel() else np.empty(0, np.uint8)


def allocate(spec: RegionSpec, *, device: str | None = None) -> Any:
    """A new, zeroed array of the spec's library, dtype and shape.

    ``device`` overrides the recorded device (e.g. ``"cpu"`` to restore a GPU
    session's state on a machine without one)."""
    dev = device or spec.device
    lib = spec.library
    if lib == "numpy" and dev == "cpu":
        return np.zeros(spec.shape, dtype=spec.dtype)
    if lib == "torch" or (lib == "numpy" and dev != "cpu"):
        import torch

        return torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype), device=dev)
    if lib == "cupy":
        if dev == "cpu":
            return np.zeros(spec.shape, dtype=spec.dtype)
        import cupy

        with cupy.cuda.Device(int(dev.split(":")[1])):
            return cupy.zeros(spec.shape, dtype=spec.dtype)
    raise RegionError(f"region {spec.name!r}: cannot allocate library {lib!r} on {dev!r}")
