"""Record framing: round trips, and every kind of damage is detected."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_runtime.records import (
    HEADER_SIZE,
    RECORD_ALIGN,
    FramingError,
    RecordType,
    decode_header,
    encode_record,
    header_fields,
    payload_sum,
    record_size,
    session_tag,
)

types = st.sampled_from(list(RecordType))
u64 = st.integers(0, 2**64 - 1)


@given(types, st.binary(max_size=300), u64, st.integers(1, 2**63), st.integers(0, 2**32 - 1), u64, u64)
def test_round_trip(rtype, payload, tag, epoch, region, offset, aux):
    """Any record decodes to the fields and payload it was encoded with."""
    rec = encode_record(rtype, payload, session_tag=tag, epoch=epoch, region=region, offset=offset, aux=aux)
    assert len(rec) == record_size(len(payload)) and len(rec) % RECORD_ALIGN == 0
    h = decode_header(rec)
    assert (h.type, h.session_tag, h.epoch, h.region, h.offset, h.aux, h.length) == (
        rtype, tag, epoch, region, offset, aux, len(payload))
    assert rec[HEADER_SIZE:HEADER_SIZE + h.length] == payload
    assert h.payload_sum == payload_sum(payload)


@settings(max_examples=50)
@given(st.binary(min_size=1, max_size=64), st.data())
def test_every_header_bit_flip_is_detected(payload, data):
    """Flipping any single bit of a header makes it fail to decode (never a wrong header)."""
    rec = bytearray(encode_record(RecordType.PAGES, payload, session_tag=7, epoch=3, offset=4096))
    bit = data.draw(st.integers(0, HEADER_SIZE * 8 - 1))
    rec[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(FramingError) as e:
        decode_header(rec)
    assert not e.value.torn


@given(types, st.binary(max_size=300), u64, st.integers(1, 2**63), st.integers(0, 200), st.data())
def test_header_fields_agree_with_decode_header(rtype, payload, tag, epoch, at, data):
    """The flusher's in-place header check (at any offset of a buffer) returns
    decode_header's fields for a valid header, and None for a damaged one (any
    byte of the 64 changed), which decode_header refuses."""
    rec = encode_record(rtype, payload, session_tag=tag, epoch=epoch)
    h = decode_header(rec)
    buf = bytearray(at) + bytearray(rec[:HEADER_SIZE])
    assert header_fields(memoryview(buf), at) == (int(h.type), h.version, h.session_tag, h.epoch, h.length,
                                                   h.payload_sum)
    i = data.draw(st.integers(0, HEADER_SIZE - 1))
    buf[at + i] ^= data.draw(st.integers(1, 255))
    assert header_fields(memoryview(buf), at) is None
    with pytest.raises(FramingError):
        decode_header(bytes(buf[at:]))


@given(st.integers(0, HEADER_SIZE - 1))
def test_short_header_is_torn(n):
    """A header cut short reads as torn, not as corruption."""
    rec = encode_record(RecordType.COMMIT, b"{}", session_tag=1, epoch=1)
    with pytest.raises(FramingError) as e:
        decode_header(rec[:n])
    assert e.value.torn


def test_zero_bytes_are_torn():
    """A zero-filled header (a file extended but never written) reads as torn."""
    with pytest.raises(FramingError) as e:
        decode_header(bytes(HEADER_SIZE))
    assert e.value.torn


def test_session_tag_is_stable():
    """The session tag is a fixed function of the ID (it is stored on disk)."""
    assert session_tag("chat-42") == session_tag("chat-42") != session_tag("chat-43")
    assert session_tag("chat-42") == 0x8C5EA024010201DB  # pinned: changing it orphans every log
