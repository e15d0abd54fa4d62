"""Byte identity: for the same commits, the backend under test writes the log the host backend
(the reference implementation: gpu_runtime/host.py) writes, record for record and byte for byte.

Each case drives one sequence of commits aimed at one of the backends' commit paths (the GPU
backend has several: gpu_runtime/cuda/backend.py's docstring) and is run twice, on the host
backend with NumPy arrays and on the backend under test in its memory; then the flushed delta
segments are compared (``_log_records``). On the host backend the comparison is host against
host: trivially equal, but it runs every driver and the comparison itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from concordia_agents import Runtime
from concordia_agents._replay import scan
from concordia_agents._segments import SEGMENT_HEADER_SIZE, list_segments
from gpu_runtime.backend import Capability
from gpu_runtime.records import HEADER_SIZE, RecordType, decode_header, record_size, session_tag

from ..conftest import remove_rings
from .substrate import Substrate

REFERENCE = Substrate.of("host")  # what every backend's log must equal
SID = "bytes"


# -- the comparison --------------------------------------------------------------------------


def _log_records(directory: Path) -> list[tuple[Any, ...]]:
    """Every record of a session's delta segments in log order, as comparable tuples.

    PAGES and ROWS records are their raw bytes (header, payload, padding). A REGION record is
    its header's fields and its descriptor less "library" and "device", which name the array
    library and memory and so differ by substrate; since that can change the record's padded
    size, every record is placed at a *canonical* log offset, in which each REGION record takes
    the size of its descriptor without those keys. A COMMIT record is its (verified) header with
    its epoch-start offset made canonical the same way, then its payload and padding as bytes.
    Every record's canonical offset is part of its tuple, so a gap or an extra record shows."""
    _, deltas = list_segments(directory)
    excess: list[tuple[int, int]] = []  # (log offset of a REGION record, its size over the canonical size)

    def canonical(offset: int) -> int:
        return offset - sum(x for at, x in excess if at < offset)

    out: list[tuple[Any, ...]] = []
    for seg in deltas:
        raw = seg.path.read_bytes()
        pos = SEGMENT_HEADER_SIZE
        while pos < len(raw):
            h = decode_header(raw[pos:pos + HEADER_SIZE])  # checks the header's CRC, device-made or not
            rec = raw[pos:pos + h.size]
            assert len(rec) == h.size, f"{seg.path.name}: record at {pos} is cut short"
            at = seg.base + pos - SEGMENT_HEADER_SIZE
            if h.type is RecordType.REGION:
                spec = json.loads(rec[HEADER_SIZE:HEADER_SIZE + h.length])
                del spec["library"], spec["device"]
                size = record_size(len(json.dumps(spec, sort_keys=True, separators=(",", ":"))))
                out.append((canonical(at), "REGION", replace(h, length=0, payload_sum=0), spec))
                excess.append((at, h.size - size))
            elif h.type is RecordType.COMMIT:
                out.append((canonical(at), "COMMIT", replace(h, offset=canonical(h.offset)), rec[HEADER_SIZE:]))
            else:
                out.append((canonical(at), h.type.name, rec))
            pos += h.size
    return out


def _data_bytes(records: list[tuple[Any, ...]]) -> int:
    return sum(len(r[2]) for r in records if r[1] in ("PAGES", "ROWS"))


def _summary(record: tuple[Any, ...]) -> str:
    if record[1] in ("PAGES", "ROWS"):
        h = decode_header(record[2][:HEADER_SIZE])
        return f"{record[1]} at {record[0]}: {h}, {len(record[2])} bytes"
    return f"{record[1]} at {record[0]}: {record[2]}"


# -- the drivers: one sequence of commits each, written through the substrate ----------------


