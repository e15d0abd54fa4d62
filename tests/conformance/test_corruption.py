"""Damaged logs: a torn tail restores the last intact epoch; anything else raises
CorruptLogError naming the file and offset. Never wrong data, never a hang. On every
backend: the log is written by the backend under test and restored through it."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import update

from concordia_agents import CorruptLogError, Runtime
from concordia_agents._catalog._models import SessionRow
from concordia_agents._segments import list_segments
from gpu_runtime.records import HEADER_SIZE, decode_header

from .substrate import Substrate

EPOCHS = 6


def _build(home: Path, sub: Substrate, *, recorded: int = EPOCHS - 1) -> tuple[list[dict[str, np.ndarray]], Path]:
    """A closed session with EPOCHS epochs; returns the state after each epoch.

    The catalog is left recording epoch ``recorded`` as durable. The default,
    one less than the log holds, is what a crash while the last epoch was
    being appended leaves (the flusher records an epoch only after its fsync),
    so damage to the last epoch is a torn tail, not a lost durable epoch."""
    states = []
    with Runtime.open(home=home, backend=sub.backend, max_record_bytes=8192) as rt:
        s = rt.session("victim")
        a = sub.zeros(6 * 4096, np.uint8)
        kv = sub.zeros((2, 32, 8), np.float32)
        s.register("a", a)
        s.register("kv", kv, kind="kv", seq_axis=1)
        rng = np.random.default_rng(5)
        states.append({"a": sub.to_host(a), "kv": sub.to_host(kv), "len": 0})
        for e in range(1, EPOCHS + 1):
            values = rng.integers(1, 256, 20)  # drawn before the positions, as `a[pos] = values` evaluates them
            sub.put(a, rng.integers(0, 6 * 4096, 20), values)  # a repeated position keeps one value: read back below
            kv[:, e - 1] = e
            s.commit({"e": e}, rows={"kv": e})
            states.append({"a": sub.to_host(a), "kv": sub.to_host(kv), "len": e})
        s.close()
        directory = rt.session_dir("victim")
        with rt.catalog.write() as w:
            w.execute(update(SessionRow).where(SessionRow.id == "victim").values(last_epoch=recorded))
    return states, directory


def _records(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every record in a segment."""
    data = path.read_bytes()
    out, pos = [], 64
    while pos < len(data):
        h = decode_header(data[pos:pos + HEADER_SIZE])
        out.append((pos, h.size))
        pos += h.size
    return out


