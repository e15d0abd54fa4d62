"""Compiled durable decoding (issue 17): ms per decode step of transformers'
compiled path, plain (``model.generate(cache_implementation="static")``)
against durable (``durable_generate(..., cache_implementation="static")``,
a checkpoint every token by the in-step producer inside the CUDA graph).

Random bf16 weights in Llama-3.2-1B and Llama-3-8B shapes, 2k-token prompt,
batch 1 and 8, greedy, CuPy backend. A step's time is taken on the device:
a stopping criterion (the same in both variants) records a CUDA event, with
no synchronization, when ``--from`` and when ``--new-tokens`` new tokens
exist; the steps between them are past compilation, CUDA graph recording
and the eager first steps, so per-call costs (session open, prefill, the
prompt's commit, recording graphs for a new cache, the final flush) stay out
of the per-step figure and are reported apart, as whole-call times. The
static cache has the same length in every call (no recompilation per call);
dynamo's recompile limit is raised and reset per shape (plain and durable
caches are different types, batches different shapes: a first version of
this benchmark hit the default limit of 8 and fell back to eager). A
durable call's whole time is also split by phase (medians): session open,
to the first commit (the prefill and the prompt's epoch), to the last token,
and the rest (``finish``), itself split into the final commit with its flush
to disk and the session's close. ``--ring-mib`` sets the durable calls'
host ring (default 3072, which holds the largest prompt epoch here; 64 is
the runtime's default, through which a larger epoch streams as the flusher
drains it): a new session's ring is created and page-locked inside its call,
and at its close a ring up to ``warm_ring_bytes`` (1 GiB) is kept warm (unmapped
after the call, untimed) while a larger one is unregistered and unmapped inside
it, so close and whole-call times compare only at one ring size.
``--fsync`` sets the durable calls' fsync policy (default ``none``; the
runtime's default is ``every_commit``): ``durable_generate``'s final flush
fsyncs under every policy, so under ``none`` the finish fsyncs all the call
wrote. The ``--flush-polls`` variants keep a 3 GiB ring and
``fsync="none"`` whatever these two say (recorded as
``flush_poll_variants_runtime``).
Protocol: one warm-up call of each variant (compilation), then
``--repeats`` rounds, variants interleaved in alternating order; median
over rounds, and the paired ratio (durable over plain of the same round),
median and range. Also: the HBM roofline of a step (weight bytes over the
measured device copy bandwidth) and each variant's ratio to it; and the host
work Concordia does per token in the durable runs: the Python calls of the
producer's launch (0 when every step is a graph replay).

``--eager`` adds the eager variants to the rounds: ``plain_eager``
(``generate`` with its default dynamic cache) and ``durable_eager``
(``durable_generate`` with its default ``DurableCache``, a commit per token
from the host), for the table of issue 17 (each durable variant against the
fastest plain one, compiled).

``--placements decoder overlap`` adds durable variants with the step hook
at those placements (``CONCORDIA_STEP_HOOK`` set around the call; each
placement's hooks set the cache's ``stepping`` value, so each compiles a
graph of its own in the one process), paired against plain and against
``durable`` (the process's own placement); their device epochs per call are
recorded, so a placement that committed nothing shows. ``--flush-polls MS
...`` adds, per period, ``durable_flusher_<period>`` (``durable_flusher_1s``,
``durable_flusher_100ms``): durable calls on a runtime whose flusher wakes
every MS milliseconds (``flush_poll``; its 3 GiB ring holds a call's epochs
undrained), so the flusher thread's share of the host's time beside
``generate``'s loop shows in the timed rounds, and how much of it a period
between the default 10 ms and a second gives back (a shorter period bounds
what a host crash may lose). ``--quiet-flusher`` is ``--flush-polls 1000``.

``--profile`` adds, per shape and batch, one more call of each variant and
of ``plain_durable_cache`` (plain ``generate`` given a ``DurableStaticCache``: no
session, no hook — the cache class alone), ``durable_every_64`` (a commit
every 64 steps: the kernel's commit work taken away) and
``durable_flusher_1s`` (a runtime whose flusher wakes once a second: the host
threads taken away), ``durable_hook_on_decoder`` (the step hook on the
decoder stack, inside the forward's graph, instead of on the model, where it
is a compiled frame and CUDA graph of its own: ``CONCORDIA_STEP_HOOK``),
``durable_views`` and ``plain_durable_cache_views`` (the layers' K/V as views
of the one storage instead of tensors with storage objects of their own, the
default since 2026-12-06: ``_cache._unaliased``) and
``plain_static_cache_passed`` (transformers' ``StaticCache`` given to
``generate`` as ``past_key_values``, as ours is) under ``torch.profiler`` for the
timed steps only: GPU kernel time and busy time (the union of kernel
intervals) per step against the window's span, the kernels by time, and the
CPU ops by self time. It says whether a durable step's extra time is device
work (which kernels) or the device waiting for the host.

    python bench/bench_compiled_decode_gpu.py [--shapes ...] [--batches 1 8] [--repeats 3] [--eager] [--profile]
        [--placements [model|decoder|overlap ...]] [--flush-polls MS ...] [--quiet-flusher] [--ring-mib 3072]
        [--fsync none|interval|every_commit]
        [--resume-tokens [N ...]]
        [--only steps|resume]
"""