def _touch(sub: Substrate, array: Any, model: np.ndarray, elements: list[int], salt: int) -> None:
    """Change the given elements of a 1-d region and of its host model alike: their lowest byte is
    XORed with ``salt`` (so a float stays finite: its exponent is not touched)."""
    idx = np.asarray(sorted(set(elements)), dtype=np.int64)  # unique: a device scatter writes each once
    changed = model[idx].copy()
    changed.view(np.uint8).reshape(len(idx), -1)[:, 0] ^= np.uint8(salt)
    model[idx] = changed
    sub.put(array, idx, changed)


def _per_token_appends(s: Any, sub: Substrate) -> dict[str, Any]:
    """Decode: epochs of one to three rows appended to two described kv regions, bodies of every
    length mod 8 up to 60 kB, epochs where one region appends nothing and epochs where none does,
    through a 1 MiB ring that wraps around; a 30-row epoch and a 100 kB body in between take
    the general path."""
    rng = np.random.default_rng(7)
    kv = sub.array(rng.standard_normal((8, 2, 1600, 24)).astype(np.float32))  # 1536 bytes a row: 10 a record
    tokens = sub.array(rng.integers(0, 50_000, (2, 1600)))
    s.register("kv", kv, kind="kv", seq_axis=2)
    s.register("tokens", tokens, kind="kv", seq_axis=1)
    n = 40
    s.commit({"prompt": n}, rows={"kv": n, "tokens": n})
    step = 0
    while n < 1590:
        step += 1
        pad = "x" * (100_000 if step == 300 else 60_000 if step == 400 else step % 11)
        if step % 23 == 0:
            s.commit({"step": step, "pad": pad}, wait=step % 2 == 0)  # no rows at all
            continue
        n = min(n + (30 if step == 200 else 1 + step % 3), 1600)
        rows = {"tokens": n} if step % 17 == 0 else {"kv": n, "tokens": n}
        s.commit({"step": step, "pad": pad}, rows=rows, wait=step % 50 == 0)
    # the ring wrapped around twice; all but 3 epochs (the first, step 200's 30 rows, step 300's 100 kB body)
    # are small appends: the per-token path on a backend with a persistent executor
    return {"epochs": step + 1, "data_bytes": 2 << 20, "paths": {"per_token": step + 1 - 3, "general": 3}}


def _general(s: Any, sub: Substrate) -> dict[str, Any]:
    """The general path: a first epoch describing three regions (two pages, one kv) with every
    page, appends longer than a record and than a quarter of the ring, scattered dirty pages (the
    short last page included), runs of dirty pages longer than a record, an empty epoch, COMMIT
    bodies over 64 KiB, a region registered late (its REGION record in epoch 6), an empty row
    range."""
    rng = np.random.default_rng(21)
    pages_h = rng.integers(0, 256, 64 * 4096 + 1024, dtype=np.uint8)  # 65 pages, the last one short
    kv_h = rng.standard_normal((4, 2, 1024, 32)).astype(np.float32)  # 1 KiB a row: 16 a record
    table_h = np.arange(2048, dtype=np.float64)  # 64 pages of 256 bytes
    pages, kv, table = sub.array(pages_h), sub.array(kv_h), sub.array(table_h)
    s.register("pages", pages)
    s.register("kv", kv, kind="kv", seq_axis=2)
    s.register("table", table, page_size=256)
    s.commit({"e": 1}, rows={"kv": 40})
    _touch(sub, pages, pages_h, [3 * 4096 + 5, 17 * 4096, 18 * 4096 + 4095, 64 * 4096 + 1000], 0x11)
    s.commit({"e": 2}, rows={"kv": 100})  # 60 rows: four records
    _touch(sub, table, table_h, [5, 6 * 32, 63 * 32 + 31], 0x22)
    s.commit({"e": 3}, rows={"kv": 400})  # 300 KiB: more than a quarter of the 1 MiB ring
    s.commit({"e": 4})  # nothing changed
    _touch(sub, table, table_h, list(range(0, 2048, 96)), 0x33)
    s.commit({"e": 5, "pad": "m" * 100_000})  # a COMMIT body over 64 KiB
    late_h = rng.integers(0, 1 << 30, (64, 6), dtype=np.int64)  # 48-byte rows
    late = sub.array(late_h)
    s.register("late", late, kind="kv")
    _touch(sub, pages, pages_h, [p * 4096 + 7 for p in range(20, 41)] + [0], 0x44)  # a 21-page run: six records
    s.commit({"e": 6}, rows={"late": 5, "kv": (400, 401)})
    s.commit({"e": 7}, rows={"kv": (401, 1024), "late": (5, 64)})  # 623 KiB in one epoch
    _touch(sub, pages, pages_h, list(range(0, pages_h.size, 4096)), 0x55)  # every page
    s.commit({"e": 8, "pad": "n" * 70_000}, rows={"kv": (1024, 1024)})
    assert np.array_equal(sub.to_host(pages), pages_h) and np.array_equal(sub.to_host(table), table_h)
    # more than the ring holds; every epoch has pages regions: the general path, never the per-token one
    return {"epochs": 8, "data_bytes": 1 << 20, "paths": {"general": 8, "per_token": 0, "fused_pages": 0}}


