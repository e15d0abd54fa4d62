"""The PTX rewriter without a GPU: NVRTC compiles the corpus to PTX for sm_90, the
rewriter inserts the pause gate and completion hook, and nvJitLink must assemble the
result; the parser's corner cases and refusals are checked on hand-written PTX."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_runtime.cuda.ptx import CTL_ADMIT, CTL_COMPLETIONS, CTL_SLOT_COUNT, CTL_WORD, PtxError, instrument, parse
from tests.ptx_corpus import CORPUS

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed")


def _ptx(source: str) -> str:
    from gpu_runtime.cuda.compiler import compile_cubin

    return compile_cubin(source, arch="sm_90", ptx=True).cubin.rstrip(b"\0 ").decode()


def _assemble(ptx: str) -> bytes:
    from gpu_runtime.cuda.compile_all import nvjitlink_assemble

    return nvjitlink_assemble(ptx.encode() + b"\0", "sm_90")


SOURCES = {k.source: k.name for k in CORPUS}  # template kernels share one module


@pytest.mark.parametrize("source", list(SOURCES), ids=list(SOURCES.values()))
def test_corpus_kernel_is_rewritten_and_assembles(source: str):
    """Every entry gets the gate and the exit hook, every ret/exit becomes a branch to the hook,
    and nvJitLink assembles the rewritten PTX for sm_90."""
    ptx = _ptx(source)
    before = parse(ptx)
    assert before.entries and all(e.exits for e in before.entries)
    out = instrument(ptx, lambda name: 7)
    after = parse(out.ptx)
    assert after.instrumented and set(out.entries) == {e.name for e in before.entries}
    for e in after.entries:
        body = out.ptx[e.body_open:e.body_close]
        assert body.count("$__cc_gate:") == 1 and body.count("$__cc_exit:") == 1
        # the only exit left is the hook's own `ret`
        assert [x.opcode for x in e.exits] == ["ret"], e.name
        assert body.count("bra \t$__cc_exit;") == len(next(b for b in before.entries if b.name == e.name).exits)
    assert len(_assemble(out.ptx)) > 0


@pytest.mark.parametrize("source", list(SOURCES), ids=list(SOURCES.values()))
def test_single_block_fast_path_is_the_default_and_off_only_when_asked_and_assembles(source: str):
    """By default each gate gets one launch-shape check and each hook one slot-free exit (and a
    fifth predicate); ``single_block=False`` has neither. Both admit a launch with one atomic add
    on the admission word (no SC fence) and assemble for sm_90."""
    ptx = _ptx(source)
    plain = instrument(ptx, lambda name: 7, single_block=False)
    fast = instrument(ptx, lambda name: 7)
    assert "$__cc_multi" not in plain.ptx and "%__cc_p<5>" not in plain.ptx
    for out in (plain, fast):
        for e in parse(out.ptx).entries:
            gate = out.ptx[e.body_open:out.ptx.index("$__cc_body:", e.body_open)]
            assert gate.count(f"atom.global.add.u64 \t%__cc_d8, [%__cc_d0+{CTL_ADMIT}], 1;") == 1
            assert "fence.sc" not in gate and "ld.const.u64 \t%__cc_d0, [__concordia_ctl];" in gate
    for e in parse(fast.ptx).entries:
        body = fast.ptx[e.body_open:e.body_close]
        assert body.count("$__cc_multi:") == 1 and body.count("$__cc_multi_exit:") == 1, e.name
        assert "%__cc_p<5>" in body
        # the fast path's exit counts the completion once, after a fence that releases the block's writes
        exit_ = body[body.index("$__cc_exit:"):]
        fast_exit = exit_[exit_.index("setp.lt.s64"):exit_.index("$__cc_multi_exit:")]
        assert fast_exit.count("red.global.add.u64") == 2  # the completion, and leaving the admission count
        assert f"[%__cc_d0+{CTL_ADMIT}], %__cc_d1;" in fast_exit
        assert "fence.acq_rel.gpu" in exit_[:exit_.index("red.global.add.u64")]
    assert len(_assemble(fast.ptx)) > 0 and len(_assemble(plain.ptx)) > 0


def test_nvjitlink_rejects_broken_ptx():
    """The assembler check is real: a rewrite that breaks the PTX fails to assemble."""
    from cuda.bindings import nvjitlink

    ptx = instrument(_ptx(CORPUS[0].source), lambda name: 0).ptx
    with pytest.raises(nvjitlink.nvJitLinkError):
        _assemble(ptx.replace("bar.sync \t0;", "bar.sync \t0"))


MINIMAL = """//
// hand-written
.version 8.0
.target sm_90
.address_size 64