from __future__ import annotations

import argparse
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
from unittest import mock

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_transformers_gpu import RT_OPTIONS, SHAPES, FirstToken, build
from bench.common import ResumeParts, versions, written

#: the host ring of the durable calls (``--ring-mib``'s default), of the slower-flusher variants and of the resume
#: child: it holds a call's epochs undrained, the batch-8 8B prompt epoch (2 GiB) included
BIG_RING = 3 << 30


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s: a 2 GiB device-to-device copy
    (bytes read plus bytes written), median of 5."""
    a = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del a, b
    return 2 * (2 << 30) / statistics.median(times[1:])


class LastToken(StoppingCriteria):
    """Notes when ``generate`` holds its last token (device synchronized
    first); never stops generation."""

    def __init__(self, length: int) -> None:
        self.length, self.at = length, 0.0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        if input_ids.shape[1] == self.length:
            torch.cuda.synchronize()
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class StepClock(StoppingCriteria):
    """Records a CUDA event (no synchronization) when ``generate`` holds
    ``start`` and ``end`` new tokens; never stops generation."""

    def __init__(self, prompt_len: int, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.events = {prompt_len + n: torch.cuda.Event(enable_timing=True) for n in (start, end)}

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        event = self.events.get(input_ids.shape[1])
        if event is not None:
            event.record()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def ms_per_step(self) -> float:
        first, last = self.events.values()
        last.synchronize()
        return first.elapsed_time(last) / (self.end - self.start)


class ProfileWindow(StoppingCriteria):
    """Runs ``prof`` while ``generate`` goes from ``start`` to ``end`` new
    tokens (the same steps ``StepClock`` times); never stops generation."""

    def __init__(self, prof: Any, prompt_len: int, start: int, end: int) -> None:
        self.prof, self.begin, self.finish = prof, prompt_len + start, prompt_len + end

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
        n = input_ids.shape[1]
        if n == self.begin:
            self.prof.start()
        elif n == self.finish:
            torch.cuda.synchronize()
            self.prof.stop()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def profile_summary(prof: Any, steps: int) -> dict[str, Any]:
    """Per step: kernel time, device busy time (union of kernel intervals) and
    the span from the first kernel's start to the last one's end, in us; the
    in-step producer's launches (``cnc_step_commit``: 0 in a durable variant
    means its steps committed nothing, a graph replayed without the hook); the
    15 kernels and the 10 CPU ops with the most time."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    for e in kernels:
        count_us = by_name.setdefault(e.name[:100], [0, 0.0])
        count_us[0] += 1
        count_us[1] += e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]
    cpu = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                 key=lambda e: -e.self_cpu_time_total)[:10]
    return {
        "kernel_us_per_step": sum(v[1] for v in by_name.values()) / steps,
        "busy_us_per_step": busy / steps,
        "span_us_per_step": (spans[-1][1] - spans[0][0]) / steps if spans else None,
        "kernels_per_step": len(kernels) / steps,
        "producer_launches_per_step": by_name.get("cnc_step_commit", [0, 0.0])[0] / steps,
        "top_kernels": [{"name": k, "per_step": v[0] / steps, "us_per_step": v[1] / steps} for k, v in top],
        "top_cpu_ops": [{"name": e.key[:100], "calls_per_step": e.count / steps,
                         "self_us_per_step": e.self_cpu_time_total / steps} for e in cpu],
    }


