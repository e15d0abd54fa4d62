"""The PTX rewriter without a GPU: NVRTC compiles the corpus to PTX for sm_90, the
rewriter inserts the pause gate and completion hook, and nvJitLink must assemble the
result; the parser's corner cases and refusals are checked on hand-written PTX."""

from __future__ import annotations

import re

import pytest

from gpu_runtime.ptx import CTL_ADMIT, CTL_WORD, PtxError, instrument, parse
from tests.ptx_corpus import CORPUS

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) is not installed")


def _ptx(source: str) -> str:
    from gpu_runtime.compiler import compile_cubin

    return compile_cubin(source, arch="sm_90", ptx=True).cubin.rstrip(b"\0 ").decode()


def _assemble(ptx: str) -> bytes:
    from gpu_runtime.compile_all import nvjitlink_assemble

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
        # the fast path's exit counts the completion once, after the block's fence
        fast_exit = body[body.index("setp.lt.s64"):body.index("$__cc_multi_exit:")]
        assert fast_exit.count("red.global.add.u64") == 2  # the completion, and leaving the admission count
        assert f"[%__cc_d0+{CTL_ADMIT}], %__cc_d1;" in fast_exit
        assert body.rindex("fence.acq_rel.gpu", 0, body.index("setp.lt.s64")) > body.index("$__cc_exit:")
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
    assert f"[%__cc_d0+{5120 + 8 * 3}]" in out.ptx  # kernel 3's completion counter


def test_refusals_name_what_was_expected():
    """Already instrumented, too old an ISA or target, unbalanced braces: PtxError saying why."""
    once = instrument(MINIMAL, lambda name: 0).ptx
    with pytest.raises(PtxError, match=f"already instrumented.*{CTL_WORD}"):
        instrument(once, lambda name: 0)
    with pytest.raises(PtxError, match="ISA version >= 7.0.*found 6.4"):
        instrument(MINIMAL.replace(".version 8.0", ".version 6.4"), lambda name: 0)
    with pytest.raises(PtxError, match="sm_70 or newer.*'sm_61'"):
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

    from gpu_runtime import instrument as ins
    from gpu_runtime.errors import ConfigurationError
    from gpu_runtime.ptx import CTL_MAX_KERNELS

    assert ins.kernel_id("copy") == zlib.crc32(b"copy") % CTL_MAX_KERNELS
    before = ins.stats()["instrumented_entries"]
    out = ins.rewrite(_ptx(CORPUS[1].source))
    assert CTL_WORD in out and ins.stats()["instrumented_entries"] == before + 1
    assert ins.stats()["kernels"]["axpy"] == ins.kernel_id("axpy")
    if not ins.is_enabled():
        with pytest.raises(ConfigurationError, match="instrument.enable"):
            ins.completion("axpy", launches=1)
