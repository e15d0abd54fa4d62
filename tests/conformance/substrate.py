"""Arrays in the memory a backend serves, for tests that run unchanged on every backend.

A :class:`Substrate` is a backend plus the memory it registers arrays in, picked by the
backend's capabilities (never by its name): ``HOST_MEMORY`` gives NumPy arrays and CPU torch
tensors, ``DEVICE_MEMORY`` CuPy arrays and CUDA torch tensors on the current device. Test
bodies make arrays from host data (``array``, ``zeros``, ``tensor``), write into them
(plain item assignment with Python scalars and slices works on all three libraries; ``put``
for NumPy index arrays and values), and read them back for assertions (``to_host``).

The crash and ownership children (``tests._procs``) build theirs from the backend name and
memory given on their command line, so a child of a device substrate commits device arrays.
This module imports no pytest, and CuPy and torch only when an array needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_runtime.backend import Capability, backend_class
from gpu_runtime.regions import describe

__all__ = ["MEMORIES", "Substrate", "memories"]

#: The memories a backend may serve, in the order substrates are made for a backend serving several.
MEMORIES = (Capability.HOST_MEMORY, Capability.DEVICE_MEMORY)


def memories(backend: str) -> list[Capability]:
    """The memories ``backend`` registers arrays in, from its class's capabilities (not opened)."""
    caps = backend_class(backend).capabilities
    return [m for m in MEMORIES if m in caps]


@dataclass(frozen=True, slots=True)
class Substrate:
    """A backend and the memory its test arrays live in."""

    backend: str  #: the backend's name, for ``Runtime.open(backend=...)``
    memory: Capability  #: HOST_MEMORY or DEVICE_MEMORY
    capabilities: frozenset[Capability]  #: all of the backend's capabilities

    @classmethod
    def of(cls, backend: str, memory: Capability | str | None = None) -> Substrate:
        """The substrate of ``backend`` in ``memory`` (a Capability or its value; ``None``: the first
        memory the backend serves). ValueError if the backend serves no such memory."""
        served = memories(backend)
        if memory is None:
            if not served:
                raise ValueError(f"backend {backend!r} serves neither host nor device memory")
            memory = served[0]
        memory = Capability(memory)
        if memory not in served:
            raise ValueError(f"backend {backend!r} serves {[m.value for m in served]}, not {memory.value!r}")
        return cls(backend, memory, frozenset(backend_class(backend).capabilities))

    @property
    def id(self) -> str:
        """The test ID: the backend's name, plus the memory where the backend serves more than one."""
        if len(memories(self.backend)) == 1:
            return self.backend
        return f"{self.backend}-{'device' if self.on_device else 'host'}"

    @property
    def on_device(self) -> bool:
        return self.memory is Capability.DEVICE_MEMORY

    @property
    def torch_device(self) -> str:
        return "cuda" if self.on_device else "cpu"

    # -- making arrays -------------------------------------------------------------

    def array(self, data: np.ndarray) -> Any:
        """A C-contiguous copy of host array ``data`` in this memory (NumPy or CuPy)."""
        data = np.array(data, order="C", copy=True)
        if not self.on_device:
            return data
        import cupy

        return cupy.array(data)  # a copy on the current device, same dtype and shape

    def zeros(self, shape: int | tuple[int, ...], dtype: Any) -> Any:
        return self.array(np.zeros(shape, dtype))

    def tensor(self, data: Any) -> Any:
        """A copy of torch tensor ``data`` in this memory (CPU or CUDA)."""
        return data.detach().to(self.torch_device, copy=True).contiguous()

    # -- changing and reading them ----------------------------------------------------

    def put(self, array: Any, index: Any, value: Any) -> None:
        """``array[index] = value`` where index arrays and values may be NumPy (or, for torch, CPU
        tensors): they are moved to ``array``'s memory and cast to its dtype first. CuPy refuses
        NumPy operands, and scatters repeated indices in no defined order: give unique ones."""
        library = describe(array).library
        if library == "numpy":
            array[index] = value
            return
        if isinstance(value, np.generic):
            value = value.item()
        if library == "cupy":
            import cupy

            def move(v: Any) -> Any:
                return cupy.asarray(v) if isinstance(v, np.ndarray) else v

            if isinstance(value, np.ndarray):
                value = cupy.asarray(value.astype(array.dtype, copy=False))
        else:  # torch
            import torch

            def move(v: Any) -> Any:
                return torch.from_numpy(np.ascontiguousarray(v)).to(array.device) if isinstance(v, np.ndarray) else v

            if isinstance(value, np.ndarray):
                value = torch.from_numpy(np.ascontiguousarray(value))
            if isinstance(value, torch.Tensor):
                value = value.to(device=array.device, dtype=array.dtype)
        array[tuple(move(i) for i in index) if isinstance(index, tuple) else move(index)] = value

    def to_host(self, array: Any) -> Any:
        """A host copy of ``array`` for assertions: a NumPy array for NumPy and CuPy arrays, a CPU
        tensor for torch tensors (NumPy has no bfloat16). Waits for the work queued on it."""
        library = describe(array).library
        if library == "numpy":
            return np.array(array, copy=True)
        if library == "cupy":
            import cupy

            return cupy.asnumpy(array)
        return array.detach().to("cpu", copy=True)

    def serves(self, array: Any) -> bool:
        """Whether ``array`` lives in this substrate's memory."""
        return describe(array).on_device == self.on_device
