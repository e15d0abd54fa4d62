"""PTX parsing and rewriting: a pause gate at each kernel entry, a completion
hook at each kernel exit.

The parser knows the part of PTX it needs and no more: a lexer (comments,
strings, identifiers, numbers, punctuation) and, on its tokens, the module
header (``.version``, ``.target``, ``.address_size``), the ``.entry`` and
``.func`` definitions with their brace-matched bodies, and within a body the
statements (``[label:] [@[!]pred] opcode operands ;``). Everything else is
copied byte for byte.

Rewrite of each ``.entry`` (``instrument(ptx, kernel_ids)``):

1. Module scope: ``.visible .const .u64 __concordia_ctl`` — the address of the
   control block (``CTL_*`` below), 0 until the runtime sets it after loading
   the module; with 0 the hooks do nothing. (In the constant bank: every
   block of every launch reads it, and a constant-cache hit costs no trip to
   L2.) One ``.shared .u32`` exit counter per entry.
2. Entry (pause gate), per *launch*: thread (0,0,0) of each block zeroes the
   block's exit counter and finds its launch's slot: ``%gridid`` mod 1024 (its
   index is kept in shared memory for the exit). Grid IDs number the context's
   launches in order (checked on the H100: ``bench/results/gridid_gpu-20261127T2353Z.json``), so
   launches in flight together get different slots unless one is 1024 launches
   older than the other; a block that finds its slot held by such a launch
   waits until it finishes (counting a gate timeout every timeout period). The
   slot is fixed per launch on purpose: an earlier version probed on to the
   next free slot, and a launch's later blocks, arriving after the launch that
   had been in the way finished, found that earlier slot free and claimed a
   second one — the launch then never completed (found by the 70 001-block
   launches of the completion test). The first block to find the slot free
   claims it with a CAS and admits the launch with one ``atom.add`` of 1 on the
   64-bit admission word, whose low half counts admitted launches and whose
   high half is the pause word: if the value it returns has the pause set, it
   backs out (adds -1) and waits (``nanosleep``, reading the pause) until it
   clears or the control block's timeout passes (then it counts a gate timeout
   and runs anyway: the runtime turns that into an error rather than hang).
   Then it marks the slot admitted. Every other block of the launch waits for
   that mark. ``bar.sync 0`` then releases the block's other threads. A launch
   thus runs all of its blocks or none while paused. The first read of the slot
   is a weak, L1-cacheable load (``ld.global.ca``): the blocks of a many-block
   launch mostly find their slot, admitted, in their SM's L1 instead of making
   a trip to L2 each. Only that answer is taken from the cache, and no stale
   copy can give it falsely: grid IDs are never reused, and a slot holds a
   launch's ID from the claim until the launch's last block exits, which this
   block has not, so a copy showing this launch admitted was true and still is.
   Any other cached answer goes to an authoritative read — the CAS when the
   slot looked free, an acquire load of the same slot when it showed another
   launch or this launch not yet admitted. Those loads are ``ld.acquire.gpu``,
   not volatile, because an acquire also invalidates the SM's L1
   (``CCTL.IVALL`` after the load on sm_90): the SM's next block then reads the
   slot afresh instead of finding the stale copy again. (Volatile loads and an
   explicit ``fence.acq_rel.gpu`` at the end of the slow path, tried first, add
   a ``MEMBAR`` to every first-wave block: the grid-stride copy measured +2.04
   % with it against +1.63 % for the previous rewrite in the same run.) The
   quiesce is exact because the count and the pause share one location: the
   host's write of the pause half and the launches' atomic adds are ordered in
   that word's coherence order, so an add either precedes the write (the launch
   is counted and the host waits for it) or follows it (the add returns the
   pause and the launch backs out) — no fence needed, one round trip to L2 per
   launch. (The host writes only the high half and the count never carries into
   it: the adds are balanced and the count stays far below 2^32. That a 4-byte
   copy-engine write and a 64-bit atomic on the word do not lose each other's
   update is what L2 provides, not what the PTX memory model promises for mixed
   sizes; ``tests/test_instrument_gpu.py`` hammers the word while the host
   toggles the pause and checks both.)
3. Exits: every ``ret`` / ``exit`` of the entry (predicated or not) becomes a
   branch to one exit block. If the body has no thread barriers, a
   ``bar.sync 0`` there gathers the block (every thread arrives, none waits
   elsewhere) and thread 0 counts it with ``atom.release.gpu``, which releases
   the block's writes (a ``MEMBAR`` before the atomic) without the L1
   invalidation of ``fence.acq_rel.gpu`` that would evict the gate's cached
   slot; the block that completes a count then fences with
   ``fence.acq_rel.gpu`` (acquiring what the others released) before it counts
   on. Otherwise each thread fences its writes (``fence.release.gpu`` where the
   PTX is ISA 8.6+ for sm_90+, else ``fence.acq_rel.gpu``) and, per warp, the
   highest active lane adds the warp's active lane count to the block's shared
   exit counter (threads may leave at different barriers' sides, so no barrier
   can gather them); the warp that completes the block's count counts the block
   in one of its launch's 64 sub-counters (block id & 63, each in its own L2
   sector: a quarter million blocks arriving at one address would serialize;
   launches of at most 64 blocks skip this level); the block that completes a
   sub-counter counts it in the slot, and the block that completes the slot's
   count — the last of the launch — bumps ``completions[kernel_id]``, leaves
   ``active`` and frees the slot. A counter therefore equals the number of
   finished launches of that kernel, whatever the streams, grid shapes or
   concurrency.

Limits (documented, detected where possible): kernels that exit from a called
``.func`` (``exit`` inside a function) are reported and left uncounted; an
instrumented launch waits while its slot is held by an instrumented launch
1024·k grid IDs older (any kernel launch in the context takes a grid ID), so
a kernel that waits for a launch started 1024 launches after it can
deadlock; PTX older than ISA 7.0 or targets below sm_70 are refused
(``nanosleep``, ``activemask``).

Size (over the project's ~500 lines): one rewrite pass whose parser, hook
templates and insertion share the parsed module; the PTX it emits was pinned by
GPU runs, so it stays in one place rather than split for line count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ConcordiaError

__all__ = [
    "CTL_ADMIT",
    "CTL_BYTES",
    "CTL_COMPLETIONS",
    "CTL_GATE_TIMEOUTS",
    "CTL_MAGIC",
    "CTL_MAX_KERNELS",
    "CTL_PAUSE",
    "CTL_SLOTS",
    "CTL_SLOT_COUNT",
    "CTL_TIMEOUT_NS",
    "CTL_VERSION",
    "CTL_WORD",
    "REWRITE_VERSION",
    "Entry",
    "PtxError",
    "PtxModule",
    "instrument",
    "parse",
]

REWRITE_VERSION = 3

# Control block (device memory, one per device), little-endian:
#   0  u32 magic "CCIN"   4  u32 version
#  16  u64 gate timeout in ns (globaltimer)
#  24  u64 gate timeouts so far
#  64  u64 admission word: low 32 bits the admitted, unfinished launches;
#      high 32 bits (offset 68) the pause word (non-zero: gates hold new launches).
#      One word, so that one atomic add both counts a launch and reads the pause.
# 1024 {u64 gridid, u32 finished sub-counters, u32 admitted}[1024]: launch slots, gridid mod 1024
# 17408 u64 completions[CTL_MAX_KERNELS]: finished launches per kernel ID
# 148480 u32 sub[1024][64] at a 256-byte stride: blocks exited per (slot, block id & 63)
CTL_MAGIC = 0x4E494343  # "CCIN"
CTL_VERSION = 3
CTL_TIMEOUT_NS = 16
CTL_GATE_TIMEOUTS = 24
CTL_ADMIT = 64
CTL_PAUSE = CTL_ADMIT + 4  #: the admission word's high half
CTL_SLOTS = 1024
CTL_SLOT_COUNT = 1024  #: launch slots: launch %gridid's is gridid mod 1024
CTL_COMPLETIONS = CTL_SLOTS + 16 * CTL_SLOT_COUNT
CTL_MAX_KERNELS = 16384
CTL_SUB_COUNTERS = 64  #: arrival sub-counters per slot (block id & 63)
CTL_SUB_STRIDE = 256  #: bytes between sub-counters: separate L2 sectors, so arrivals do not serialize
CTL_SUBS = CTL_COMPLETIONS + 8 * CTL_MAX_KERNELS
CTL_BYTES = CTL_SUBS + CTL_SLOT_COUNT * CTL_SUB_COUNTERS * CTL_SUB_STRIDE
assert CTL_SUBS % CTL_SUB_STRIDE == 0
CTL_WORD = "__concordia_ctl"


class PtxError(ConcordiaError):
    """PTX the rewriter cannot parse or must refuse; names the offset."""


# -- lexer ----------------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<lcomment>//[^\n]*)
  | (?P<bcomment>/\*.*?\*/)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<num>0[xX][0-9a-fA-F]+U?|0[fFdD][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?U?)
  | (?P<ident>[.%$_A-Za-z][\w.$%]*)
  | (?P<punct>[{}()\[\];:,@!<>+\-=|*/&^~?])
""", re.VERBOSE | re.DOTALL)


