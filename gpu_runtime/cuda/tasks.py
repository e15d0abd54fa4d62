"""Typed task descriptors: one definition per task kind of the persistent executor.

A task slot (TASK_VERSION 1, 128 bytes, ``kernels/concordia.cuh`` ``CncTask``)
is ``u64 seq, u32 kind, u32 handler, u64 a[14]``. What each of the 14 argument
words means depends on the kind; this module is the one place that says so.
Each ``TaskLayout`` names its fields (word, and for packed fields the half of
the word), packs them for the producer (``layout.pack(...)`` returns the 14
words ``Executor.enqueue`` stores) and unpacks them for tests and debugging.

The device reads the same fields through accessor macros generated from these
layouts into ``kernels/tasks.cuh`` (``python -m gpu_runtime.cuda.tasks``
rewrites it; ``tests/test_tasks.py`` fails when the file and this module
differ, and checks every accessor field by field by compiling the header as
host C++). The kernels name fields only through those macros, so a layout
change is one edit here plus a regeneration, never two hand-kept mirrors.

Groups shared by several kinds sit at fixed words so that the executor's loop
can read them without knowing the kind: the stream fence prologue
(``a8..a10``) of data tasks, the publish epilogue (``a11``, ``a12``) of
CHECKPOINT tasks, and the operator-table region (``a13``) of handler tasks.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "LAYOUTS",
    "TASK_ARGS",
    "TASK_VERSION",
    "Field",
    "TaskKind",
    "TaskLayout",
    "accessor",
    "render_header",
]

TASK_VERSION = 1  #: slot layout; bump with any change of word meaning
TASK_ARGS = 14  #: argument words per slot


class TaskKind:
    """Task kinds (``enum CncTaskKind`` in the generated header)."""

    NOP = 0
    FENCE_WAIT = 1
    CHECKPOINT = 2
    APPEND_LOG = 3
    RECOVER = 4
    SCAN = 5
    COMPUTE = 6
    CHECKPOINT_COMMIT = 7  #: a kv CHECKPOINT that also makes its epoch's COMMIT header
    SCAN_COMMIT = 8  #: a whole pages epoch on the device: scan, dirty-run records, COMMIT, publish


class Field(NamedTuple):
    """One argument field: word ``a<word>``, the whole word (``half`` None),
    or its low (``"lo"``) or high (``"hi"``) 32 bits."""

    name: str
    word: int
    doc: str
    half: str | None = None
    optional: bool = False  #: may be left out of ``pack`` (then 0)

    def expr(self, t: str) -> str:
        """C expression reading this field from task ``t``."""
        w = f"({t}).a[{self.word}]"
        if self.half == "lo":
            return f"({w} & 0xFFFFFFFFull)"
        if self.half == "hi":
            return f"({w} >> 32)"
        return f"({w})"


FENCE = (
    Field("fence_word", 8, "device u64 the caller's stream writes (0 with fence_value 0: no fence)", optional=True),
    Field("fence_value", 9, "value the fence word must reach; 0: no fence", optional=True),
    Field("fence_timeout_ns", 10, "fence wait timeout, counted across yields", optional=True),
)
PUBLISH = (
    Field("publish_written", 11, "new ring `written` once the task's records are visible (0: none)", optional=True),
    Field("publish_epoch", 12, "with publish_written: also publish this committed epoch (0: data only)",
          optional=True),
)
REGION = (Field("region", 13, "operator-table index of the region"),)


class TaskLayout:
    """The fields of one task kind (``variant`` tells layouts of one kind
    apart, e.g. CHECKPOINT of a kv and of a pages handler)."""

    def __init__(self, name: str, kind: int, doc: str, fields: Sequence[Field]) -> None:
        self.name, self.kind, self.doc = name, kind, doc
        self.fields = tuple(fields)
        taken: dict[tuple[int, str], str] = {}  # (word, half) -> field
        for f in self.fields:
            if not 0 <= f.word < TASK_ARGS:
                raise ValueError(f"{name}.{f.name}: expected a word in 0..{TASK_ARGS - 1}, found {f.word}")
            for key in [(f.word, h) for h in ((f.half,) if f.half else ("lo", "hi"))]:
                if key in taken:
                    raise ValueError(f"{name}.{f.name} overlaps {name}.{taken[key]} in a{f.word}")
                taken[key] = f.name
        self.pack = self._make_packer()

    def _make_packer(self) -> Any:
        """``pack(**fields) -> tuple`` of the 14 words, compiled once (like
        ``collections.namedtuple``): the per-token commit path packs a few
        tasks per token, and a generic loop over fields costs several times
        more. Half-word fields wider than 32 bits raise ``ValueError``."""
        required = [f.name for f in self.fields if not f.optional]
        optional = [f"{f.name}=0" for f in self.fields if f.optional]
        words = []
        for w in range(TASK_ARGS):
            parts = [f for f in self.fields if f.word == w]
            if not parts:
                words.append("0")
            elif parts[0].half is None:
                words.append(parts[0].name)
            else:
                words.append(" | ".join(f.name if f.half == "lo" else f"{f.name} << 32" for f in parts))
        halves = [f.name for f in self.fields if f.half is not None]
        check = (f"    if ({' | '.join(halves)}) >> 32:\n"
                 f"        raise ValueError(_too_wide({self.name!r}, locals()))\n") if halves else ""
        params = ", ".join(["*", *required, *optional])
        src = f"def pack({params}):\n{check}    return ({', '.join(words)},)\n"
        namespace: dict[str, Any] = {"_too_wide": _too_wide}
        exec(compile(src, f"<task layout {self.name}>", "exec"), namespace)  # source made from the fields above
        pack = namespace["pack"]
        pack.__doc__ = f"Pack a {self.name} task: {', '.join(f.name for f in self.fields)}."
        return pack

    def unpack(self, words: Sequence[int]) -> dict[str, int]:
        """Field values of a slot's argument words."""
        out = {}
        for f in self.fields:
            w = int(words[f.word])
            out[f.name] = w & 0xFFFFFFFF if f.half == "lo" else w >> 32 if f.half == "hi" else w
        return out

    def __repr__(self) -> str:
        return f"<TaskLayout {self.name} kind={self.kind} {[f.name for f in self.fields]}>"


