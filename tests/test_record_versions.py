"""Record format versions: logs written before version 2 (whose payload
checksum summed 64-bit words) are still read and verified by their own
checksum, and a log holding both versions resumes exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from concordia_agents import CorruptLogError, Runtime
from concordia_agents._segments import SEGMENT_HEADER_SIZE, list_segments
from gpu_runtime.records import (
    HEADER_SIZE,
    RECORD_VERSION,
    FramingError,
    RecordType,
    decode_header,
    encode_header,
    encode_record,
)

ROWS = 256


def _records(seg: Path) -> list[tuple[int, object]]:
    """(offset, header) of every record of segment ``seg``."""
    raw = seg.read_bytes()
    pos, out = SEGMENT_HEADER_SIZE, []
    while pos + HEADER_SIZE <= len(raw) and raw[pos:pos + HEADER_SIZE] != bytes(HEADER_SIZE):
        h = decode_header(raw[pos:pos + HEADER_SIZE])
        out.append((pos, h))
        pos += h.size
    return out


def _rewrite_as_version_1(seg: Path) -> int:
    """Re-encode every record of ``seg`` as format version 1 (its header's version
    and checksum), as a Concordia before version 2 wrote it; the records written."""
    raw = bytearray(seg.read_bytes())
    found = _records(seg)
    for pos, h in found:
        payload = bytes(raw[pos + HEADER_SIZE:pos + HEADER_SIZE + h.length])
        rec = encode_record(h.type, payload, session_tag=h.session_tag, epoch=h.epoch, region=h.region,
                            flags=h.flags, offset=h.offset, aux=h.aux, version=1)
        assert len(rec) == h.size
        raw[pos:pos + h.size] = rec
    seg.write_bytes(bytes(raw))
    return len(found)


def _segments(rt: Runtime, sid: str) -> list[Path]:
    return [f.path for f in list_segments(rt.session_dir(sid))[1]]


def _state(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The kv rows and the 3 MiB pages region after commit ``step`` (a payload
    larger than replay's 1 MiB verification piece)."""
    kv = np.zeros((4, ROWS, 8), np.float32)
    for t in range(step):
        kv[:, t] = t + 1
    a = np.random.default_rng(step).standard_normal(3 << 17)  # 3 MiB of float64
    return kv, a


def _commit(s, kv, a, step: int, xp=np) -> None:  # type: ignore[no-untyped-def]
    """Commit ``step``'s state, the regions being arrays of module ``xp``."""
    want_kv, want_a = _state(step)
    kv[...], a[...] = xp.asarray(want_kv), xp.asarray(want_a)
    s.commit({"step": step}, rows={"kv": step})


def _check(s, step: int) -> None:  # type: ignore[no-untyped-def]
    want_kv, want_a = _state(step)
    assert s.epoch == step and s.meta == {"step": step}
    assert np.array_equal(s.regions["kv"].array[:, :step], want_kv[:, :step])
    assert np.array_equal(s.regions["a"].array, want_a)


def _version_1_log(home: Path, xp=np, **opts) -> None:  # type: ignore[no-untyped-def]
    """A session of three epochs (arrays of module ``xp``) whose every record is
    then rewritten as version 1."""
    with Runtime.open(home=home, **{"backend": "host", "fsync": "none", "warm_ring_bytes": 0, **opts}) as rt:
        s = rt.session("old")
        kv, a = xp.zeros((4, ROWS, 8), np.float32), xp.zeros(3 << 17)
        s.register("kv", kv, kind="kv", seq_axis=1)
        s.register("a", a)
        for step in (1, 2, 3):
            _commit(s, kv, a, step, xp)
        s.close()
        assert sum(_rewrite_as_version_1(seg) for seg in _segments(rt, "old")) > 6


def test_a_version_1_log_resumes_and_grows_with_version_2_records(home: Path):
    """A log of version 1 records resumes to its last epoch; commits after it
    append version 2 records; the mixed log resumes exactly again."""
    _version_1_log(home)
    with Runtime.open(home=home, backend="host", fsync="none", warm_ring_bytes=0) as rt:
        s = rt.resume("old")
        _check(s, 3)
        kv, a = s.regions["kv"].array, s.regions["a"].array
        _commit(s, kv, a, 4)
        s.close()
        versions = {h.version for seg in _segments(rt, "old") for _, h in _records(seg)}
        assert versions == {1, RECORD_VERSION} == {1, 2}
    with Runtime.open(home=home, backend="host", fsync="none", warm_ring_bytes=0) as rt:
        _check(rt.resume("old"), 4)


def test_a_damaged_version_1_payload_is_named(home: Path):
    """A version 1 record is verified by the version 1 checksum: a flipped byte
    in its payload is refused as a corrupt log, naming the file."""
    _version_1_log(home)
    with Runtime.open(home=home, backend="host", fsync="none", warm_ring_bytes=0) as rt:
        seg = _segments(rt, "old")[-1]
        pos, h = max(((p, h) for p, h in _records(seg) if h.type is RecordType.PAGES), key=lambda r: r[1].length)
        assert h.version == 1
        raw = bytearray(seg.read_bytes())
        raw[pos + HEADER_SIZE + h.length // 2] ^= 0x10
        seg.write_bytes(bytes(raw))
        with pytest.raises(CorruptLogError, match=seg.name):
            rt.resume("old")


def test_an_unknown_record_version_is_refused():
    """A header of a newer format (version 3, its header checksum valid) is a
    FramingError that names the versions this reader knows."""
    raw = encode_header(RecordType.PAGES, session_tag=1, epoch=1, length=8, version=3)
    with pytest.raises(FramingError, match="expected record format version 1 or 2, found 3") as e:
        decode_header(raw)
    assert not e.value.torn


@pytest.mark.gpu
@pytest.mark.parametrize("verify", ["host", "device"])
def test_a_version_1_log_restores_on_the_gpu(tmp_path: Path, verify: str):
    """On the CuPy backend a version 1 log restores exactly with either checksum
    site (``verify.cu`` sums version 1 records by their own definition), and a
    flipped payload byte is still named."""
    import cupy

    opts = {"backend": "cupy", "backend_options": {"restore_verify": verify, "restore_span": 256 << 10}}
    _version_1_log(tmp_path, cupy, **opts)
    with Runtime.open(home=tmp_path, fsync="none", **opts) as rt:
        s = rt.resume("old")
        assert s.epoch == 3
        want_kv, want_a = _state(3)
        assert np.array_equal(cupy.asnumpy(s.regions["kv"].array[:, :3]), want_kv[:, :3])
        assert np.array_equal(cupy.asnumpy(s.regions["a"].array), want_a)
        s.close()
        seg = max(_segments(rt, "old"), key=lambda q: q.stat().st_size)
        pos, h = max(((p, h) for p, h in _records(seg) if h.type is RecordType.PAGES), key=lambda r: r[1].length)
        raw = bytearray(seg.read_bytes())
        raw[pos + HEADER_SIZE + h.length // 2] ^= 0x10
        seg.write_bytes(bytes(raw))
        with pytest.raises(CorruptLogError, match=seg.name):
            rt.resume("old")
