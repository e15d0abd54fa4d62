"""transformers on the GPU (issue 4). Random bf16 weights in Llama-3.2-1B and
Llama-3-8B shapes (no download), CuPy backend.

Decode: ms per decode step of ``durable_generate(checkpoint_every=1)`` against
plain ``model.generate`` (default cache), against ``model.generate`` with a
``DurableCache`` and no session (what the cache alone costs), and against the
naive baseline that copies the whole KV cache to the CPU after every token.
2k-token prompt, batch 1 and 8. A step is the interval between two calls of a
stopping criterion that runs first in every variant (one forward, one sampled
token and, for durable_generate, one commit); per run the median step over the
last ``new - 4`` steps, then the median over the repeats; the variants run
interleaved, in reversed order every other repeat, and ``*_paired_ratio`` is
the median over repeats of each variant's run over the plain run of the same
repeat. Measuring inside the generation keeps the per-call costs (session
open, prefill) out. Whole steps vary between runs by more than the goal:
eager decoding is host-bound, and on the lent machines a run lands at random
in a fast or a ~1.6x slower mode of the host (not the garbage collector, not
the core: ``bench/results/decode_variance_gpu-20261127T2122Z.json``), so the
cost of a checkpoint is also measured paired within one run:
``checkpoint_every=2`` alternates steps with and without a commit; per run,
the median step with a commit over the median step without, minus one, is
the overhead of a checkpoint every token; the median over the runs
(``--paired-new`` tokens each) is reported with its range.

Recovery: a child process runs ``durable_generate`` on an 8k- or 32k-token
prompt, makes the epoch holding the prompt's KV durable and SIGKILLs itself.
Then, per repeat on a fresh copy of that home (the segment files are in the page
cache, as after a process crash): the time from the ``durable_generate`` call
that resumes the session to its first new token (session open, log scan,
restore of the KV cache, one decode step), against ``model.generate`` with one
new token on the same prompt (the recompute: prefill + one step), for each
restore configuration ``ENGINE+VERIFY``: the scatter by the ``copy`` engine or
the ``executor``, checksums summed on the GPU (``device``, the default) or by
the reader threads (``host``). The runtime is opened before the
clock starts (a long-lived process opens it once).

    python bench/bench_transformers_gpu.py [--quick] [--only decode|recovery]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import versions, write

SHAPES = {
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True},
    "llama-3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                   "tie_word_embeddings": False},
}
RT_OPTIONS: dict[str, Any] = {"backend": "cupy", "fsync": "none", "ring_bytes": 256 << 20, "segment_bytes": 1 << 30,
                              "max_record_bytes": 4 << 20, "compact_bytes": 0}


def build(shape: str):  # type: ignore[no-untyped-def]
    """A random-weight bf16 model of ``shape`` on the GPU (weights made in bf16 directly)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=40000, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


class FirstToken(StoppingCriteria):
    """Records when generate has its first new token (stream synchronized)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        if self.at is None:
            torch.cuda.current_stream().synchronize()
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Steps(StoppingCriteria):
    """A stopping criterion that only records when it is called."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kw):  # type: ignore[no-untyped-def]
        if input_ids.is_cuda:
            # generate() syncs its stream once a step anyway; here the token is really
            # there. The stream, not the device: a device-wide sync would also wait
            # for the executor to park, which nothing in generate() does.
            torch.cuda.current_stream().synchronize()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def step_ms(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)][3:]
        return statistics.median(gaps) * 1e3


def criteria(steps: Steps) -> StoppingCriteriaList:
    return StoppingCriteriaList([steps])


# -- decode ---------------------------------------------------------------------------------