def _too_wide(layout: str, values: dict[str, Any]) -> str:
    bad = {f.name: values[f.name] for f in LAYOUTS[layout].fields if f.half and int(values[f.name]) >> 32}
    return f"{layout}: expected 32-bit values in half-word fields, found {bad}"


_KV_HEAD = (
    Field("data", 0, "ring data area (device address of the mapped ring)"),
    Field("capacity", 1, "ring data capacity in bytes"),
    Field("epoch", 2, "epoch of the records"),
    Field("t0", 3, "first row", half="lo"),
    Field("t1", 4, "end row (exclusive)", half="lo"),
    Field("per", 5, "rows per record (planner.rows_per_record)", half="lo"),
    Field("log0", 6, "log offset of the first record; record k at log0 + k * record_size(per rows)"),
    Field("tag", 7, "session tag"),
)

LAYOUTS: dict[str, TaskLayout] = {lay.name: lay for lay in (
    TaskLayout("NOP", TaskKind.NOP, "out[index] += 1 (tests)", (
        Field("out", 0, "device u64 array"), Field("index", 1, "word to increment"))),
    TaskLayout("FENCE_WAIT", TaskKind.FENCE_WAIT, "wait until *word >= value (yields like the prologue)", (
        Field("word", 0, "device u64"), Field("value", 1, "value to reach"),
        Field("timeout_ns", 2, "timeout, counted across yields"))),
    TaskLayout("CHECKPOINT_KV", TaskKind.CHECKPOINT,
               "kv handler: rows [t0, t1) of the region as ROWS records at log0 (planner chunking)",
               (*_KV_HEAD, *FENCE, *PUBLISH, *REGION)),
    TaskLayout("CHECKPOINT_COMMIT", TaskKind.CHECKPOINT_COMMIT,
               "CHECKPOINT_KV that then makes its epoch's COMMIT header (body stored by the host) and publishes; "
               "the COMMIT record ends at publish_written", (
                   *_KV_HEAD,
                   Field("commit_records", 3, "data records of the epoch (the COMMIT's aux)", half="hi"),
                   Field("commit_offset", 4, "bytes from the epoch's first record to the COMMIT record", half="hi"),
                   Field("body_len", 5, "COMMIT body bytes", half="hi"),
                   *FENCE, *PUBLISH, *REGION)),
    TaskLayout("CHECKPOINT_PAGES", TaskKind.CHECKPOINT,
               "pages handler: copy a table of dirty runs as PAGES records", (
                   Field("data", 0, "ring data area"), Field("capacity", 1, "ring data capacity"),
                   Field("epoch", 2, "epoch of the records"),
                   Field("runs", 3, "mapped pinned u64 triples: byte offset, bytes, log offset"),
                   Field("nruns", 4, "runs in the table"), Field("tag", 5, "session tag"),
                   Field("small", 6, "1: every run at most 256 KiB (a block per run); 0: the grid per run"),
                   *FENCE, *PUBLISH, *REGION)),
    TaskLayout("APPEND_LOG", TaskKind.APPEND_LOG,
               "publish bytes the host stored beyond `written`; with body_len, make the COMMIT header there", (
                   Field("ring", 0, "ring header (device address); data follows at +4096"),
                   Field("written", 1, "new `written`"),
                   Field("epoch", 2, "commit epoch (0: publish data only)"),
                   Field("commit_at", 3, "log offset of the COMMIT record", optional=True),
                   Field("body_len", 4, "COMMIT body bytes (0: the host made the header)", optional=True),
                   Field("epoch_start", 5, "log offset of the epoch's first record", optional=True),
                   Field("nrecords", 6, "data records of the epoch", optional=True),
                   Field("tag", 7, "session tag", optional=True),
                   Field("capacity", 8, "ring data capacity", optional=True))),
    TaskLayout("RECOVER", TaskKind.RECOVER, "apply one record whose payload is at src", (
        Field("src", 0, "payload (mapped pinned or device memory)"), Field("type", 1, "record type"),
        Field("offset", 2, "record offset field"), Field("aux", 3, "record aux field"),
        Field("length", 4, "payload bytes"), *REGION)),
    TaskLayout("SCAN", TaskKind.SCAN, "pages handler: hash every page, write the dirty bitmap", (
        Field("all_dirty", 0, "1: mark every page dirty"), *FENCE, *REGION)),
    TaskLayout("COMPUTE", TaskKind.COMPUTE, "small device ops for tests (cnc_compute)", (
        Field("op", 0, "0 fill u32, 1 axpy f32, 2 scale f32"), Field("n", 1, "elements"),
        Field("x", 2, "op 0: pointer; 1, 2: alpha bits"), Field("y", 3, "op 0: value; 1: x; 2: pointer"),
        Field("z", 4, "op 1: y", optional=True))),
    TaskLayout("SCAN_COMMIT", TaskKind.SCAN_COMMIT,
               "a whole pages epoch: scan, plan and copy the dirty runs into [log0, log0 + span), COMMIT, publish", (
                   Field("data", 0, "ring data area"), Field("capacity", 1, "ring data capacity"),
                   Field("epoch", 2, "epoch"), Field("log0", 3, "log offset of the reserved span"),
                   Field("span", 4, "bytes reserved (data records and COMMIT)"), Field("tag", 5, "session tag"),
                   Field("per", 6, "pages per record (planner.pages_per_record)", half="lo"),
                   Field("body_len", 6, "COMMIT body bytes", half="hi"),
                   Field("scratch", 7, "device scratch: records, end, overflow, chunks, then the record table"),
                   *FENCE,
                   Field("body", 11, "COMMIT body (mapped pinned, zero-padded to whole words)"),
                   Field("result", 12, "mapped pinned u64[2]: status (1 committed, 2 did not fit), end"),
                   *REGION)),
)}

