"""The flusher's walk over a host ring (``verified_span``) against the plain
record-by-record definition it replaced: the same span end, the same last
COMMIT, or the same error, for any records laid anywhere in the ring (across
its wrap point), any damage, any chunk and any published end."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from concordia_agents._ring_verify import check_payload, checked_header, verified_span
from gpu_runtime.errors import CorruptLogError
from gpu_runtime.logring import LogRing
from gpu_runtime.records import _HEADER, HEADER_SIZE, RecordFlags, RecordType, _header_crc, encode_record, record_size

TAG = 0x5EED


def reference_span(ring: LogRing, tag: int, start: int, limit: int, chunk: int) -> tuple[int, tuple[int, int] | None]:
    """The definition: each record's header decoded and checked, then its
    payload summed, in order; stop at the first damaged record (raise if it is
    the first) or before the record that would pass ``chunk``."""
    pos, commit = start, None
    while pos < limit:
        try:
            header = checked_header(ring, tag, pos, limit)
            if pos > start and pos + header.size - start > chunk:
                break
            check_payload(ring, pos, header)
        except CorruptLogError:
            if pos == start:
                raise
            break
        pos += header.size
        if header.type is RecordType.COMMIT:
            commit = (header.epoch, pos)
    return pos, commit


def outcome(fn, *args) -> tuple[str, object]:  # type: ignore[no-untyped-def]
    try:
        return "span", fn(*args)
    except CorruptLogError as e:
        return "error", (str(e), e.offset)


records = st.lists(
    st.tuples(st.sampled_from([RecordType.ROWS, RecordType.COMMIT, RecordType.PAGES]),
              st.one_of(st.integers(0, 300), st.integers(301, 3000)),  # small payloads (token rows, bodies) and rows
              st.sampled_from([2, 2, 2, 1]),  # version 1 records are still read
              st.sampled_from([TAG, TAG, TAG, TAG, TAG + 1])),  # now and then another session's record
    min_size=1, max_size=10)
damage = st.one_of(
    st.none(),
    st.tuples(st.just("header"), st.integers(0, 9), st.integers(0, HEADER_SIZE - 1), st.integers(1, 255)),
    st.tuples(st.just("payload"), st.integers(0, 9), st.integers(0, 3000), st.integers(1, 255)),
    # A header whose checksum is right but whose fields are not: a bad magic, a version or type no
    # reader knows, an unknown flag (which decode_header accepts), the BASE flag, a REGION record.
    st.tuples(st.just("forged"), st.integers(0, 9),
              st.sampled_from(["magic", "version", "type", "flags", "base_flag", "region_type"]), st.just(0)))
CAP = 32768


def forge(header: bytes, what: str) -> bytes:
    """``header`` with one field changed and its header checksum made right again."""
    fields = list(_HEADER.unpack(header))
    if what == "magic":
        fields[0] = b"XNCR"
    elif what == "version":
        fields[1] = 3
    elif what == "type":
        fields[2] = 9
    elif what == "flags":
        fields[3] = 2
    elif what == "base_flag":
        fields[3] = int(RecordFlags.BASE)
    else:
        fields[2] = int(RecordType.REGION)
    raw = _HEADER.pack(*fields[:7], 0, *fields[8:])
    return raw[:28] + struct.pack("<I", _header_crc(raw)) + raw[32:]


@settings(max_examples=400, deadline=None)
@given(records, damage, st.integers(1, 3), st.integers(0, 6000), st.one_of(st.just(1 << 30), st.integers(1, 20000)),
       st.one_of(st.just(0), st.integers(0, 40), st.integers(0, 6000)), st.data())
def test_walk_equals_the_record_by_record_definition(tmp_path_factory, recs, harm, laps, before_wrap, chunk, cut,
                                                     data):
    """Records of both payload sizes and both versions, laid so that the
    ring's end falls among them (headers and payloads straddle it, or start
    or end exactly on it), one optional byte flipped in a header or a payload
    or one header field forged with a valid checksum, spans cut by ``chunk``
    (now and then exactly at a record's end) and the published end moved
    back ``cut`` bytes: ``verified_span`` returns what the definition
    returns, or raises its error."""
    base = laps * CAP - before_wrap
    path = tmp_path_factory.mktemp("walk") / "r.ring"
    ring = LogRing.create(path, capacity=CAP, session_tag=TAG, owner_token=1, base=base)
    try:
        laid: list[tuple[int, int]] = []  # (log offset, payload length) of each record
        pos = base
        for i, (rtype, length, version, tag) in enumerate(recs):
            payload = data.draw(st.binary(min_size=length, max_size=length), label=f"payload {i}")
            rec = encode_record(rtype, payload, session_tag=tag, epoch=i + 1, region=1, aux=i, version=version)
            assert len(rec) == record_size(length)
            ring.write_at(pos, rec)
            laid.append((pos, length))
            pos += len(rec)
        first = data.draw(st.integers(0, len(laid) - 1), label="start")
        if harm is not None:  # a record from the walk's start on (one before it is never read)
            where, j, at, xor = harm
            rpos, length = laid[first + j % (len(laid) - first)]
            if where == "forged":
                ring.write_at(rpos, forge(ring.read(rpos, HEADER_SIZE), at))
            else:
                at = rpos + HEADER_SIZE + at % length if where == "payload" and length else rpos + at % HEADER_SIZE
                b = ring.read(at, 1)[0]
                ring.write_at(at, bytes([b ^ xor]))
        limit = max(base + 1, pos - cut)
        start = laid[first][0]
        if start >= limit:
            start, first = base, 0
        ends = [p + record_size(n) for p, n in laid[first:]]
        if data.draw(st.booleans(), label="chunk at a record's end"):
            chunk = data.draw(st.sampled_from(ends), label="end") - start
        want = outcome(reference_span, ring, TAG, start, limit, chunk)
        got = outcome(verified_span, ring, TAG, start, limit, chunk)
        assert got == want
    finally:
        ring.unlink()


def test_a_damaged_commit_body_cuts_the_span_before_it(tmp_path: Path):
    """A concrete case of the above: three epochs of (rows, COMMIT); epoch 2's
    COMMIT body damaged: the span ends after epoch 1's COMMIT, and a walk
    starting at the damaged record raises naming its offset."""
    ring = LogRing.create(tmp_path / "r.ring", capacity=16384, session_tag=TAG, owner_token=1, base=16000)
    try:
        pos, ends = 16000, []
        for e in (1, 2, 3):
            for rec in (encode_record(RecordType.ROWS, bytes(range(200)) * 5, session_tag=TAG, epoch=e, region=1),
                        encode_record(RecordType.COMMIT, b'{"n": %d}' % e, session_tag=TAG, epoch=e, aux=1)):
                ring.write_at(pos, rec)
                pos += len(rec)
                ends.append(pos)
        commit2 = ends[2]  # epoch 2's COMMIT starts where its rows end
        b = ring.read(commit2 + HEADER_SIZE + 3, 1)[0]
        ring.write_at(commit2 + HEADER_SIZE + 3, bytes([b ^ 1]))
        assert verified_span(ring, TAG, 16000, pos, 1 << 20) == (commit2, (1, ends[1]))
        with pytest.raises(CorruptLogError, match=f"log offset {commit2} .COMMIT, epoch 2. fails its payload"):
            verified_span(ring, TAG, commit2, pos, 1 << 20)
    finally:
        ring.unlink()