@dataclass(frozen=True, slots=True)
class Tok:
    kind: str
    text: str
    start: int
    end: int


def tokens(text: str) -> list[Tok]:
    out: list[Tok] = []
    pos, n = 0, len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            raise PtxError(f"PTX: unexpected character {text[pos]!r} at offset {pos}")
        kind = m.lastgroup or ""
        if kind not in ("ws", "lcomment", "bcomment"):
            out.append(Tok(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return out


# -- structure --------------------------------------------------------------------------------


@dataclass(slots=True)
class Exit:
    start: int  #: offset of the statement (its guard, if any)
    end: int  #: offset past its ';'
    guard: str  #: "" or e.g. "@%p1" / "@!%p1"
    opcode: str  #: "ret", "ret.uni", "exit"


@dataclass(slots=True)
class Entry:
    name: str
    body_open: int  #: offset of '{'
    body_close: int  #: offset of the matching '}'
    exits: list[Exit] = field(default_factory=list)
    barriers: bool = False  #: the body synchronizes threads (bar.*, barrier.*, mbarrier.*)


@dataclass(slots=True)
class PtxModule:
    text: str
    version: tuple[int, int]
    target: str
    header_end: int  #: where module-scope declarations may be inserted
    entries: list[Entry]
    funcs_with_exit: list[str]
    instrumented: bool  #: already carries the Concordia hooks


def _match(toks: list[Tok], i: int, open_: str, close: str) -> int:
    """Index of the token closing the bracket opened at ``toks[i]``."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].text == open_:
            depth += 1
        elif toks[j].text == close:
            depth -= 1
            if depth == 0:
                return j
    raise PtxError(f"PTX: {open_!r} at offset {toks[i].start} is never closed")


def _statements(toks: list[Tok], lo: int, hi: int) -> list[tuple[int, int]]:
    """``(first, last)`` token indices of each statement in ``toks[lo:hi]``
    (labels and braces separate statements; ``last`` is the ';')."""
    out = []
    i = lo
    while i < hi:
        t = toks[i]
        if t.text in "{}":  # a nested scope (call sequences); braces later in a statement are vector operands
            i += 1
            continue
        if t.kind == "ident" and i + 1 < hi and toks[i + 1].text == ":":  # a label
            i += 2
            continue
        j = i
        while j < hi and toks[j].text != ";":
            j += 1
        if j >= hi:
            raise PtxError(f"PTX: statement at offset {t.start} has no ';' before the end of its body")
        out.append((i, j))
        i = j + 1
    return out


def _opcode(toks: list[Tok], first: int) -> tuple[str, str]:
    """(guard text, opcode) of a statement."""
    i = first
    guard = ""
    if toks[i].text == "@":
        neg = toks[i + 1].text == "!"
        reg = toks[i + 2 if neg else i + 1]
        guard = "@" + ("!" if neg else "") + reg.text
        i += 3 if neg else 2
    return guard, toks[i].text if i < len(toks) else ""


def _is_exit(opcode: str) -> bool:
    return opcode.split(".")[0] in ("ret", "exit")


def parse(text: str) -> PtxModule:
    toks = tokens(text)
    version: tuple[int, int] | None = None
    target = ""
    header_end = -1
    entries: list[Entry] = []
    funcs_with_exit: list[str] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t.text == ".version" and i + 1 < len(toks):
            major, _, minor = toks[i + 1].text.partition(".")
            version = (int(major), int(minor or 0))
            header_end = max(header_end, toks[i + 1].end)
        elif t.text == ".target" and i + 1 < len(toks):
            target = toks[i + 1].text
            j = i + 1
            while j + 2 < len(toks) and toks[j + 1].text == ",":  # .target sm_90, debug
                j += 2
            header_end = max(header_end, toks[j].end)
        elif t.text == ".address_size" and i + 1 < len(toks):
            header_end = max(header_end, toks[i + 1].end)
        elif t.text in (".entry", ".func"):
            name_i = i + 1
            if t.text == ".func" and toks[name_i].text == "(":  # .func (.param .b32 retval) name(...)
                name_i = _match(toks, name_i, "(", ")") + 1
            name = toks[name_i].text
            j = name_i + 1
            if j < len(toks) and toks[j].text == "(":
                j = _match(toks, j, "(", ")") + 1
            while j < len(toks) and toks[j].text not in ("{", ";"):
                j += 1  # performance directives: .maxntid 256, 1, 1 ...
            if j >= len(toks) or toks[j].text == ";":
                i = j + 1  # a declaration (prototype), no body
                continue
            close = _match(toks, j, "{", "}")
            exits = []
            barriers = False
            for first, last in _statements(toks, j + 1, close):
                guard, op = _opcode(toks, first)
                if _is_exit(op):
                    exits.append(Exit(toks[first].start, toks[last].end, guard, op))
                barriers |= op.split(".")[0] in ("bar", "barrier", "mbarrier")
            if t.text == ".entry":
                entries.append(Entry(name, toks[j].start, toks[close].start, exits, barriers))
            elif any(e.opcode.split(".")[0] == "exit" for e in exits):
                funcs_with_exit.append(name)  # ends the thread inside a call: invisible to the exit hook
            i = close + 1
            continue
        i += 1
    if version is None:
        raise PtxError("PTX: expected a .version directive, found none")
    if header_end < 0:
        raise PtxError("PTX: expected .version/.target directives before the first definition")
    instrumented = any(t.text == CTL_WORD for t in toks)
    return PtxModule(text, version, target, header_end, entries, funcs_with_exit, instrumented)


# -- rewrite ----------------------------------------------------------------------------------

_REGS = """
\t// concordia: pause gate and completion hook registers
\t.reg .pred \t%__cc_p<4>;
\t.reg .b32 \t%__cc_r<11>;
\t.reg .b64 \t%__cc_d<12>;
"""

_REGS_SINGLE = _REGS.replace("%__cc_p<4>", "%__cc_p<5>")  # the fast path's launch-shape predicate


def _not_thread0(label: str) -> str:
    """PTX: threads other than (0,0,0) of the block branch to ``label``."""
    return f"""\tmov.u32 \t%__cc_r0, %tid.x;
\tmov.u32 \t%__cc_r1, %tid.y;
\tor.b32 \t%__cc_r0, %__cc_r0, %__cc_r1;
\tmov.u32 \t%__cc_r1, %tid.z;
\tor.b32 \t%__cc_r0, %__cc_r0, %__cc_r1;
\tsetp.ne.u32 \t%__cc_p1, %__cc_r0, 0;
\t@%__cc_p1 bra \t{label};
"""


_GATE = """
\t// concordia: pause gate (thread 0 of each block; see gpu_runtime/ptx.py)
\tld.const.u64 \t%__cc_d0, [{ctl}];
\tsetp.eq.u64 \t%__cc_p0, %__cc_d0, 0;
\t@%__cc_p0 bra \t$__cc_body;
{not_thread0_to_sync}\tmov.u32 \t%__cc_r2, 0;
\tst.shared.u32 \t[{exits}], %__cc_r2;
{single_gate}\tmov.u64 \t%__cc_d5, %gridid;
\tand.b64 \t%__cc_d6, %__cc_d5, {slot_mask};
\tshl.b64 \t%__cc_d7, %__cc_d6, 4;
\tadd.u64 \t%__cc_d7, %__cc_d7, %__cc_d0;
\tmov.u64 \t%__cc_d2, 0;
\tld.global.ca.v2.u64 \t{{%__cc_d8, %__cc_d9}}, [%__cc_d7+{slots}];
\tsetp.eq.u64 \t%__cc_p2, %__cc_d8, 0;
\t@%__cc_p2 bra \t$__cc_claim;
\tsetp.ne.u64 \t%__cc_p2, %__cc_d8, %__cc_d5;
\t@%__cc_p2 bra \t$__cc_probe;
\tshr.u64 \t%__cc_d9, %__cc_d9, 32;
\tsetp.ne.u64 \t%__cc_p2, %__cc_d9, 0;
\t@%__cc_p2 bra \t$__cc_go;
\tbra.uni \t$__cc_follow_start;
$__cc_probe:
\tld.acquire.gpu.global.v2.u64 \t{{%__cc_d8, %__cc_d9}}, [%__cc_d7+{slots}];
\tsetp.eq.u64 \t%__cc_p2, %__cc_d8, %__cc_d5;
\t@%__cc_p2 bra \t$__cc_mine;
\tsetp.eq.u64 \t%__cc_p2, %__cc_d8, 0;
\t@%__cc_p2 bra \t$__cc_claim;
\tsetp.ne.u64 \t%__cc_p3, %__cc_d2, 0;
\t@%__cc_p3 bra \t$__cc_held;
\tmov.u64 \t%__cc_d2, %globaltimer;
\tld.global.u64 \t%__cc_d4, [%__cc_d0+{timeout_ns}];
$__cc_held:
\tnanosleep.u32 \t1000;
\tmov.u64 \t%__cc_d3, %globaltimer;
\tsub.u64 \t%__cc_d3, %__cc_d3, %__cc_d2;
\tsetp.le.u64 \t%__cc_p3, %__cc_d3, %__cc_d4;
\t@%__cc_p3 bra \t$__cc_probe;
\tred.global.add.u64 \t[%__cc_d0+{gate_timeouts}], 1;
\tmov.u64 \t%__cc_d2, %globaltimer;
\tbra.uni \t$__cc_probe;
$__cc_claim:
\tatom.global.cas.b64 \t%__cc_d8, [%__cc_d7+{slots}], 0, %__cc_d5;
\tsetp.eq.u64 \t%__cc_p2, %__cc_d8, 0;
\t@%__cc_p2 bra \t$__cc_admit;
\tsetp.eq.u64 \t%__cc_p2, %__cc_d8, %__cc_d5;
\t@%__cc_p2 bra \t$__cc_follow_start;
\tbra.uni \t$__cc_probe;
$__cc_mine:
\tshr.u64 \t%__cc_d9, %__cc_d9, 32;
\tsetp.ne.u64 \t%__cc_p2, %__cc_d9, 0;
\t@%__cc_p2 bra \t$__cc_go;
$__cc_follow_start:
\tmov.u64 \t%__cc_d2, %globaltimer;
\tld.global.u64 \t%__cc_d4, [%__cc_d0+{timeout_ns}];
$__cc_follow:
\tld.acquire.gpu.global.u32 \t%__cc_r4, [%__cc_d7+{slot_admitted}];
\tsetp.ne.u32 \t%__cc_p2, %__cc_r4, 0;
\t@%__cc_p2 bra \t$__cc_go;
\tnanosleep.u32 \t100;
\tmov.u64 \t%__cc_d3, %globaltimer;
\tsub.u64 \t%__cc_d3, %__cc_d3, %__cc_d2;
\tsetp.gt.u64 \t%__cc_p3, %__cc_d3, %__cc_d4;
\t@!%__cc_p3 bra \t$__cc_follow;
\tred.global.add.u64 \t[%__cc_d0+{gate_timeouts}], 1;
\tbra.uni \t$__cc_go;
$__cc_admit:
\tmov.u32 \t%__cc_r6, 1;
\tmov.u64 \t%__cc_d1, -1;
\tmov.u64 \t%__cc_d2, 0;
$__cc_gate:
\tatom.global.add.u64 \t%__cc_d8, [%__cc_d0+{admit}], 1;
\tsetp.lt.u64 \t%__cc_p2, %__cc_d8, 4294967296;
\t@%__cc_p2 bra \t$__cc_admitted;
\tred.global.add.u64 \t[%__cc_d0+{admit}], %__cc_d1;
\tsetp.ne.u64 \t%__cc_p3, %__cc_d2, 0;
\t@%__cc_p3 bra \t$__cc_wait;
\tmov.u64 \t%__cc_d2, %globaltimer;
\tld.global.u64 \t%__cc_d4, [%__cc_d0+{timeout_ns}];
$__cc_wait:
\tnanosleep.u32 \t2000;
\tmov.u64 \t%__cc_d3, %globaltimer;
\tsub.u64 \t%__cc_d3, %__cc_d3, %__cc_d2;
\tsetp.gt.u64 \t%__cc_p3, %__cc_d3, %__cc_d4;
\t@%__cc_p3 bra \t$__cc_timeout;
\tld.volatile.global.u32 \t%__cc_r4, [%__cc_d0+{pause}];
\tsetp.ne.u32 \t%__cc_p2, %__cc_r4, 0;
\t@%__cc_p2 bra \t$__cc_wait;
\tbra.uni \t$__cc_gate;
$__cc_timeout:
\tred.global.add.u64 \t[%__cc_d0+{gate_timeouts}], 1;
\tred.global.add.u64 \t[%__cc_d0+{admit}], 1;
$__cc_admitted:
{admitted_store}$__cc_go:
{slot_store}$__cc_sync:
\tbar.sync \t0;
$__cc_body:
"""

# A launch's completion (after the fence that releases its writes): count it in
# the kernel's counter and take it out of the admission word's count.
_COMPLETE = """\tred.global.add.u64 \t[%__cc_d0+{completion}], 1;
\tmov.u64 \t%__cc_d1, -1;
\tred.global.add.u64 \t[%__cc_d0+{admit}], %__cc_d1;
"""

_EXIT = """
$__cc_exit:
\t// concordia: completion hook (see gpu_runtime/ptx.py)
\tld.const.u64 \t%__cc_d0, [{ctl}];
\tsetp.eq.u64 \t%__cc_p0, %__cc_d0, 0;
\t@%__cc_p0 bra \t$__cc_ret;
\t{thread_fence};
\tactivemask.b32 \t%__cc_r0;
\tmov.u32 \t%__cc_r1, %laneid;
\tbfind.u32 \t%__cc_r2, %__cc_r0;
\tpopc.b32 \t%__cc_r3, %__cc_r0;
\tbar.warp.sync \t%__cc_r0;
\tsetp.ne.u32 \t%__cc_p1, %__cc_r1, %__cc_r2;
\t@%__cc_p1 bra \t$__cc_ret;
\tatom.shared.add.u32 \t%__cc_r4, [{exits}], %__cc_r3;
\tadd.u32 \t%__cc_r4, %__cc_r4, %__cc_r3;
\tmov.u32 \t%__cc_r5, %ntid.x;
\tmov.u32 \t%__cc_r6, %ntid.y;
\tmul.lo.u32 \t%__cc_r5, %__cc_r5, %__cc_r6;
\tmov.u32 \t%__cc_r6, %ntid.z;
\tmul.lo.u32 \t%__cc_r5, %__cc_r5, %__cc_r6;
\tsetp.ne.u32 \t%__cc_p1, %__cc_r4, %__cc_r5;
\t@%__cc_p1 bra \t$__cc_ret;
\tfence.acq_rel.gpu;
\tmov.u32 \t%__cc_r7, %nctaid.x;
\tmov.u32 \t%__cc_r8, %nctaid.y;
\tmul.lo.u32 \t%__cc_r7, %__cc_r7, %__cc_r8;
\tmov.u32 \t%__cc_r8, %nctaid.z;
\tmul.lo.u32 \t%__cc_r7, %__cc_r7, %__cc_r8;
\tld.shared.u64 \t%__cc_d6, [{slot_var}];
{single_exit}\tshl.b64 \t%__cc_d7, %__cc_d6, 4;
\tadd.u64 \t%__cc_d7, %__cc_d7, %__cc_d0;
\tmin.u32 \t%__cc_r10, %__cc_r7, {sub_count};
\tmov.u32 \t%__cc_r9, 0;
\tsetp.le.u32 \t%__cc_p3, %__cc_r7, {sub_count};
\t@%__cc_p3 bra \t$__cc_top;
\tmov.u32 \t%__cc_r0, %ctaid.z;
\tmov.u32 \t%__cc_r1, %nctaid.y;
\tmov.u32 \t%__cc_r2, %ctaid.y;
\tmad.lo.u32 \t%__cc_r0, %__cc_r0, %__cc_r1, %__cc_r2;
\tmov.u32 \t%__cc_r1, %nctaid.x;
\tmov.u32 \t%__cc_r2, %ctaid.x;
\tmad.lo.u32 \t%__cc_r0, %__cc_r0, %__cc_r1, %__cc_r2;
\tand.b32 \t%__cc_r0, %__cc_r0, {sub_mask};
\tsub.u32 \t%__cc_r1, %__cc_r7, %__cc_r0;
\tadd.u32 \t%__cc_r1, %__cc_r1, {sub_mask};
\tshr.u32 \t%__cc_r1, %__cc_r1, {sub_shift};
\tshl.b64 \t%__cc_d10, %__cc_d6, {slot_sub_shift};
\tmul.wide.u32 \t%__cc_d11, %__cc_r0, {sub_stride};
\tadd.u64 \t%__cc_d10, %__cc_d10, %__cc_d11;
\tadd.u64 \t%__cc_d10, %__cc_d10, %__cc_d0;
\tatom{rel}.global.add.u32 \t%__cc_r8, [%__cc_d10+{subs}], 1;
\tadd.u32 \t%__cc_r8, %__cc_r8, 1;
\tsetp.ne.u32 \t%__cc_p3, %__cc_r8, %__cc_r1;
\t@%__cc_p3 bra \t$__cc_ret;
\tst.global.u32 \t[%__cc_d10+{subs}], %__cc_r9;
\tfence.acq_rel.gpu;
$__cc_top:
\tatom{rel}.global.add.u32 \t%__cc_r8, [%__cc_d7+{slot_count}], 1;
\tadd.u32 \t%__cc_r8, %__cc_r8, 1;
\tsetp.ne.u32 \t%__cc_p3, %__cc_r8, %__cc_r10;
\t@%__cc_p3 bra \t$__cc_ret;
\tst.global.u32 \t[%__cc_d7+{slot_count}], %__cc_r9;
\tst.global.u32 \t[%__cc_d7+{slot_admitted}], %__cc_r9;
\tfence.acq_rel.gpu;
""" + _COMPLETE + """\tmov.u64 \t%__cc_d8, 0;
\tst.volatile.global.u64 \t[%__cc_d7+{slots}], %__cc_d8;
$__cc_ret:
\tret;
"""


# Entries whose body never synchronizes threads take a cheaper exit: every thread
# reaches the exit block (all exits lead there) and nothing else waits on a
# barrier, so one CTA barrier orders the block's writes before thread 0 counts
# the block; no per-thread fence or shared counting.
_ARRIVAL = _EXIT[_EXIT.index("\t{thread_fence};\n\tactivemask"):_EXIT.index("\tmov.u32 \t%__cc_r7, %nctaid.x;")]
_EXIT_BARRIER = _EXIT.replace(_ARRIVAL, "\tbar.sync \t0;\n" + _not_thread0("$__cc_ret"))


# Single-block fast path (``instrument(..., single_block=True)``, the default): a
# launch of one block needs no launch slot (its only block decides for itself),
# so the gate admits it straight through the admission word (as a slot's
# admission does) and marks the shared slot variable with the top bit; its exit
# counts the completion and leaves the admission count after the block's one
# fence. Saves the slot read and claim (two round trips to L2), the admitted
# flag and the slot count.
_SINGLE_GATE = """\tmov.u32 \t%__cc_r7, %nctaid.x;
\tmov.u32 \t%__cc_r8, %nctaid.y;
\tmul.lo.u32 \t%__cc_r7, %__cc_r7, %__cc_r8;
\tmov.u32 \t%__cc_r8, %nctaid.z;
\tmul.lo.u32 \t%__cc_r7, %__cc_r7, %__cc_r8;
\tsetp.eq.u32 \t%__cc_p4, %__cc_r7, 1;
\t@!%__cc_p4 bra \t$__cc_multi;
\tmov.u64 \t%__cc_d6, 0;
\tbra.uni \t$__cc_admit;
$__cc_multi:
"""
_ADMITTED = "\tst.volatile.global.u32 \t[%__cc_d7+{slot_admitted}], %__cc_r6;\n"
_SINGLE_ADMITTED = "\t@!%__cc_p4 st.volatile.global.u32 \t[%__cc_d7+{slot_admitted}], %__cc_r6;\n"
_SLOT = "\tst.shared.u64 \t[{slot_var}], %__cc_d6;\n"
_SINGLE_SLOT = """\t@%__cc_p4 or.b64 \t%__cc_d6, %__cc_d6, 0x8000000000000000;
\tst.shared.u64 \t[{slot_var}], %__cc_d6;
"""
_SINGLE_EXIT = """\tsetp.lt.s64 \t%__cc_p4, %__cc_d6, 0;
\t@!%__cc_p4 bra \t$__cc_multi_exit;
{single_fence}""" + _COMPLETE + """\tbra.uni \t$__cc_ret;
$__cc_multi_exit:
"""


def _fmt(template: str, **kw: object) -> str:
    common = dict(ctl=CTL_WORD, pause=CTL_PAUSE, timeout_ns=CTL_TIMEOUT_NS, gate_timeouts=CTL_GATE_TIMEOUTS,
                  admit=CTL_ADMIT, slots=CTL_SLOTS,
                  slot_count=CTL_SLOTS + 8, slot_admitted=CTL_SLOTS + 12, slot_mask=CTL_SLOT_COUNT - 1,
                  subs=CTL_SUBS,
                  sub_mask=CTL_SUB_COUNTERS - 1, sub_shift=CTL_SUB_COUNTERS.bit_length() - 1,
                  sub_count=CTL_SUB_COUNTERS, sub_stride=CTL_SUB_STRIDE,
                  slot_sub_shift=(CTL_SUB_COUNTERS * CTL_SUB_STRIDE).bit_length() - 1)
    single = bool(kw.pop("single_block", False))
    pieces = {"single_gate": _SINGLE_GATE if single else "",
              "admitted_store": _SINGLE_ADMITTED if single else _ADMITTED,
              "slot_store": _SINGLE_SLOT if single else _SLOT,
              "single_exit": _SINGLE_EXIT if single else ""}
    for name, piece in pieces.items():  # spliced in first: one format call fills their placeholders too
        template = template.replace("{" + name + "}", piece)
    return template.format(**common, **kw, not_thread0_to_sync=_not_thread0("$__cc_sync"))


@dataclass(frozen=True, slots=True)
class Rewritten:
    ptx: str
    entries: dict[str, int]  #: entry name -> kernel ID (its completion counter)
    funcs_with_exit: list[str]


def instrument(ptx: str | bytes, kernel_id: object, *, single_block: bool = True) -> Rewritten:
    """Insert the pause gate and completion hook into every ``.entry``.

    ``kernel_id(name)`` assigns each entry's completion counter (an int in
    ``[0, CTL_MAX_KERNELS)``). Already instrumented PTX is refused (hooks twice
    would count twice). ``single_block`` (default) adds the single-block fast path
    (``_SINGLE_GATE``); ``single_block=False`` sends every launch through a slot."""
    text = ptx.decode() if isinstance(ptx, bytes) else ptx
    text = text.rstrip("\x00")
    mod = parse(text)
    if mod.instrumented:
        raise PtxError(f"PTX: already instrumented (it declares {CTL_WORD}); refusing to add the hooks twice")
    if mod.version < (7, 0):
        raise PtxError(f"PTX: expected ISA version >= 7.0 for the hooks (nanosleep, activemask), found "
                       f"{mod.version[0]}.{mod.version[1]}")
    m = re.fullmatch(r"sm_(\d+)[a-z]?", mod.target)
    if m is None or int(m.group(1)) < 70:
        raise PtxError(f"PTX: expected a target of sm_70 or newer for the hooks, found {mod.target!r}")
    # Each exiting thread of a kernel with barriers fences its writes: release is all it needs (the
    # block's last warp acquires them), and fence.release, unlike fence.acq_rel, leaves the SM's L1
    # (the gate's cached slot) alone. It needs PTX ISA 8.6 and sm_90; older PTX gets fence.acq_rel.
    thread_fence = ("fence.release.gpu" if mod.version >= (8, 6) and int(m.group(1)) >= 90
                    else "fence.acq_rel.gpu")
    ids: dict[str, int] = {}
    pieces: list[str] = []
    pos = 0
    decls = [f"\n\n.visible .const .align 8 .u64 {CTL_WORD};"]
    for n, e in enumerate(mod.entries):
        kid = int(kernel_id(e.name))  # type: ignore[operator]
        if not 0 <= kid < CTL_MAX_KERNELS:
            raise PtxError(f"kernel ID for {e.name}: expected 0..{CTL_MAX_KERNELS - 1}, found {kid}")
        ids[e.name] = kid
        exits_var, slot_var = f"__cc_exits_{n}", f"__cc_slot_{n}"
        decls.append(f".shared .align 4 .u32 {exits_var};")
        decls.append(f".shared .align 8 .u64 {slot_var};")
        pieces.append(text[pos:e.body_open + 1])
        regs = _REGS_SINGLE if single_block else _REGS
        names = dict(exits=exits_var, slot_var=slot_var, completion=CTL_COMPLETIONS + 8 * kid,
                     single_block=single_block)
        pieces.append(regs + _fmt(_GATE, **names))
        pos = e.body_open + 1
        for ex in e.exits:
            pieces.append(text[pos:ex.start])
            pieces.append(f"{ex.guard} bra \t$__cc_exit;" if ex.guard else "bra \t$__cc_exit;")
            pos = ex.end
        pieces.append(text[pos:e.body_close])
        if e.barriers:  # every thread fenced, then the block-completing warp's lane: relaxed atomics
            exit_ = _fmt(_EXIT, rel="", single_fence="", thread_fence=thread_fence, **names)
        else:  # thread 0 after the exit barrier: each counting atomic releases the block's writes
            exit_ = _fmt(_EXIT_BARRIER, rel=".release.gpu", single_fence="\tfence.acq_rel.gpu;\n", **names)
        pieces.append(exit_)
        pos = e.body_close
    pieces.append(text[pos:])
    body = "".join(pieces)
    # Module-scope declarations go right after the header (positions before it are unchanged).
    out = body[:mod.header_end] + "\n".join(decls) + "\n" + body[mod.header_end:]
    return Rewritten(out, ids, mod.funcs_with_exit)
