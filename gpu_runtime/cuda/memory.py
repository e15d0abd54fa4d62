"""Memory the host and the device share: mapped pinned buffers, registered
host memory (the log ring), device addresses of CuPy and torch arrays, and the
pinned arena that device tasks read their tables from.

Pinned memory is allocated once and kept: ``cudaHostAlloc`` / ``cudaFreeHost``
synchronize the device, i.e. they would wait for a resident executor to park.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..errors import ExecutorError, RegionError

__all__ = ["PinnedArena", "PinnedBuffer", "device_ptr", "register_host_memory"]


def device_ptr(array: Any) -> int:
    """Device address of a CuPy array or a CUDA torch tensor."""
    mod = type(array).__module__.split(".")[0]
    return int(array.data_ptr()) if mod == "torch" else int(array.data.ptr)


class PinnedBuffer:
    """Mapped, page-locked host memory with a NumPy view; the device uses the
    same address (unified addressing)."""

    def __init__(self, nbytes: int) -> None:
        import cupy

        self.nbytes = max(nbytes, 8)
        self.ptr = cupy.cuda.runtime.hostAlloc(self.nbytes, cupy.cuda.runtime.hostAllocMapped)
        self.device_ptr = _device_pointer(self.ptr)
        self.array = np.ctypeslib.as_array((ctypes.c_uint8 * self.nbytes).from_address(self.ptr))
        self._free = cupy.cuda.runtime.freeHost

    def view(self, dtype: Any) -> np.ndarray:
        return self.array.view(dtype)

    def close(self) -> None:
        if self.ptr:
            del self.array
            self._free(self.ptr)
            self.ptr = 0


def _device_pointer(host_ptr: int) -> int:
    from cuda.bindings import runtime as cudart

    err, dptr = cudart.cudaHostGetDevicePointer(host_ptr, 0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise ExecutorError(f"cudaHostGetDevicePointer failed: {err}")
    return int(dptr)


def register_host_memory(ptr: int, nbytes: int) -> int:
    """Page-lock and map existing host memory (e.g. a /dev/shm ring); returns the device address."""
    import cupy

    cupy.cuda.runtime.hostRegister(ptr, nbytes, 2)  # cudaHostRegisterMapped
    return _device_pointer(ptr)


class PinnedArena:
    """A pinned buffer handed out in words, round robin, to device tasks that
    read tables from it (dirty-run tables, a fused commit's body and result).
    When it wraps, ``words`` waits (``wait(ticket)``) until the task that last
    read it has run; callers record that task with ``last_reader``."""

    def __init__(self, nbytes: int, wait: Any) -> None:
        self.buffer = PinnedBuffer(nbytes)
        self._wait = wait
        self._pos = 0
        self.last_reader = -1  #: ticket of the newest task reading the arena (-1: none)

    @property
    def device_ptr(self) -> int:
        return self.buffer.device_ptr

    def words(self, n: int, what: str) -> tuple[int, np.ndarray]:
        """Byte offset and u64 view of ``n`` words."""
        need = 8 * n
        if need > self.buffer.nbytes // 2:
            raise RegionError(f"{what} exceeds half the {self.buffer.nbytes}-byte arena")
        if self._pos + need > self.buffer.nbytes:
            if self.last_reader >= 0:
                self._wait(self.last_reader)
            self._pos = 0
        offset = self._pos
        self._pos += need
        return offset, self.buffer.array[offset:offset + need].view(np.uint64)

    def close(self) -> None:
        self.buffer.close()