def period_label(seconds: float) -> str:
    """``1s``, ``100ms``: a flusher period (whole milliseconds, ``main`` checks) as a variant's name ends."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def profile_variants(model: Any, batch: int, ids: torch.Tensor, prompt_len: int, start: int, new_tokens: int,
                     plain: Any, durable: Any, quiet: list[Any]) -> dict[str, Any]:
    """``--profile``: one call of each variant (module docs) under the profiler
    for the timed steps. ``quiet`` receives the slow-flusher runtime (the
    caller closes it)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler
    from transformers import StaticCache

    from concordia_agents import Runtime
    from integrations.transformers import DurableStaticCache, _cache

    def fresh(fn: Any) -> float:
        """``fn()`` with dynamo's caches emptied before and after: dynamo does not
        guard on a submodule's hooks, so the decoder-hook variant would replay a
        graph compiled without its hook (the first profile measured exactly that:
        no producer kernel ran); the views must not reuse the split storages' graphs."""
        torch._dynamo.reset()
        try:
            return float(fn())
        finally:
            torch._dynamo.reset()

    def on_decoder(run: Any, w: Any) -> float:  # the step hook on the decoder stack (_steps.py)
        with mock.patch.dict(os.environ, {"CONCORDIA_STEP_HOOK": "decoder"}):
            return fresh(lambda: run([w]))

    def views(run: Any, w: Any) -> float:  # layers' K/V as views of one storage (_cache._unaliased)
        with mock.patch.object(_cache, "_SPLIT_STORAGE", False):
            return fresh(lambda: run(w))

    def durable_cache() -> Any:
        return DurableStaticCache.for_model(model, batch_size=batch, max_cache_len=prompt_len + new_tokens + 1)

    def static_cache() -> Any:  # transformers' own, passed as generate's past_key_values like ours
        return StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)

    plain(cache=durable_cache())  # compiles generate's step for this cache class
    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):  # CUPTI starts up here
        torch.ones(1, device=ids.device).add_(1)
        torch.cuda.synchronize()
    # Durable variants that each take one suspect away: a commit every 64 steps (the kernel launches every
    # step but commits once in the window: its commit work); a runtime whose flusher wakes once a second
    # (host threads beside generate's loop, which syncs every step); and one that may remove a cost: the hook on
    # the decoder stack, inside the forward's graph.
    quiet.append(Runtime.open(home=Path(tempfile.mkdtemp()),
                              **{**RT_OPTIONS, "ring_bytes": BIG_RING, "flush_poll": 1.0}))
    runs = {"plain": lambda w: plain([w]), "durable": lambda w: durable([w]),
            "plain_durable_cache": lambda w: plain([w], cache=durable_cache()),
            "plain_durable_cache_views": lambda w: views(lambda v: plain([v], cache=durable_cache()), w),
            "plain_static_cache_passed": lambda w: plain([w], cache=static_cache()),
            "durable_every_64": lambda w: durable([w], every=64),
            "durable_flusher_1s": lambda w: durable([w], runtime=quiet[-1]),
            "durable_hook_on_decoder": lambda w: on_decoder(durable, w),
            "durable_views": lambda w: views(lambda v: durable([v]), w)}
    out: dict[str, Any] = {}
    for name, run in runs.items():
        prof = profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        ms = run(ProfileWindow(prof, prompt_len, start, new_tokens))
        out[name] = {"ms_per_step_profiled": ms, **profile_summary(prof, new_tokens - start)}
    return out