.extern .func (.param .b32 func_retval0) vprintf(.param .b64 a, .param .b64 b);
.func stop(.param .b32 c)
{
\t.reg .pred %p<2>;
\t.reg .b32 %r<2>;
\tld.param.u32 %r1, [c];
\tsetp.eq.u32 %p1, %r1, 0;
\t@%p1 exit;
\tret;
}
.visible .entry k(
\t.param .u64 k_param_0
)
.maxntid 128, 1, 1
{
\t.reg .pred %p<3>;
\t.reg .b32 %r<4>;
\t.reg .f32 %f<3>;
\t// a comment that says ret; and exit; must not count
\tmov.u32 %r1, %tid.x;
\tsetp.gt.u32 %p1, %r1, 5;
\t@%p1 ret;
\tsetp.eq.u32 %p2, %r1, 3;
\t@!%p2 bra $L__BB0_2;
\tmov.b64 {%r2, %r3}, 0;
\t{
\t.reg .b32 temp;
\tmov.u32 temp, 1;
\t}
\tret;
$L__BB0_2:
\texit;
}
"""


def test_parser_finds_guarded_exits_and_ignores_comments_vectors_and_scopes():
    """Predicated `@%p ret`, plain `ret` and `exit` are found; comments, vector operands and
    nested scopes do not confuse it; a .func that calls `exit` is reported."""
    m = parse(MINIMAL)
    assert m.version == (8, 0) and m.target == "sm_90"
    (e,) = m.entries
    assert e.name == "k" and [(x.guard, x.opcode) for x in e.exits] == [("@%p1", "ret"), ("", "ret"), ("", "exit")]
    assert m.funcs_with_exit == ["stop"]
    out = instrument(MINIMAL, lambda name: 3)
    assert "@%p1 bra \t$__cc_exit;" in out.ptx and out.funcs_with_exit == ["stop"]
    assert re.search(r"\.visible \.const \.align 8 \.u64 __concordia_ctl;", out.ptx)
    assert "must not count" in out.ptx  # comments survive
    assert f"[%__cc_d0+{CTL_COMPLETIONS + 8 * 3}]" in out.ptx  # kernel 3's completion counter


def test_refusals_name_what_was_expected():
    """Already instrumented, too old an ISA or target, unbalanced braces: PtxError saying why."""
    once = instrument(MINIMAL, lambda name: 0).ptx
    with pytest.raises(PtxError, match=f"already instrumented.*{CTL_WORD}"):
        instrument(once, lambda name: 0)
    with pytest.raises(PtxError, match=r"ISA version >= 7\.0.*found 6\.4"):
        instrument(MINIMAL.replace(".version 8.0", ".version 6.4"), lambda name: 0)
    with pytest.raises(PtxError, match=r"sm_70 or newer.*'sm_61'"):
        instrument(MINIMAL.replace(".target sm_90", ".target sm_61"), lambda name: 0)
    with pytest.raises(PtxError, match="never closed"):
        parse(MINIMAL.rstrip().rstrip("}"))
    with pytest.raises(PtxError, match="kernel ID"):
        instrument(MINIMAL, lambda name: 1 << 20)


def _defs_before_uses(block: str) -> list[str]:
    """Registers of the hooks read before any instruction above them wrote them (in text order;
    the hooks branch backwards only in wait loops, after their registers are set)."""
    defined: set[str] = set()
    bad = []
    for line in block.splitlines():
        line = line.strip()
        if not line or line.startswith(("//", "$", ".reg")):
            continue
        guard = re.match(r"@!?(%\w+)\s+", line)
        if guard:
            if guard.group(1) not in defined:
                bad.append(f"{guard.group(1)} in {line!r}")
            line = line[guard.end():]
        op, _, rest = line.partition(" ")
        rest = rest.strip()
        writes = not op.startswith(("st.", "red.", "bar.", "fence", "bra", "nanosleep"))
        if writes and rest.startswith("{"):  # vector destination
            head, _, tail = rest.partition("}")
            outs, ins = re.findall(r"%__cc_\w+", head), re.findall(r"%__cc_\w+", tail)
        elif writes and rest.startswith("%__cc_"):
            regs = re.findall(r"%__cc_\w+", rest)
            outs, ins = regs[:1], regs[1:]
        else:
            outs, ins = [], re.findall(r"%__cc_\w+", rest)
        bad += [f"{r} in {line!r}" for r in ins if r not in defined]
        defined.update(outs)
    return bad


def test_every_hook_register_is_written_before_it_is_read():
    """In the inserted gate and exit blocks, no register is read before an earlier instruction wrote it
    (an uninitialized counter target once made every launch go uncounted)."""
    by_name = {k.name: k for k in CORPUS}
    for name in ("copy", "shared_reverse"):  # the barrier-free exit and the warp-counting exit
        out = instrument(_ptx(by_name[name].source), lambda name: 0).ptx
        gate = out[out.index("// concordia: pause gate"):out.index("$__cc_body:")]
        exit_ = out[out.index("$__cc_exit:"):out.index("$__cc_ret:")]
        assert _defs_before_uses(gate) == [], name
        assert _defs_before_uses(exit_) == [], name


def _gate_flow(gate: str) -> dict[str, list[str]]:
    """For each label of the gate, the branch targets of the straight-line code after it."""
    flow: dict[str, list[str]] = {}
    label, falls = "start", True
    for line in gate.splitlines():
        line = line.strip()
        if line.startswith("$") and line.endswith(":"):
            if falls:
                flow.setdefault(label, []).append(line[:-1])
            label, falls = line[:-1], True
        elif " bra" in line or line.startswith("bra"):
            flow.setdefault(label, []).append(line.split()[-1].rstrip(";"))
            falls = not line.startswith("bra")  # an unguarded branch does not fall through
    return flow


@pytest.mark.parametrize("single_block", [True, False], ids=["single-block-fast-path", "slots"])
def test_gate_uses_one_slot_per_launch_and_takes_only_an_admitted_answer_from_the_l1_cache(single_block: bool):
    """Every block of a launch uses slot ``%gridid`` mod CTL_SLOT_COUNT and no other (a probe on to the
    next free slot let a launch's late blocks claim a second one); the one cached (``ld.global.ca``) read
    of it lets a block in only when it shows the block's own launch admitted; a free-looking slot goes
    to the CAS, another launch's ID to a volatile read of the same slot (waiting while it is held); and
    every other read of the slot is an acquire (which invalidates the SM's L1, so the SM's next block
    does not find the stale copy again)."""
    by_name = {k.name: k for k in CORPUS}
    out = instrument(_ptx(by_name["copy"].source), lambda name: 0, single_block=single_block).ptx
    gate = out[out.index("// concordia: pause gate"):out.index("$__cc_body:")]
    # the slot index (d6) and address (d7) are set once, from the grid ID
    d6 = [ln.strip() for ln in gate.splitlines() if re.match(r"\s*(@!?%__cc_p\d \s*)?\S+\s+%__cc_d6,", ln)]
    expected = [f"and.b64 \t%__cc_d6, %__cc_d5, {CTL_SLOT_COUNT - 1};"]
    if single_block:  # a one-block launch: no slot (0, with the top bit set at the end of the gate)
        expected = ["mov.u64 \t%__cc_d6, 0;", *expected, "@%__cc_p4 or.b64 \t%__cc_d6, %__cc_d6, 0x8000000000000000;"]
    assert d6 == expected, d6
    assert len([ln for ln in gate.splitlines() if re.match(r"\s*\S+\s+%__cc_d7,", ln)]) == 2  # shl, add
    assert "$__cc_next" not in gate
    assert gate.count("ld.global.ca.") == 1
    slot_reads = [ln for ln in gate.splitlines() if "[%__cc_d7+" in ln and "ld." in ln and "ld.global.ca" not in ln]
    assert len(slot_reads) == 2 and all("ld.acquire.gpu.global." in ln for ln in slot_reads), slot_reads
    cached = gate[gate.index("ld.global.ca."):gate.index("$__cc_probe:")]
    lines = [ln.strip() for ln in cached.splitlines()[1:]]
    assert lines[0] == "setp.eq.u64 \t%__cc_p2, %__cc_d8, 0;" and lines[1].endswith("bra \t$__cc_claim;")
    assert lines[2] == "setp.ne.u64 \t%__cc_p2, %__cc_d8, %__cc_d5;" and lines[3].endswith("bra \t$__cc_probe;")
    assert lines[4:7] == ["shr.u64 \t%__cc_d9, %__cc_d9, 32;", "setp.ne.u64 \t%__cc_p2, %__cc_d9, 0;",
                          "@%__cc_p2 bra \t$__cc_go;"]
    assert lines[7] == "bra.uni \t$__cc_follow_start;"
    flow = _gate_flow(gate)
    assert {"$__cc_mine", "$__cc_claim", "$__cc_held"} <= set(flow["$__cc_probe"])
    assert set(flow["$__cc_held"]) == {"$__cc_probe"}  # a held slot: wait and read it again, never move on
    # the ways into the body: the cached admitted answer, the claimer, an acquired admitted answer
    # (probe or follow loop) and the follow loop's timeout
    into = sorted(lbl for lbl, targets in flow.items() if "$__cc_go" in targets)
    labels = re.findall(r"^(\$__cc_\w+):", gate[:gate.index("ld.global.ca.")], re.M)
    assert into == sorted(["$__cc_admitted", "$__cc_follow", "$__cc_mine", labels[-1] if labels else "start"]), into
    assert "fence" not in gate  # no MEMBAR on any way in
    assert len(_assemble(out)) > 0


def test_exit_counts_with_release_atomics_and_keeps_the_l1():
    """The barrier-free exit has no fence between its barrier and the block's counting atomic, which is
    a release; kernels with barriers fence each thread with fence.release.gpu (PTX 8.6+, sm_90+) or,
    in older PTX, fence.acq_rel.gpu — and both assemble."""
    by_name = {k.name: k for k in CORPUS}
    out = instrument(_ptx(by_name["copy"].source), lambda name: 0).ptx
    multi = out[out.index("$__cc_multi_exit:"):]
    first_atom = multi.index("atom.")
    assert "fence" not in multi[:first_atom]
    assert multi[first_atom:].startswith("atom.release.gpu.global.add.u32")
    assert multi.count("atom.release.gpu.global.add.u32") == 2  # a sub-counter, then the slot's count
    src = _ptx(by_name["shared_reverse"].source)
    synced = instrument(src, lambda name: 0).ptx
    arrival = synced[synced.index("$__cc_exit:"):synced.index("activemask")]
    assert "fence.release.gpu;" in arrival and "acq_rel" not in arrival
    assert "atom.release" not in synced  # the block's last warp has fenced with acq_rel already
    old = re.sub(r"\.version \d+\.\d+", ".version 8.0", src, count=1)
    synced_old = instrument(old, lambda name: 0).ptx
    arrival_old = synced_old[synced_old.index("$__cc_exit:"):synced_old.index("activemask")]
    assert "fence.acq_rel.gpu;" in arrival_old and "fence.release" not in synced_old
    assert len(_assemble(synced)) > 0 and len(_assemble(synced_old)) > 0


def test_exit_variant_follows_the_bodys_barriers():
    """A body without thread barriers gets the CTA-barrier exit; one with __syncthreads keeps the
    per-warp counting exit (a barrier there could deadlock against the kernel's own)."""
    by_name = {k.name: k for k in CORPUS}
    plain = instrument(_ptx(by_name["early_return"].source), lambda name: 0).ptx
    synced = instrument(_ptx(by_name["shared_reverse"].source), lambda name: 0).ptx
    exit_plain = plain[plain.index("$__cc_exit:"):]
    exit_synced = synced[synced.index("$__cc_exit:"):]
    assert "bar.sync \t0;" in exit_plain and "activemask" not in exit_plain
    assert "activemask" in exit_synced and "bar.sync" not in exit_synced


def test_instrument_api_without_a_gpu():
    """Kernel IDs are stable names' CRCs (the same in every process and cache), rewrite() counts
    what it instrumented, and asking for a counter before enable() says what is missing."""
    import zlib

    from gpu_runtime.cuda import instrument as ins
    from gpu_runtime.cuda.ptx import CTL_MAX_KERNELS

    assert ins.kernel_id("copy") == zlib.crc32(b"copy") % CTL_MAX_KERNELS
    before = ins.stats()["instrumented_entries"]
    out = ins.rewrite(_ptx(CORPUS[1].source))
    assert CTL_WORD in out and ins.stats()["instrumented_entries"] == before + 1
    assert ins.stats()["kernels"]["axpy"] == ins.kernel_id("axpy")
    # A process that never enabled instrumentation has no control block to count in (this one may
    # have one: the GPU tests enable it, and it lives as long as the process).
    probe = ("from gpu_runtime.cuda import instrument as ins\nfrom gpu_runtime.errors import ConfigurationError\n"
             "try:\n    ins.completion('axpy', launches=1)\n"
             "except ConfigurationError as exc:\n    print('refused:', exc)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert "refused:" in done.stdout and "instrument.enable" in done.stdout, done.stdout + done.stderr