def decode_section(rts: dict[str, Any], model, shape: str, batch: int, prompt_len: int, new: int,  # type: ignore[no-untyped-def]
                   repeats: int, paired_new: int | None = None) -> dict:
    from transformers.cache_utils import DynamicCache

    from integrations.transformers import DurableCache, durable_generate

    ids = torch.randint(3, 1000, (batch, prompt_len), device=model.device)
    mask = torch.ones_like(ids)
    counter = [0]

    def plain(steps: Steps) -> None:
        model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, stopping_criteria=criteria(steps))

    def cache_only(steps: Steps) -> None:
        cache = DurableCache.for_model(model, batch_size=batch, max_cache_len=prompt_len + new + 1)
        model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, past_key_values=cache,
                       stopping_criteria=criteria(steps))

    commit_ms: dict[str, list[float]] = {label: [] for label in rts}
    paired_ms: dict[str, list[float]] = {label: [] for label in rts}

    def durable(label: str, every: int = 1):  # type: ignore[no-untyped-def]
        rt = rts[label]
        tokens = new if every == 1 else (paired_new or new)

        def run(steps: Steps) -> None:
            from integrations.transformers._generate import _Checkpointer

            counter[0] += 1
            sid = f"bench-{shape}-{batch}-{counter[0]}"
            spent: list[float] = []
            starts: list[float] = []
            with _timed(_Checkpointer, "commit", spent, each=True, starts=starts):
                durable_generate(model, ids, sid, runtime=rt, attention_mask=mask, max_new_tokens=tokens,
                                 do_sample=False, checkpoint_every=every, stopping_criteria=criteria(steps))
            if every == 1:
                # per-token commits (not the prompt's, not the last)
                commit_ms[label].append(statistics.median(spent[1:-1]) * 1e3)
            else:
                paired_ms[label].append(paired_commit_ms(steps.times, starts[1:-1]))
            rt.delete(sid)  # a batch-8 8B prompt logs 2 GiB a run: keep the disk and its writeback out of later runs
        return run

    def naive(steps: Steps) -> None:
        """Baseline: copy the whole KV cache to the CPU after every token."""
        cache = DynamicCache()

        class Copy(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):  # type: ignore[no-untyped-def]
                steps(input_ids, scores)
                for layer in cache.layers:
                    layer.keys.to("cpu")
                    layer.values.to("cpu")
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        # Its steps are long and even (a copy of the whole cache dominates): 12
        # tokens give a stable median, and keep batch 8 at 8B (1.5 s/step) short.
        model.generate(ids, attention_mask=mask, max_new_tokens=min(new, 10), do_sample=False,
                       past_key_values=cache, stopping_criteria=StoppingCriteriaList([Copy()]))

    variants = {"plain": plain, "cache_only": cache_only, "naive_copy_all": naive}
    for label in rts:
        variants[f"durable{label}"] = durable(label)
        variants[f"durable{label}_every2"] = durable(label, every=2)
    out: dict[str, Any] = {"new_tokens": new, "repeats": repeats}
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn(Steps())
    for r in range(repeats):  # interleaved (ABBA): drifts hit every variant alike
        for name, fn in (list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]):
            steps = Steps()
            t = time.perf_counter()
            fn(steps)
            runs[name].append(steps.step_ms())
            print(f"  {shape} b{batch} {name}: {runs[name][-1]:.2f} ms/step, run {time.perf_counter() - t:.1f} s",
                  flush=True)
    for name in variants:
        out[f"{name}_ms_per_step"] = statistics.median(runs[name])
        out[f"{name}_runs_ms"] = runs[name]
    plain_ms = out["plain_ms_per_step"]
    for name in variants:
        if name != "plain":
            out[f"{name}_over_plain"] = out[f"{name}_ms_per_step"] / plain_ms
            out[f"{name}_paired_ratio"] = statistics.median(
                v / p_ for v, p_ in zip(runs[name], runs["plain"], strict=True))
    out["durable_overhead"] = out["durable_ms_per_step"] / plain_ms - 1
    for label in rts:
        # Host time inside the per-token commit: the checkpoint's own cost per
        # step, free of the run-to-run spread of whole steps (the model's kernels
        # can still be slowed by the resident executor; that part is not in here).
        out[f"durable{label}_commit_host_ms_per_step"] = statistics.median(commit_ms[label][-repeats:])
        out[f"durable{label}_commit_host_over_plain_step"] = (out[f"durable{label}_commit_host_ms_per_step"]
                                                              / plain_ms)
        # Paired within one run: with checkpoint_every=2, steps that commit and
        # steps that do not alternate, under the same clocks and load; the
        # difference of their medians is what one per-token checkpoint costs a
        # step, everything included (host commit, the executor's copy during the
        # next forward, the flusher); over the median step without a commit of
        # the same run, it is the overhead of checkpoint_every=1.
        runs_ = paired_ms[label][-repeats:]
        rel = sorted(c / b for c, b in runs_)
        out[f"paired{label}_commit_cost_ms"] = statistics.median(c for c, _ in runs_)
        out[f"paired{label}_overhead"] = statistics.median(rel)
        out[f"paired{label}_overhead_range"] = [rel[0], rel[-1]]
        out[f"paired{label}_runs_ms"] = runs_
        out[f"paired{label}_tokens_per_run"] = paired_new or new
    out["tokens_per_s_plain"] = batch * 1e3 / plain_ms
    out["tokens_per_s_durable"] = batch * 1e3 / out["durable_ms_per_step"]
    return out


# -- recovery -------------------------------------------------------------------------------


