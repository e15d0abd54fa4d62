"""Stream fences: order a commit's device copy after the caller's queued work
without synchronizing the host.

Protocol (per commit, ``StreamFence.behind``):

1. The regions' current streams are read (each region remembers a cheap
   getter for its library's current stream: torch or CuPy).
2. One stream: ``cuStreamWriteValue64`` writes the next fence value on it.
   Several: each gets an event, an internal join stream waits for all of them
   and writes the value, so it is reached only when every stream has reached
   its commit point (written on each stream, the first to arrive would release
   the executor early). The callers' streams gain no dependency.
3. The first device task of the commit carries (word, value, timeout) in its
   FENCE fields (``tasks.py``); the executor waits for the word to reach the
   value before it copies, yielding if it takes longer than ``fence_yield_ms``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import RegionError

__all__ = ["NO_FENCE", "StreamFence", "current_stream_getter"]

#: FENCE fields of a task that waits for nothing
NO_FENCE = (0, 0, 0)


def _stream_writer() -> Any:
    """``cuStreamWriteValue64`` as a ctypes function (the commit's fence stage
    went from 3.9 to 3.3 us on the H100 host with it), or the cuda.bindings
    wrapper where the driver does not hand out the entry point. Same symbol
    version and stream semantics as cuda.bindings (legacy default stream)."""
    import ctypes

    from cuda.bindings import driver

    def wrapper(stream: int, addr: int, value: int, flags: int) -> int:
        (err,) = driver.cuStreamWriteValue64(stream, addr, value, flags)
        return int(err)

    try:
        err, pfn, _status = driver.cuGetProcAddress(
            b"cuStreamWriteValue64", 12000, driver.CUdriverProcAddress_flags.CU_GET_PROC_ADDRESS_LEGACY_STREAM)
        if err != driver.CUresult.CUDA_SUCCESS or not int(pfn):
            return wrapper
    except Exception:  # noqa: BLE001 - an older binding: the wrapper works everywhere
        return wrapper
    # PYFUNCTYPE keeps the GIL: the call takes about a microsecond, and letting
    # go of the GIL mid-commit hands it to the flusher thread for a whole flush.
    proto = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint)
    return proto(int(pfn))


def current_stream_getter(array: Any) -> Callable[[], int]:
    """A function returning the handle of ``array``'s library's current stream
    on its device (made once per region: the commit path calls it every time)."""
    if type(array).__module__.split(".")[0] == "torch":
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the cheap path (no Stream object)
        if raw is not None:
            return functools.partial(raw, array.device.index or 0)
        device = array.device
        return lambda: int(torch.cuda.current_stream(device).cuda_stream)
    import cupy

    return lambda: int(cupy.cuda.get_current_stream().ptr)


class StreamFence:
    """The fence word (device memory) and what writes it; one per backend."""

    def __init__(self, timeout_s: float) -> None:
        import cupy

        self._cupy = cupy
        self._word = cupy.zeros(1, dtype=cupy.uint64)
        self.word_ptr = int(self._word.data.ptr)
        self.timeout_ns = int(timeout_s * 1e9)
        self.value = 0
        self._write_value: Any = None  # cuStreamWriteValue64, resolved on first use
        self._join: Any = None  # stream that joins several caller streams for one fence
        self._join_events: list[Any] = []

    def behind(self, streams: Sequence[int]) -> tuple[int, int, int]:
        """Write the next fence value behind the work queued on ``streams``;
        returns the FENCE fields (word, value, timeout) for the first device
        task to wait on."""
        streams = sorted(set(streams))
        self.value += 1
        target = streams[0]
        if len(streams) > 1:
            target = self._join_streams(streams)
        if self._write_value is None:
            self._write_value = _stream_writer()
        err = self._write_value(target, self.word_ptr, self.value, 0)
        if err:
            raise RegionError(f"cuStreamWriteValue64 on stream {target:#x} failed: CUresult {err}")
        return (self.word_ptr, self.value, self.timeout_ns)

    def _join_streams(self, streams: Sequence[int]) -> int:
        """Make the join stream wait for the work queued so far on ``streams``;
        returns the join stream's handle."""
        from cuda.bindings import driver

        if self._join is None:
            self._join = self._cupy.cuda.Stream(non_blocking=True)
        while len(self._join_events) < len(streams):
            err, ev = driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING)
            if err != driver.CUresult.CUDA_SUCCESS:
                raise RegionError(f"cuEventCreate failed: {err}")
            self._join_events.append(ev)
        join = int(self._join.ptr)
        for s, ev in zip(streams, self._join_events, strict=False):
            # An event may be recorded again right away: the wait took its state.
            for err in (driver.cuEventRecord(ev, s)[0], driver.cuStreamWaitEvent(join, ev, 0)[0]):
                if err != driver.CUresult.CUDA_SUCCESS:
                    raise RegionError(f"joining stream {s:#x} for the commit fence failed: {err}")
        return join

    def close(self) -> None:
        if self._join_events:
            from cuda.bindings import driver

            for ev in self._join_events:
                driver.cuEventDestroy(ev)
            self._join_events = []