#: field groups at fixed words, named once in the header
_GROUPS = {"FENCE": FENCE, "PUBLISH": PUBLISH, "TASK": REGION}
_HEADER_PATH = Path(__file__).with_name("kernels") / "tasks.cuh"


def accessor(layout: TaskLayout, field: Field) -> str:
    """The name of the header's accessor macro of ``field`` in ``layout``."""
    for group, fields in _GROUPS.items():
        if field in fields:
            return f"CNC_{group}_{field.name.upper().removeprefix(group + '_')}"
    return f"CNC_{layout.name}_{field.name.upper()}"


def render_header() -> str:
    """The text of ``kernels/tasks.cuh``."""
    lines = [
        "// GENERATED from gpu_runtime/cuda/tasks.py by `python -m gpu_runtime.cuda.tasks`: do not edit.",
        "// Accessors of task argument fields; the kernels name fields only through these.",
        "#pragma once",
        "",
        f"#define CNC_TASK_VERSION {TASK_VERSION}",
        "",
        "enum CncTaskKind {",
    ]
    kinds = {v: k for k, v in vars(TaskKind).items() if k.isupper()}
    lines += [f"    CNC_T_{kinds[k]} = {k}," for k in sorted(kinds)]
    lines += ["};", ""]
    for group, fields in _GROUPS.items():
        lines.append(f"// {group} fields, at the same words in every kind that has them")
        lines += [f"#define {accessor(LAYOUTS['CHECKPOINT_KV'], f)}(t) {f.expr('t')}  // {f.doc}" for f in fields]
        lines.append("")
    grouped = {f for fs in _GROUPS.values() for f in fs}
    for lay in LAYOUTS.values():
        lines.append(f"// {lay.name} (kind {lay.kind}): {lay.doc}")
        lines += [f"#define {accessor(lay, f)}(t) {f.expr('t')}  // {f.doc}" for f in lay.fields if f not in grouped]
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate (or --check) kernels/tasks.cuh from the task layouts.")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs instead of writing it")
    args = p.parse_args(argv)
    text = render_header()
    if args.check:
        current = _HEADER_PATH.read_text() if _HEADER_PATH.exists() else ""
        if current != text:
            sys.stderr.write(f"{_HEADER_PATH} is out of date: run python -m gpu_runtime.cuda.tasks\n")
            return 1
        return 0
    _HEADER_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