def section(model: Any, batch: int, prompt_len: int, start: int, new_tokens: int, repeats: int,
            profile: bool = False, eager: bool = False, placements: tuple[str, ...] = (),
            flush_polls: tuple[float, ...] = (), ring_bytes: int = BIG_RING, fsync: str = "none") -> dict[str, Any]:
    from concordia_agents import Runtime
    from gpu_runtime.cuda import step_commit
    from integrations.transformers import durable_generate

    ids = torch.randint(3, 30000, (batch, prompt_len), generator=torch.Generator().manual_seed(5)).cuda()
    calls = {"launch": 0}
    launch = step_commit.StepCommitter.launch

    def counted(self: Any, *a: Any) -> None:
        calls["launch"] += 1
        launch(self, *a)

    step_commit.StepCommitter.launch = counted  # type: ignore[method-assign]
    steps_seen: dict[str, list[int]] = {}  # device epochs per durable call, by variant
    whole: dict[str, list[float]] = {}

    def plain(extra: list[Any] | None = None, cache: Any = None, *, static: bool = True) -> float:
        clock = StepClock(prompt_len, start, new_tokens)
        how: dict[str, Any] = ({"past_key_values": cache} if cache is not None
                               else {"cache_implementation": "static"} if static else {})
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock, *(extra or [])]), **how)
        torch.cuda.synchronize()
        whole.setdefault("plain" if static else "plain_eager", []).append(time.perf_counter() - t)
        return clock.ms_per_step()

    # One runtime (one home: its kernel cache compiles the executor's handlers once) for the section; each
    # call is a new session, deleted after it. A call's whole time includes creating and page-locking its
    # session's ring (--ring-mib; the default 3 GiB holds the batch-8 8B prompt epoch, a smaller one streams
    # it through, the flusher draining as the commit waits for room).
    home = Path(tempfile.mkdtemp())
    rt = Runtime.open(home=home, **{**RT_OPTIONS, "ring_bytes": ring_bytes, "fsync": fsync})
    made = [0]
    quiet: list[Any] = []  # runtimes with a slower flusher (--flush-polls, --profile), closed with the section
    phases: dict[str, list[dict[str, float]]] = {}  # a durable call's time by phase (durable())

    def durable(extra: list[Any] | None = None, *, static: bool = True, every: int = 1,
                runtime: Any = None, placement: str | None = None, label: str | None = None) -> float:
        made[0] += 1
        sid = f"bench-{made[0]}"
        events: list[Any] = []
        clock = StepClock(prompt_len, start, new_tokens)
        how: dict[str, Any] = {"cache_implementation": "static"} if static else {}
        if every != 1:
            how["checkpoint_every"] = every
        on = runtime or rt
        stamps: list[tuple[str, float]] = []
        last = LastToken(prompt_len + new_tokens)

        def noted(e: Any) -> None:
            events.append(e)
            stamps.append((e.phase, time.perf_counter()))

        name = label or ("durable_eager" if not static else f"durable_{placement}" if placement else "durable")
        chosen = {"CONCORDIA_STEP_HOOK": placement} if placement else {}
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            with mock.patch.dict(os.environ, chosen):
                durable_generate(model, ids, sid, runtime=on, max_new_tokens=new_tokens, do_sample=False,
                                 on_event=noted,
                                 stopping_criteria=StoppingCriteriaList([clock, *(extra or []), last]), **how)
            torch.cuda.synchronize()
            end = time.perf_counter()
            whole.setdefault(name, []).append(end - t)
            # Where a call's time goes: session open (lease, ring), then to the first commit (the prompt's
            # epoch on the host), then to the last token, then the finish: the final commit and its flush to
            # disk (to the "done" event: also generate's own tail and the step hook's detach),
            # then the session's close.
            opened = next(at for phase, at in stamps if phase == "opened")
            first = next((at for phase, at in stamps if phase == "token_committed"), opened)
            done = next((at for phase, at in stamps if phase == "done"), end)
            phases.setdefault(name, []).append({"open": opened - t, "to_first_commit": first - opened,
                                                "to_last_token": last.at - first, "finish": end - last.at,
                                                "final_commit_flush": done - last.at, "close": end - done})
        finally:
            on.delete(sid)  # no disk writeback of this call carried into the next
        if static:
            steps_seen.setdefault(name, []).append(events[-1].in_step_epochs)
        return clock.ms_per_step()

    try:
        variants: dict[str, Any] = {"plain": plain, "durable": durable}
        if eager:
            variants.update(plain_eager=lambda: plain(static=False), durable_eager=lambda: durable(static=False))
        for where in placements:  # the step hook's other placements (_steps.py), each a graph of its own
            variants[f"durable_{where}"] = lambda where=where: durable(placement=where)
        for period in flush_polls:  # the host's flusher thread's passes spaced out (module docs)
            slow = Runtime.open(home=Path(tempfile.mkdtemp()),
                                **{**RT_OPTIONS, "ring_bytes": BIG_RING, "flush_poll": period})
            quiet.append(slow)
            label = f"durable_flusher_{period_label(period)}"
            variants[label] = lambda slow=slow, label=label: durable(runtime=slow, label=label)
        for fn in variants.values():  # warm-up: compile, record
            fn()
        calls["launch"] = 0
        steps_seen.clear()
        whole.clear()
        phases.clear()
        rounds: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(repeats):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                rounds[name].append(variants[name]())
        launches = calls["launch"]
        timed_whole = {k: list(v) for k, v in whole.items()}
        timed_phases = {k: {p: statistics.median(c[p] for c in v) for p in v[0]} for k, v in phases.items()}
        profiles: dict[str, Any] = {}
        if profile:
            try:
                profiles = profile_variants(model, batch, ids, prompt_len, start, new_tokens, plain, durable, quiet)
            except Exception:  # noqa: BLE001 - the timed rounds above stand; say what failed
                profiles = {"error": traceback.format_exc()[-3000:]}
            for name, seen in steps_seen.items():  # the profiled calls are not timed rounds
                del seen[len(rounds.get(name, [])):]
    finally:
        step_commit.StepCommitter.launch = launch  # type: ignore[method-assign]
        rt.close()
        shutil.rmtree(home, ignore_errors=True)
        for q in quiet:
            q.close()
            shutil.rmtree(q.config.home, ignore_errors=True)

    def paired(a: str, b: str) -> dict[str, Any]:
        r = [x / y for x, y in zip(rounds[a], rounds[b], strict=True)]
        return {"median": statistics.median(r), "range": [min(r), max(r)]}

    ratios = paired("durable", "plain")
    out: dict[str, Any] = {
        "ms_per_step": {k: statistics.median(v) for k, v in rounds.items()},
        "rounds_ms": rounds,
        "durable_over_plain_paired": ratios["median"],
        "paired_range": ratios["range"],
        "whole_call_s": {k: statistics.median(v) for k, v in timed_whole.items()},
        "durable_call_phases_s": timed_phases,
        # per timed compiled durable call, of every durable variant
        "host_launch_calls_per_call": launches / max(1, sum(len(v) for v in steps_seen.values())),
        "device_epochs_per_call": statistics.median(steps_seen["durable"]) if steps_seen.get("durable") else None,
        "device_epochs_per_call_by_variant": {k: statistics.median(v) for k, v in steps_seen.items() if v},
    }
    for variant in (k for k in steps_seen if k != "durable"):  # the extra durable variants
        out[f"{variant}_over_plain_paired"] = paired(variant, "plain")  # against plain, and the default durable
        out[f"{variant}_over_durable_paired"] = paired(variant, "durable")
    if eager:
        # The table: each durable variant against the fastest plain one (compiled).
        out["durable_eager_over_plain_eager_paired"] = paired("durable_eager", "plain_eager")
        out["durable_eager_over_plain_paired"] = paired("durable_eager", "plain")
    if profiles:
        out["profile"] = profiles
    return out