def _fused_pages(nbytes: int, ps: int) -> Callable[[Any, Substrate], dict[str, Any]]:
    def drive(s: Any, sub: Substrate) -> dict[str, Any]:
        """Pages epochs of one described region: one dirty page, scattered pages, runs longer than a
        record, the first and the last (short) page, nothing dirty, bodies of every length mod 8, a
        ring that wraps around, every page (more than a one-task epoch may write)."""
        npages = -(-nbytes // ps)
        model = np.random.default_rng(11).integers(0, 256, nbytes, dtype=np.uint8)
        patterns = [[0], [npages - 1], [], list(range(5, 15)), [1, 2, 3, 40, 41, npages - 2, npages - 1],
                    list(range(0, npages, 2)), list(range(npages)), [7]]
        if npages > 65_600:  # the device walks its bitmap 65 536 pages (one tile) at a time
            patterns += [list(range(65_500, 65_600)), [65_535, 65_536], [65_536], list(range(65_536 - 64, 65_536))]
        p = sub.array(model)
        s.register("p", p, page_size=ps)
        s.commit({"first": 1})
        for e in range(60):
            pages = patterns[e % len(patterns)] if e < 40 else \
                sorted(np.random.default_rng(e).choice(npages, 1 + e % 33, replace=False).tolist())
            idx = np.asarray(pages, dtype=np.int64) * ps
            model[idx] += np.uint8(1 + e)  # unique pages: one write each (uint8 wraps)
            sub.put(p, idx, model[idx])
            s.commit({"e": e, "pad": "y" * (e % 9)})
        assert np.array_equal(sub.to_host(p), model)
        return {"epochs": 61, "data_bytes": 1 << 20, "fused_commits": 40, "fused_fallbacks": 5}

    return drive


def _larger_than_the_ring(s: Any, sub: Substrate) -> dict[str, Any]:
    """Epochs of 7 MiB and 3 MiB (kv rows, then every page of a pages region) through a 1 MiB
    ring: written as the flusher drains it."""
    rng = np.random.default_rng(3)
    kv = sub.array(rng.standard_normal((8, 2, 1024, 64)).astype(np.float32))  # 4 KiB a row
    big_h = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    big = sub.array(big_h)
    s.register("kv", kv, kind="kv", seq_axis=2)
    s.register("big", big)
    s.commit({"n": 1000}, rows={"kv": 1000})
    big_h += np.uint8(1)
    sub.put(big, np.s_[:], big_h)
    s.commit({"n": 1024}, rows={"kv": 1024})
    return {"epochs": 2, "data_bytes": 9 << 20, "paths": {"general": 2, "per_token": 0}}


@dataclass(frozen=True)
class Case:
    drive: Callable[[Any, Substrate], dict[str, Any]]  #: commits; returns what the log must show
    ring_bytes: int = 1 << 20
    max_record_bytes: int = 16 << 10
    #: backend options for backends with a persistent executor (the path the case is meant to hit)
    executor_options: dict[str, Any] = field(default_factory=dict)


CASES = {
    # the GPU backend's per-token path (_commit_appends): described kv regions, small appends, short bodies
    "per-token-appends": Case(_per_token_appends),
    # the general path: REGION records, large appends, pages, several regions per epoch, large bodies
    "general": Case(_general),
    # one SCAN_COMMIT task per pages epoch of one described region (fused_pages=True)
    "fused-pages": Case(_fused_pages(64 * 4096 + 1024, 4096), executor_options={"fused_pages": True}),
    "fused-pages-two-bitmap-tiles": Case(_fused_pages(70_000 * 256 - 128, 256),
                                         executor_options={"fused_pages": True}),
    # groups reserved one at a time and published as they go
    "epoch-larger-than-the-ring": Case(_larger_than_the_ring, max_record_bytes=64 << 10),
}


def _run(home: Path, sub: Substrate, case: Case) -> tuple[list[tuple[Any, ...]], dict[str, Any], dict[str, Any]]:
    """Drive the case on ``sub``; returns (log records, what the driver expects, backend facts)."""
    options = case.executor_options if Capability.PERSISTENT_EXECUTOR in sub.capabilities else {}
    try:
        with Runtime.open(home=home, backend=sub.backend, ring_bytes=case.ring_bytes,
                          max_record_bytes=case.max_record_bytes, fsync="none", space_timeout=20,
                          compact_bytes=1 << 40, compact_epochs=0,
                          backend_options=options) as rt:  # compared: the delta segments
            s = rt.session(SID)
            expect = case.drive(s, sub)
            assert s.flush(timeout=60) == s.epoch == expect["epochs"]
            directory, meta = rt.session_dir(SID), s.meta
            records, facts = _log_records(directory), rt.backend.describe()
            s.close()
    finally:
        remove_rings(home)
    index = scan(directory, session_tag=session_tag(SID))
    assert (index.epoch, index.meta) == (expect["epochs"], meta)
    return records, expect, facts


SLOW = {"fused-pages-two-bitmap-tiles"}  # 17 MiB of 256-byte pages: ~110 000 host records a run


@pytest.mark.parametrize("case", [pytest.param(c, id=n, marks=[pytest.mark.slow] if n in SLOW else [])
                                  for n, c in CASES.items()])
def test_log_bytes_equal_the_host_backends(tmp_path: Path, substrate: Substrate, case: Case):
    """The backend under test writes byte for byte the host backend's log for the same commits."""
    want, expect, _ = _run(tmp_path / "reference", REFERENCE, case)
    got, _, facts = _run(tmp_path / "under-test", substrate, case)
    assert _data_bytes(want) > expect["data_bytes"]
    assert sum(r[1] == "COMMIT" for r in want) == expect["epochs"]
    if Capability.PERSISTENT_EXECUTOR in substrate.capabilities and "paths" in expect:
        # the commit paths the case aims at ran, as many times as the driver says
        assert {k: facts["commit_paths"][k] for k in expect["paths"]} == expect["paths"], facts
    if Capability.PERSISTENT_EXECUTOR in substrate.capabilities and "fused_commits" in expect:
        # the fused path ran (and fell back where an epoch's records did not fit its span)
        assert facts["fused_pages_commits"] >= expect["fused_commits"], facts
        assert facts["fused_pages_fallbacks"] >= expect["fused_fallbacks"], facts
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            pytest.fail(f"record {i} differs:\n  {substrate.id}: {_summary(a)}\n  host: {_summary(b)}")
    assert len(got) == len(want), f"{substrate.id} wrote {len(got)} records, the host backend {len(want)}"