def _prompt(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(3, 1000, (1, n), generator=g).cuda()


def paired_commit_ms(times: list[float], commits: list[float]) -> tuple[float, float]:
    """(Median step with a commit minus median step without, median step without),
    in ms: step i is
    the interval between criterion calls i and i+1 (the checkpointer runs
    right after call i, so its commit falls inside step i); the first three
    steps are warm-up."""
    with_, without = [], []
    for a, b in list(itertools.pairwise(times))[3:]:
        (with_ if any(a <= c < b for c in commits) else without).append(b - a)
    if not with_ or not without:
        raise ValueError(f"expected steps with and without a commit, found {len(with_)} and {len(without)}")
    base = statistics.median(without)
    return (statistics.median(with_) - base) * 1e3, base * 1e3


@contextlib.contextmanager
def _timed(cls: type, name: str, sink: list[float], *, each: bool = False,  # type: ignore[no-untyped-def]
           starts: list[float] | None = None):
    """Time calls of ``cls.name`` during the block: their total appended to
    ``sink`` at the end (or, with ``each``, every call's time as it returns;
    ``starts`` gets every call's start time)."""
    orig = getattr(cls, name)
    spent = [0.0]

    def wrapper(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        if starts is not None:
            starts.append(t)
        try:
            return orig(*a, **k)
        finally:
            dt = time.perf_counter() - t
            spent[0] += dt
            if each:
                sink.append(dt)

    setattr(cls, name, wrapper)
    try:
        yield
    finally:
        setattr(cls, name, orig)
        if not each:
            sink.append(spent[0])


def child(shape: str, n: int, home: str) -> None:
    """Commit the KV of an ``n``-token prompt, make it durable, SIGKILL ourselves."""
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    model = build(shape)
    rt = Runtime.open(home=home, **RT_OPTIONS)
    calls = [0]

    class CrashAfterDurable(StoppingCriteria):
        """Runs before the checkpointer: at the second token the first token's
        epoch (the prompt's KV) was committed; wait for it on disk, then die."""

        def __call__(self, input_ids, scores, **kw):  # type: ignore[no-untyped-def]
            calls[0] += 1
            if calls[0] == 2:
                rt._sessions["recover"].flush(timeout=600)
                print("CHILD durable", input_ids.shape[1], flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = _prompt(n)
    durable_generate(model, ids, "recover", runtime=rt, max_new_tokens=8, do_sample=False,
                     stopping_criteria=StoppingCriteriaList([CrashAfterDurable()]))
    raise SystemExit("the child was expected to kill itself")


def recovery_section(model, shape: str, n: int, repeats: int, engines: list[str]) -> dict:  # type: ignore[no-untyped-def]
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    work = Path(tempfile.mkdtemp(prefix="cnc-rec-"))
    crashed = work / "crashed"
    env = dict(os.environ, CONCORDIA_RING_DIR=str(Path("/dev/shm") / f"{work.name}-child"))
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", shape, str(n), str(crashed)], env=env,
                          capture_output=True, text=True, timeout=900, check=False)  # its exit is checked below
    child_s = time.perf_counter() - t
    if proc.returncode != -signal.SIGKILL or "CHILD durable" not in proc.stdout:
        raise RuntimeError(f"child exited {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-3000:]}")
    shutil.rmtree(env["CONCORDIA_RING_DIR"], ignore_errors=True)
    ids = _prompt(n)
    out: dict[str, Any] = {"context_tokens": n, "child_s": child_s,
                           "log_bytes": sum(f.stat().st_size for f in crashed.rglob("*") if f.is_file())}

    def first_token_s(fn) -> float:  # type: ignore[no-untyped-def]
        steps = Steps()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(steps)
        return steps.times[0] - t0

    def prefill(steps: Steps) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       stopping_criteria=criteria(steps))

    first_token_s(prefill)  # warm-up
    out["prefill_runs_s"] = [first_token_s(prefill) for _ in range(repeats)]
    out["prefill_s"] = statistics.median(out["prefill_runs_s"])
    from concordia_agents import Session

    for engine in engines:
        runs = []
        phases: dict[str, list[float]] = {"open_session_s": [], "register_regions_s": []}
        for r in range(repeats):
            home = work / f"{engine}-{r}"
            shutil.copytree(crashed, home)
            ring_dir = Path("/dev/shm") / f"{work.name}-{engine}-{r}"
            kind, _, verify = engine.partition("+")  # "copy+device", "executor+host", ...
            rt = Runtime.open(home=home, ring_dir=ring_dir,
                              backend_options={"restore_engine": kind, "restore_verify": verify},
                              **RT_OPTIONS)
            try:
                def resume(steps: Steps, rt: Any = rt) -> None:
                    durable_generate(model, ids, "recover", runtime=rt, max_new_tokens=8, do_sample=False,
                                     stopping_criteria=criteria(steps))
                with _timed(Runtime, "session", phases["open_session_s"]), \
                        _timed(Session, "register", phases["register_regions_s"]):
                    runs.append(first_token_s(resume))
            finally:
                rt.close()
                shutil.rmtree(home, ignore_errors=True)
                shutil.rmtree(ring_dir, ignore_errors=True)
        out[f"resume_{engine}_phases_s"] = phases
        out[f"resume_{engine}_runs_s"] = runs
        out[f"resume_{engine}_s"] = statistics.median(runs)
        out[f"speedup_{engine}"] = out["prefill_s"] / out[f"resume_{engine}_s"]
        out[f"restore_GBps_{engine}"] = out["log_bytes"] / out[f"resume_{engine}_s"] / 1e9
    shutil.rmtree(work, ignore_errors=True)
    return out


def _checkpoint(result: dict) -> None:
    """Write what was measured so far under $OUT (a run cut short keeps its figures)."""
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "transformers_gpu-partial.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=["decode", "recovery"])
    p.add_argument("--child", nargs=3, metavar=("SHAPE", "N", "HOME"))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--no-resident", action="store_true", help="decode: skip the resident-executor runtime")
    p.add_argument("--repeats", type=int, help="decode: runs of each variant (default 3, 2 with --quick)")
    p.add_argument("--paired-new", type=int, help="decode: new tokens of each checkpoint_every=2 run "
                   "(default: as many as the other runs)")
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    from concordia_agents import Runtime

    result: dict = {"benchmark": "transformers_gpu", "device": torch.cuda.get_device_name(0),
                    "versions": versions("transformers", "cupy-cuda13x"), "prompt_len": 2048,
                    "runtime_options": {k: v for k, v in RT_OPTIONS.items()}, "quick": args.quick}
    # The default runtime, and one whose executor stays resident across decode
    # steps (idle window and lifetime longer than a step): the difference is
    # what parking and relaunching once per token costs. (Measured and dropped
    # earlier: an idle window of 0.5 ms instead of 10 ms was no faster per step.)
    # Each ring holds a whole batch-8 8B prompt epoch (2 GiB): with a smaller
    # ring the first decode steps wait for the flusher to drain the prompt to
    # disk (the ring's backpressure), which is not decode cost.
    homes = [Path(tempfile.mkdtemp()) for _ in range(2)]
    rts = {"": Runtime.open(home=homes[0], **{**RT_OPTIONS, "ring_bytes": 3 << 30})}
    if not args.no_resident:
        resident = {"idle_ms": 200.0, "max_life_ms": 60e3}
        rts["_resident"] = Runtime.open(home=homes[1], **{**RT_OPTIONS, "ring_bytes": 3 << 30},
                                        backend_options=resident)
        result["resident_backend_options"] = resident
    try:
        for shape in args.shapes:
            if args.only == "recovery" and args.quick and shape != "llama-3-8b":
                continue
            model = build(shape)
            if args.only != "recovery":
                for batch in (1, 8):
                    key = f"decode_{shape}_b{batch}"
                    try:
                        result[key] = decode_section(rts, model, shape, batch, 2048, 24 if args.quick else 48,
                                                     args.repeats or (2 if args.quick else 3), args.paired_new)
                    except Exception:  # noqa: BLE001 - record and go on
                        result[key] = {"error": traceback.format_exc()[-2000:]}
                    print(key, json.dumps({k: v for k, v in result[key].items() if "runs" not in k}), flush=True)
                    _checkpoint(result)
            if args.only != "decode" and (shape == "llama-3-8b" or not args.quick):
                for n in (8192, 32768):
                    key = f"recovery_{shape}_{n // 1024}k"
                    try:
                        result[key] = recovery_section(model, shape, n, 2 if args.quick else 3,
                                                       ["copy+device", "executor+device", "copy+host"])
                    except Exception:  # noqa: BLE001
                        result[key] = {"error": traceback.format_exc()[-3000:]}
                    print(key, json.dumps(result[key]), flush=True)
                    _checkpoint(result)
            del model
            torch.cuda.empty_cache()
    finally:
        for rt in rts.values():
            rt.close()
        for h in homes:
            shutil.rmtree(h, ignore_errors=True)
    path = write("transformers_gpu" + ("-quick" if args.quick else ""), result)
    print("wrote", path)


if __name__ == "__main__":
    main()