def _resume_ids(n: int) -> torch.Tensor:
    return torch.randint(3, 30000, (1, n), generator=torch.Generator().manual_seed(6)).cuda()


def resume_child(shape: str, n: int, home: str) -> None:
    """A compiled durable generation on an ``n``-token prompt, SIGKILLed at a
    token boundary once 8 new tokens exist (the device committed each step)."""
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    model = build(shape)
    rt = Runtime.open(home=home, **{**RT_OPTIONS, "ring_bytes": BIG_RING})

    class Kill(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            if input_ids.shape[1] >= n + 8:
                torch.cuda.synchronize()  # the steps' epochs are in the host ring
                time.sleep(0.5)  # the flusher copies them into the segments (the parent copies the home only)
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.zeros(1, dtype=torch.bool, device=input_ids.device)

    durable_generate(model, _resume_ids(n), "resume", runtime=rt, max_new_tokens=16, do_sample=False,
                     cache_implementation="static", stopping_criteria=StoppingCriteriaList([Kill()]))


def resume_section(model: Any, shape: str, n: int, repeats: int) -> dict[str, Any]:
    """Resume of a SIGKILLed compiled durable generation of ``n`` context
    tokens to its first new token (session open, KV restored from the log, one
    token re-forwarded through the compiled step) against a re-prefill (plain
    compiled ``generate`` of one token on the same prompt). One warm-up resume
    first (it compiles the step for this cache length, as a long-lived server
    process would have; a fresh process adds the compilation, reported apart),
    then ``repeats`` of each on a fresh copy of the child's home. Each timed
    resume's ``parts`` (``bench.common.ResumeParts``): session open, restore
    and its rate (and the pipeline's own account), and the new ring's
    page-locking, which the resume's first commit waits for. A third kind of
    run, interleaved with the two, resumes with ``ring_prepare`` and
    ``restore_prepare`` on (the restore's pinned pool page-locked on a thread
    of its own from the runtime's open, the ring from the session's open);
    the plain resumes turn ``restore_prepare`` (the default since 2026-12-07)
    off, so that they stay the comparison.
    Every resume waits 0.5 s between opening its runtime and the timed call,
    as a process loads its model in between."""
    from concordia_agents import Runtime
    from integrations.transformers import durable_generate

    src = Path(tempfile.mkdtemp())
    # The child's ring in a directory of its own, removed after it (a SIGKILLed child leaves 3 GiB there).
    env = dict(os.environ, CONCORDIA_RING_DIR=tempfile.mkdtemp(dir="/dev/shm"))
    try:
        r = subprocess.run([sys.executable, __file__, "--resume-child", shape, str(n), str(src)], check=False,
                           capture_output=True, text=True, timeout=900, env=env)
    finally:
        shutil.rmtree(env["CONCORDIA_RING_DIR"], ignore_errors=True)
    if r.returncode != -signal.SIGKILL:
        shutil.rmtree(src, ignore_errors=True)
        raise RuntimeError(f"child ended with {r.returncode}: {r.stderr[-2000:]}")
    ids = _resume_ids(n)
    resumed: list[float] = []
    prepared: list[float] = []  # resumes with ring_prepare and restore_prepare on (docs/gpu.md, Options)
    reprefill: list[float] = []
    first_forward: list[int] = []
    parts: list[dict[str, Any]] = []  # per timed resume: open, restore, the ring's page-locking (ResumeParts)

    def resume_once(prepare: bool = False) -> float:
        home = Path(tempfile.mkdtemp())
        shutil.copytree(src, home, dirs_exist_ok=True)
        try:
            # The child's lease is taken over at once: its owner's PID on this machine is dead (_owner.py).
            # RT_OPTIONS' 256 MiB ring, not the child's 3 GiB: the copy has no ring, so the resume creates one and
            # page-locks it (at the step producer's start) inside the timed call; a resumed step's epochs are a row.
            options = {"ring_prepare": True, "restore_prepare": True} if prepare else {"restore_prepare": False}
            with Runtime.open(home=home, **{**RT_OPTIONS, "lease_ttl": 0.5, "backend_options": options}) as rt:
                time.sleep(0.5)  # as a process loads its model between opening its runtime and resuming
                first = FirstToken()
                inputs: list[int] = []
                hook = model.register_forward_pre_hook(
                    lambda m, a, kw: inputs.append(int((kw.get("input_ids") if kw.get("input_ids") is not None
                                                        else a[0]).shape[1])) if not inputs else None,
                    with_kwargs=True)
                torch.cuda.synchronize()
                t = time.perf_counter()
                try:
                    with ResumeParts() as measured:
                        durable_generate(model, ids, "resume", runtime=rt, max_new_tokens=16, do_sample=False,
                                         cache_implementation="static",
                                         stopping_criteria=StoppingCriteriaList([first]))
                finally:
                    hook.remove()
                parts.append({"prepared": prepare, **measured.report()})
                first_forward.append(inputs[0] if inputs else -1)
                assert first.at is not None
                return first.at - t
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def reprefill_once() -> float:
        first = FirstToken()
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                       cache_implementation="static", stopping_criteria=StoppingCriteriaList([first]))
        assert first.at is not None
        return first.at - t

    try:
        warm_resume = resume_once()
        warm_prefill = reprefill_once()
        first_forward.clear()
        parts.clear()
        for i in range(repeats):
            runs = ((resume_once, resumed), (lambda: resume_once(prepare=True), prepared), (reprefill_once, reprefill))
            for fn, out in runs[:: 1 if i % 2 == 0 else -1]:
                out.append(fn())
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return {"tokens": n, "resume_ring_bytes": RT_OPTIONS["ring_bytes"],
            "resume_first_token_s": statistics.median(resumed),
            "reprefill_first_token_s": statistics.median(reprefill),
            "speedup": statistics.median(reprefill) / statistics.median(resumed),
            "runs": {"resume_s": resumed, "resume_prepared_s": prepared, "reprefill_s": reprefill},
            "resume_prepared_first_token_s": statistics.median(prepared),
            "first_forward_tokens": first_forward,
            "parts": parts,
            "warm_up_s": {"resume (compiles this cache length)": warm_resume, "reprefill": warm_prefill}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=80)
    p.add_argument("--from", dest="start", type=int, default=16, help="steps timed from this many new tokens on")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--resume-tokens", type=int, nargs="*", default=[32768],
                   help="context lengths of the resume-vs-re-prefill section (on the last shape); none: skip it")
    p.add_argument("--only", choices=["steps", "resume"])
    p.add_argument("--profile", action="store_true", help="also profile one call of each variant (module docs)")
    p.add_argument("--eager", action="store_true",
                   help="also time plain generate and durable_generate with their default (eager, dynamic) caches")
    p.add_argument("--placements", nargs="*", default=[], choices=["model", "decoder", "overlap"],
                   help="also time durable calls with the step hook at these placements (integrations/transformers/"
                        "_steps.py), as variants durable_<placement> of the same rounds")
    p.add_argument("--flush-polls", type=float, nargs="*", default=[], metavar="MS",
                   help="also time durable calls on runtimes whose flusher wakes every MS milliseconds, as variants "
                        "durable_flusher_<period> (module docs)")
    p.add_argument("--quiet-flusher", action="store_true", help="the same as --flush-polls 1000")
    p.add_argument("--ring-mib", type=int, default=BIG_RING >> 20,
                   help="the host ring of the durable calls' sessions (the --flush-polls variants keep 3 GiB: "
                        "they hold a call's epochs undrained); 64 is the runtime's default")
    p.add_argument("--fsync", choices=["none", "interval", "every_commit"], default="none",
                   help="the durable calls' fsync policy (the --flush-polls variants keep none; every_commit is "
                        "the runtime's default; a call's final flush fsyncs under every policy, so under none the "
                        "finish fsyncs the whole call)")
    p.add_argument("--resume-child", nargs=3, metavar=("SHAPE", "N", "HOME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    polls = sorted({ms / 1000 for ms in [*args.flush_polls, *([1000.0] if args.quiet_flusher else [])]})
    if any(not 1 <= ms <= 3_600_000 or ms != round(ms) for ms in args.flush_polls):
        p.error(f"expected --flush-polls periods of whole milliseconds from 1 to 3600000, found {args.flush_polls}")
    if not 16 <= args.ring_mib <= 65536:  # a ring holds at least four of the largest records (4 MiB here)
        p.error(f"expected --ring-mib from 16 to 65536, found {args.ring_mib}")
    if args.repeats < 1 or not 0 < args.start < args.new_tokens:
        p.error(f"expected --repeats >= 1 and 0 < --from < --new-tokens, found {args.repeats}, {args.start}, "
                f"{args.new_tokens}")
    if args.resume_child:
        resume_child(args.resume_child[0], int(args.resume_child[1]), args.resume_child[2])
        return
    from integrations.transformers import _cache, _steps

    torch.use_deterministic_algorithms(False)
    torch._dynamo.config.recompile_limit = 64  # plain/durable cache types x batches (module docs)
    bw = copy_bandwidth()
    result: dict[str, Any] = {"benchmark": "compiled_decode_gpu", "device": torch.cuda.get_device_name(0),
                              "versions": versions("transformers", "cupy-cuda13x"), "prompt_len": args.prompt_len,
                              "new_tokens": args.new_tokens, "timed_from": args.start, "repeats": args.repeats,
                              "copy_bandwidth_GBps": bw / 1e9,
                              "runtime_options": {**RT_OPTIONS, "ring_bytes": args.ring_mib << 20,
                                                  "fsync": args.fsync},
                              "profiled": args.profile, "eager_variants": args.eager, "flush_polls_s": polls,
                              "flush_poll_variants_runtime": {"ring_bytes": BIG_RING, "fsync": RT_OPTIONS["fsync"]},
                              "step_hook": _steps.hook_placement(),
                              "split_storage": _cache._SPLIT_STORAGE}
    with written("compiled_decode_gpu", result):
        for shape in args.shapes:
            model = build(shape)
            weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
            roofline_ms = weight_bytes / bw * 1e3
            for batch in args.batches if args.only != "resume" else ():
                key = f"{shape}_b{batch}"
                try:
                    r = section(model, batch, args.prompt_len, args.start, args.new_tokens, args.repeats,
                                args.profile, args.eager, tuple(args.placements), tuple(polls),
                                args.ring_mib << 20, args.fsync)
                    r["roofline_ms"] = roofline_ms
                    r["over_roofline"] = {k: v / roofline_ms for k, v in r["ms_per_step"].items()}
                    result[key] = r
                except Exception:  # noqa: BLE001 - record and go on
                    result[key] = {"error": traceback.format_exc()[-3000:]}
                print(key, json.dumps({k: v for k, v in result[key].items() if k not in ("rounds_ms", "profile")}),
                      flush=True)
                for name, prof in result[key].get("profile", {}).items():
                    brief = ({k: v for k, v in prof.items() if not k.startswith("top")} if isinstance(prof, dict)
                             else prof)
                    print(f"  profile {name}:", json.dumps(brief), flush=True)
            for n in args.resume_tokens if args.only != "steps" and shape == args.shapes[-1] else ():
                key = f"{shape}_resume_{n // 1024}k"
                try:
                    result[key] = resume_section(model, shape, n, args.repeats)
                except Exception:  # noqa: BLE001 - record and go on
                    result[key] = {"error": traceback.format_exc()[-3000:]}
                print(key, json.dumps({k: v for k, v in result[key].items() if k != "runs"}), flush=True)
            del model
            torch._dynamo.reset()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