def _resume_copy(src_home: Path, work: Path, sub: Substrate, **resume: bool):  # type: ignore[no-untyped-def]
    """Resume 'victim' from a copy of a home (so each trial starts from the same damage) through the
    backend under test; returns (epoch, a, kv, kv length) with the arrays copied to the host."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src_home, work)
    with Runtime.open(home=work, backend=sub.backend) as rt:
        s = rt.resume("victim", **resume)
        if s.epoch == 0:  # a salvage that kept nothing: no region was ever committed
            assert s.regions == {}
            out = (0, np.zeros(6 * 4096, np.uint8), np.zeros((2, 32, 8), np.float32), 0)
        else:
            assert sub.serves(s.regions["a"].array) and sub.serves(s.regions["kv"].array)
            out = (s.epoch, sub.to_host(s.regions["a"].array), sub.to_host(s.regions["kv"].array),
                   s.regions["kv"].length)
        s.close()
    return out


def _flip_a_bit(rnd: random.Random, files: list[Path]) -> tuple[Path, bytes]:
    """Flip one random bit of one of ``files``; returns the file and its pristine bytes."""
    f = rnd.choice(files)
    pristine = f.read_bytes()
    bit = rnd.randrange(len(pristine) * 8)
    damaged = bytearray(pristine)
    damaged[bit // 8] ^= 1 << (bit % 8)
    f.write_bytes(bytes(damaged))
    return f, pristine


def _assert_state(states, got) -> None:  # type: ignore[no-untyped-def]
    epoch, a, kv, length = got
    want = states[epoch]
    assert np.array_equal(a, want["a"]) and length == want["len"]
    assert np.array_equal(kv[:, :length], want["kv"][:, :length])


@pytest.mark.slow
def test_truncation_at_every_byte_of_the_last_record(tmp_path: Path, substrate: Substrate):
    """Cutting the log at any byte of its last record restores the previous epoch exactly."""
    home = tmp_path / "home"
    states, directory = _build(home, substrate)
    seg = list_segments(directory)[1][-1].path
    last_off, last_size = _records(seg)[-1]
    pristine = seg.read_bytes()
    for cut in range(last_off, last_off + last_size):
        seg.write_bytes(pristine[:cut])
        got = _resume_copy(home, tmp_path / "work", substrate)
        assert got[0] == EPOCHS - 1, f"cut at byte {cut}: resumed epoch {got[0]}"
        _assert_state(states, got)
    seg.write_bytes(pristine)
    got = _resume_copy(home, tmp_path / "work", substrate)
    assert got[0] == EPOCHS
    _assert_state(states, got)


def test_truncation_inside_earlier_records_of_the_tail(tmp_path: Path, substrate: Substrate):
    """Cutting inside any record of the last epoch falls back to the epoch before it."""
    home = tmp_path / "home"
    states, directory = _build(home, substrate)
    seg = list_segments(directory)[1][-1].path
    recs = _records(seg)
    pristine = seg.read_bytes()
    commits = [off for off, _ in recs if decode_header(pristine[off:off + HEADER_SIZE]).type.name == "COMMIT"]
    prev_commit_end = next(o + s for o, s in recs if o == commits[-2])
    for cut in range(prev_commit_end, len(pristine), 97):
        seg.write_bytes(pristine[:cut])
        got = _resume_copy(home, tmp_path / "work", substrate)
        assert got[0] == EPOCHS - 1
        _assert_state(states, got)


@pytest.mark.slow
def test_random_bit_flips_never_give_wrong_data(tmp_path: Path, substrate: Substrate):
    """A flipped bit anywhere in a segment either leaves an intact epoch to restore
    or raises CorruptLogError naming the file and a byte offset."""
    home = tmp_path / "home"
    states, directory = _build(home, substrate)
    files = [f.path for f in list_segments(directory)[1]]
    rnd = random.Random(7)
    raised = restored = 0
    for _ in range(120):
        f, pristine = _flip_a_bit(rnd, files)
        try:
            got = _resume_copy(home, tmp_path / "work", substrate)
        except CorruptLogError as e:
            raised += 1
            assert e.path is not None and Path(e.path).name == f.name and e.offset is not None
            assert 0 <= e.offset < len(pristine)
        else:
            restored += 1
            _assert_state(states, got)
        finally:
            f.write_bytes(pristine)
    assert raised > 50  # most flips hit checksummed bytes


def test_damaged_data_of_an_uncommitted_tail_is_never_read(tmp_path: Path, substrate: Substrate):
    """The scan does not read data payloads: a tail epoch whose COMMIT never made
    it (cut before it) and whose data record is also damaged falls back to the
    epoch before it, like any torn tail, instead of failing the open."""
    home = tmp_path / "home"
    states, directory = _build(home, substrate)
    seg = list_segments(directory)[1][-1].path
    recs = _records(seg)
    pristine = seg.read_bytes()
    last_commit = max(off for off, _ in recs if decode_header(pristine[off:off + HEADER_SIZE]).type.name == "COMMIT")
    data_off, data_size = next((o, n) for o, n in reversed(recs) if o < last_commit
                               and decode_header(pristine[o:o + HEADER_SIZE]).type.name in ("PAGES", "ROWS"))
    assert data_size > HEADER_SIZE + 3  # the flip lands in that record's payload
    damaged = bytearray(pristine[:last_commit])
    damaged[data_off + HEADER_SIZE + 3] ^= 0x40
    seg.write_bytes(bytes(damaged))
    got = _resume_copy(home, tmp_path / "work", substrate)
    assert got[0] == EPOCHS - 1
    _assert_state(states, got)


def test_cutting_a_durable_epoch_is_refused_unless_a_rollback_is_asked_for(tmp_path: Path, substrate: Substrate):
    """A log cut inside an epoch the catalog recorded as durable raises CorruptLogError naming the
    epochs it would lose; resume(allow_rollback=True) restores the previous epoch exactly and says
    what it gave up."""
    home = tmp_path / "home"
    states, directory = _build(home, substrate, recorded=EPOCHS)
    seg = list_segments(directory)[1][-1].path
    last_off, _ = _records(seg)[-1]
    seg.write_bytes(seg.read_bytes()[:last_off + 10])
    with pytest.raises(CorruptLogError, match=f"recorded epoch {EPOCHS} as durable.*lose epochs {EPOCHS}..{EPOCHS}"):
        _resume_copy(home, tmp_path / "work", substrate)
    got = _resume_copy(home, tmp_path / "work", substrate, allow_rollback=True)
    assert got[0] == EPOCHS - 1
    _assert_state(states, got)


@pytest.mark.slow
def test_random_bit_flips_salvage_the_newest_intact_epoch(tmp_path: Path, substrate: Substrate):
    """With allow_rollback a flipped bit anywhere in a segment never fails the resume and never gives
    wrong data: the resume restores the newest epoch whose records all lie before the damage."""
    home = tmp_path / "home"
    states, directory = _build(home, substrate, recorded=EPOCHS)
    files = [f.path for f in list_segments(directory)[1]]
    rnd = random.Random(11)
    older = 0
    for _ in range(60):
        f, pristine = _flip_a_bit(rnd, files)
        try:
            got = _resume_copy(home, tmp_path / "work", substrate, allow_rollback=True)
        finally:
            f.write_bytes(pristine)
        _assert_state(states, got)
        older += got[0] < EPOCHS
    assert older > 30  # most flips hit checksummed bytes, and salvage stopped before them
