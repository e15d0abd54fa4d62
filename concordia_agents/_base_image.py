"""Compaction's base images: a session's state at one epoch, written as one
segment of records (the planner's base-image chunking) ending in a BASE
COMMIT, written to a temporary name, fsynced, then renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gpu_runtime.host import HostBackend, HostRegion
from gpu_runtime.planner import base_image_spans
from gpu_runtime.records import RecordFlags, RecordType, encode_record

from ._replay import LogIndex, PayloadReader
from ._segments import KIND_BASE, SegmentWriter, base_name, fsync_dir, new_header

__all__ = ["write_base_image"]


def write_base_image(directory: Path, tag: int, token: int, index: LogIndex) -> Path:
    """Materialize the state of ``index`` (on the host) and write it as a base image."""
    host = HostBackend()
    lengths = index.lengths
    tmp_name = f".base-{index.end:016x}.tmp{os.getpid()}"
    header = new_header(session_tag=tag, token=token, base=index.end, kind=KIND_BASE, epoch=index.epoch)
    w = SegmentWriter.create(directory, header, final_name=tmp_name)
    read = PayloadReader()
    try:
        n = 0
        for rid, spec in sorted(index.specs.items()):
            image = HostRegion(spec, np.zeros(spec.nbytes, dtype=np.uint8))
            for loc in index.records.get(rid, []):
                host.apply(image, loc.header, read(loc))
            w.append(encode_record(RecordType.REGION, spec.to_json(), session_tag=tag, epoch=index.epoch, region=rid))
            n += 1
            view = image.rows_view() if spec.kind == "kv" else None
            for span in base_image_spans(spec, int(lengths.get(spec.name, 0))):
                if view is None:
                    payload = image.bytes[span.offset:span.offset + span.length]
                else:
                    payload = np.ascontiguousarray(view[:, span.offset:span.offset + span.aux, :])
                w.append(encode_record(span.type, payload, session_tag=tag, epoch=index.epoch, region=rid,
                                       offset=span.offset, aux=span.aux))
                n += 1
        w.append(encode_record(RecordType.COMMIT, json.dumps(index.body).encode(), session_tag=tag,
                               epoch=index.epoch, flags=RecordFlags.BASE, aux=n))
        w.sync()
    finally:
        read.close()
        w.close()
    final = directory / base_name(index.end)
    os.replace(directory / tmp_name, final)
    fsync_dir(directory)
    return final
