"""Compaction's base images: a session's state at one epoch, written as one
segment of records (the planner's base-image chunking) ending in a BASE
COMMIT, written to a temporary name, fsynced, then renamed into place.

Two kinds (``_segments``):

* a **full** base image holds every region whole (pages) or up to its
  length (kv rows): the state materialized from the log;
* a **layer** holds only what the delta records after the current base image
  wrote (``planner.layer_spans``: their byte ranges and rows, merged), read
  from those records alone applied onto a zeroed scratch copy; the state is
  its chain's with the layer on top. It costs the tail's bytes where a full
  image costs the whole state (4 GiB for an 8B model's 32k-token context,
  rewritten on every compaction), and it turns thousands of per-token epochs
  into a few large records, which is what keeps a resume's scan and restore
  short (``choose_layer`` says when one is written).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gpu_runtime.host import HostBackend, HostRegion
from gpu_runtime.planner import Span, base_image_spans, layer_spans
from gpu_runtime.records import RecordFlags, RecordType, encode_record, record_size

from ._replay import MAX_CHAIN, LogIndex, PayloadReader, RecordLoc
from ._segments import (
    KIND_BASE,
    KIND_LAYER,
    SEGMENT_HEADER_SIZE,
    SegmentWriter,
    base_name,
    fsync_dir,
    list_segments,
    new_header,
)
from .config import RuntimeConfig

__all__ = ["MAX_LAYERS", "choose_layer", "compaction_due", "superseded", "write_base_image"]

#: layers a chain may hold before compaction writes a full base image again
#: (each costs a scan a file open and its records)
MAX_LAYERS = 64
assert MAX_LAYERS < MAX_CHAIN


def compaction_due(config: RuntimeConfig, delta_bytes: int, epochs: int) -> bool:
    """Compaction's triggers: ``compact_bytes`` of delta records, or more than
    ``compact_epochs`` epochs since the newest base image (a conversation's
    per-token epochs are small and many: their count, not their bytes, is what
    a resume pays for). ``compact_bytes=0`` turns both off."""
    if not config.compact_bytes:
        return False
    return delta_bytes > config.compact_bytes or bool(config.compact_epochs and epochs > config.compact_epochs)


def choose_layer(index: LogIndex) -> bool:
    """Whether compaction of ``index`` writes a layer rather than a full base
    image: it has a base image to lie on, the chain is shorter than
    ``MAX_LAYERS``, no region the chain describes was described again since
    (a layer holds the tail's bytes, laid out by the chain's descriptors), and
    the chain's layers with this one stay smaller than its full root image
    (so a session's base images never take more than twice its state, and
    full rewrites come at geometrically growing intervals)."""
    if index.base is None or not index.chain or len(index.chain) > MAX_LAYERS:
        return False
    if any(index.specs.get(rid) != spec for rid, spec in index.base_specs.items()):
        return False
    root, *layers = (p.stat().st_size for p in index.chain)
    return sum(layers) + _layer_bytes(index) <= root


def _tail(index: LogIndex, rid: int) -> list[RecordLoc]:
    """Region ``rid``'s data records after the base image (those a layer folds)."""
    return [loc for loc in index.records.get(rid, []) if loc.logical >= 0]


def _written(locs: list[RecordLoc]) -> Iterator[tuple[int, int, int]]:
    return ((loc.header.offset, loc.header.length, loc.header.aux) for loc in locs)


def _layer_bytes(index: LogIndex) -> int:
    """The size of the layer of ``index`` (from the record headers alone)."""
    return sum(record_size(span.length) for rid, spec in index.specs.items()
               for span in layer_spans(spec, _written(_tail(index, rid))))


def write_base_image(directory: Path, tag: int, token: int, index: LogIndex, *, layer: bool = False) -> Path:
    """Write the state of ``index`` as a full base image, or with ``layer`` as a
    layer on ``index.base`` (``choose_layer`` must hold); returns its path."""
    host = HostBackend()
    lengths = index.lengths
    parent = index.base_covers if layer else -1
    kind = KIND_LAYER if layer else KIND_BASE
    tmp_name = f".base-{index.end:016x}.tmp{os.getpid()}"
    header = new_header(session_tag=tag, token=token, base=index.end, kind=kind, epoch=index.epoch)
    w = SegmentWriter.create(directory, header, final_name=tmp_name)
    read = PayloadReader()
    try:
        n = 0
        for rid, spec in sorted(index.specs.items()):
            # a layer: the tail's records only (the bytes they wrote are what it holds)
            locs = _tail(index, rid) if layer else index.records.get(rid, [])
            image = HostRegion(spec, np.zeros(spec.nbytes, dtype=np.uint8))  # calloc: untouched pages cost nothing
            for loc in locs:
                host.apply(image, loc.header, read(loc))
            w.append(encode_record(RecordType.REGION, spec.to_json(), session_tag=tag, epoch=index.epoch, region=rid))
            n += 1
            spans: Iterable[Span] = (
                layer_spans(spec, _written(locs)) if layer
                else base_image_spans(spec, int(lengths.get(spec.name, 0))))
            view = image.rows_view() if spec.kind == "kv" else None
            for span in spans:
                if view is None:
                    payload = image.bytes[span.offset:span.offset + span.length]
                else:
                    payload = np.ascontiguousarray(view[:, span.offset:span.offset + span.aux, :])
                w.append(encode_record(span.type, payload, session_tag=tag, epoch=index.epoch, region=rid,
                                       offset=span.offset, aux=span.aux))
                n += 1
        # A layer's commit names its parent (checksummed, unlike the file name that also does)
        w.append(encode_record(RecordType.COMMIT, json.dumps(index.body).encode(), session_tag=tag,
                               epoch=index.epoch, flags=RecordFlags.BASE, aux=n, offset=max(parent, 0)))
        w.sync()
    finally:
        read.close()
        w.close()
    final = directory / base_name(index.end, parent)
    os.replace(directory / tmp_name, final)
    fsync_dir(directory)
    return final


def superseded(directory: Path, written: Path, index: LogIndex, *, layer: bool, token: int,
               current: Path) -> list[Path]:
    """The files a new base image ``written`` (of ``index``, by the owner of
    ``token``) makes unnecessary, in the order to delete them: base images
    outside its chain, newest first (a crash midway leaves each remaining
    layer with the images it lies on); older owners' delta segments (they end
    before this owner's handoff, which it covers); this owner's segments that
    end where it covers or before, never the open one (``current``)."""
    keep = {written, *index.chain} if layer else {written}
    bases, deltas = list_segments(directory)
    out = [f.path for f in reversed(bases) if f.path not in keep]
    return out + [f.path for f in deltas if f.path != current and (
        f.token < token or f.base + f.size - SEGMENT_HEADER_SIZE <= index.end)]
