"""Conversations on the GPU (issue 18): what reusing a conversation's KV saves.

Random bf16 weights in the Llama-3-8B shape (``--shape``), CuPy backend.

Turns: a conversation of ``--turns`` turns, each a ``--user-tokens`` user
message and a ``--reply-tokens`` greedy reply, growing to about 32k tokens.
Per turn, ``conversation_generate`` (prefills only the new suffix; KV
resident) against plain ``model.generate`` on the same full prompt (a
re-prefill every turn), alternating which runs first: time to first token
(a stopping criterion's first call, after the stream is synchronized) and the
call's total time.

Ring registration: what page-locking a session's host ring for the device
costs by ring size (a fixed cost of the first commit of a session this process
has not kept the ring of; ``warm_ring_bytes``).

Then the conversation as the turns left it (every turn's per-token epochs)
is brought back from the log by a new runtime with nothing resident, for one
more turn: time to first token and the open/restore parts (the log of a
multi-turn run, unlike the resume child's single prefill epoch).

Resume: a child process builds a conversation of ``N`` tokens (8k, 32k),
starts the next call and SIGKILLs itself after that call's first token is
durable; here, the time from the retried call to its first new token (the KV
restored from the log into the GPU, one token re-forwarded) against plain
``generate`` of one token on the same prompt (the re-prefill), ``--repeats``
times each on a fresh copy of the child's home. The conversation parked in
pinned host memory and copied back (the host tier's eviction and restore).
Also the conversation's GPU
memory (its cache), the restore's share of the resume, and a sweep of the
restore's options on the child's log (``restore_sweep``: the host's ``pread``
rate alone, reader threads, span size, checksum site).

    python bench/bench_conversation_gpu.py [--shape llama-3-8b] [--quick]
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

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_transformers_gpu import RT_OPTIONS, SHAPES, FirstToken, build
from bench.common import ResumeParts, versions, written

#: a 512 MiB ring holds a turn's suffix prefill (1500 tokens: 192 MB on the 8B shape) and is kept mapped and
#: registered between a conversation's calls (warm_ring_bytes, default 1 GiB); the resume child, whose first
#: call prefills up to 32k tokens (4 GiB) in one epoch, has a 3 GiB ring
_OPTIONS = {**RT_OPTIONS, "ring_bytes": 512 << 20}
_CHILD_OPTIONS = {**_OPTIONS, "ring_bytes": 3 << 30}


def _message(turn: int, n: int) -> torch.Tensor:
    return torch.randint(3, 30000, (1, n), generator=torch.Generator().manual_seed(turn)).cuda()


def _profiled(label: str, fn: Any) -> Any:
    """Run ``fn`` under torch.profiler and print its 15 costliest CUDA kernels
    and CPU ops (where a durable turn's time goes: which attention kernel the
    suffix prefill over kept KV runs, what Concordia's commits cost)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
    print(f"profile of {label}:", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15), flush=True)
    return out


def turns_section(model: Any, turns: int, user_tokens: int, reply_tokens: int,
                  profile_turn: int | None = None) -> dict[str, Any]:
    from concordia_agents import Runtime
    from integrations.transformers import ConversationCall, ResidentConversations, conversation_generate

    home = Path(tempfile.mkdtemp())
    rows = []
    host_tier: dict[str, Any] = {}
    try:
        with Runtime.open(home=home, **_OPTIONS) as rt:
            pool = ResidentConversations()
            out = torch.zeros(1, 0, dtype=torch.int64, device="cuda")
            max_len = (turns + 1) * (user_tokens + reply_tokens) + 16  # the turns and the one restored from the log
            # Warm-up, untimed: the process's first forwards and the executor's handlers (compiled into this
            # home's kernel cache) are not charged to turn 1; a throwaway conversation with its own pool, of two
            # calls: the second prefills a suffix over kept KV, a path (attention with a past) the first call
            # does not run (turn 2 of the first run, its first use in the process, took 0.78 s to its first
            # token against 0.11 s for turn 3: the suspect).
            warm, warm_pool = _message(99, 64), ResidentConversations()
            model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False)
            for call in ("w1", "w2"):
                warm = conversation_generate(model, warm, "warm-up", call, runtime=rt, resident=warm_pool,
                                             max_cache_len=512, max_new_tokens=2, do_sample=False)
                warm = torch.cat([warm, _message(98, 64)], dim=1)
            del warm_pool
            for turn in range(turns):
                prompt = torch.cat([out, _message(turn, user_tokens)], dim=1)
                row: dict[str, Any] = {"turn": turn + 1, "prompt_tokens": int(prompt.shape[1])}

                def durable(prompt: torch.Tensor = prompt, turn: int = turn, row: dict[str, Any] = row) -> torch.Tensor:
                    first, calls = FirstToken(), []
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    res = conversation_generate(model, prompt, "bench", f"t{turn}", runtime=rt, resident=pool,
                                                max_cache_len=max_len, max_new_tokens=reply_tokens, do_sample=False,
                                                stopping_criteria=StoppingCriteriaList([first]),
                                                on_call=lambda c: calls.append(c))
                    torch.cuda.synchronize()
                    call: ConversationCall = calls[-1]
                    row.update(durable_ttft_s=first.at - t, durable_total_s=time.perf_counter() - t,
                               reused=call.reused, prefilled=call.prefilled, source=call.source)
                    return res

                def plain(prompt: torch.Tensor = prompt, row: dict[str, Any] = row) -> None:
                    first = FirstToken()
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=reply_tokens,
                                   do_sample=False, stopping_criteria=StoppingCriteriaList([first]))
                    torch.cuda.synchronize()
                    row.update(plain_ttft_s=first.at - t, plain_total_s=time.perf_counter() - t)

                if turn + 1 == profile_turn:  # diagnosis only: this turn's times include the profiler
                    out = _profiled(f"durable turn {turn + 1}", durable)
                    _profiled(f"plain turn {turn + 1}", plain)
                    row["profiled"] = True
                elif turn % 2:
                    plain()
                    out = durable()
                else:
                    out = durable()
                    plain()
                row["ttft_speedup"] = row["plain_ttft_s"] / row["durable_ttft_s"]
                rows.append(row)
                print("turn", json.dumps(row), flush=True)
            cache_bytes = pool.nbytes
            host_tier = _park_and_back(pool)
            print("host tier", json.dumps(host_tier), flush=True)
        # The conversation as an agent leaves it (a per-token epoch log of every turn), brought back from the
        # log by a new runtime with nothing resident (after an eviction, in a new process): one more turn.
        from_log: dict[str, Any] = {}
        try:
            pool = ResidentConversations()  # the turns' resident KV let go
            torch.cuda.empty_cache()
            with Runtime.open(home=home, **_OPTIONS) as rt:
                prompt = torch.cat([out, _message(turns, user_tokens)], dim=1)
                got: list[ConversationCall] = []
                first = FirstToken()
                torch.cuda.synchronize()
                with ResumeParts() as measured:
                    t = time.perf_counter()
                    conversation_generate(model, prompt, "bench", f"t{turns}", runtime=rt,
                                          resident=ResidentConversations(), max_cache_len=max_len,
                                          max_new_tokens=reply_tokens, do_sample=False,
                                          stopping_criteria=StoppingCriteriaList([first]), on_call=got.append)
                from_log = {"prompt_tokens": int(prompt.shape[1]), "ttft_s": first.at - t,
                            "reused": got[-1].reused, "source": got[-1].source,
                            "log_bytes": sum(f.stat().st_size for f in rt.session_dir("conversation:bench").rglob("*")
                                             if f.is_file()), **measured.report()}
        except Exception:  # noqa: BLE001 - record and go on
            from_log = {"error": traceback.format_exc()[-3000:]}
        print("from log", json.dumps(from_log), flush=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {"turns": rows, "conversation_gpu_bytes": cache_bytes, "host_tier": host_tier,
            "restored_from_log": from_log,
            "ttft_speedup_from_8k": min((r["ttft_speedup"] for r in rows if r["prompt_tokens"] >= 8192), default=None)}


def _park_and_back(pool: Any, repeats: int = 3) -> dict[str, Any]:
    """Eviction to the pinned-host tier and back (``ResidentConversations(host_budget_bytes=...)``): the
    time to park the conversation's KV in host memory and to copy it back, medians of ``repeats``."""
    from integrations.transformers._conversation import _Parked

    try:
        item = pool._items["bench"]
        park, back = [], []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            parked = _Parked.of(item)
            park.append(time.perf_counter() - t)
            t = time.perf_counter()
            parked.unpark()
            back.append(time.perf_counter() - t)
            del parked
        nbytes, p, b = item.nbytes, statistics.median(park), statistics.median(back)
        return {"bytes": nbytes, "park_s": p, "unpark_s": b, "park_gb_s": nbytes / p / 1e9,
                "unpark_gb_s": nbytes / b / 1e9}
    except Exception:  # noqa: BLE001 - record and go on
        return {"error": traceback.format_exc()[-2000:]}


def child(shape: str, n: int, home: str) -> None:
    """Build a conversation of ``n`` tokens, start the next call, SIGKILL after its first durable token."""
    from concordia_agents import Runtime
    from integrations.transformers import conversation_generate

    model = build(shape)
    rt = Runtime.open(home=home, **_CHILD_OPTIONS)
    first = conversation_generate(model, _message(0, n - 1), "resume", "build", runtime=rt, max_cache_len=n + 64,
                                  max_new_tokens=1, do_sample=False)

    class Kill(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            if input_ids.shape[1] > first.shape[1] + 16 + 1:  # the first new token's epoch was handed over
                time.sleep(0.5)  # the executor publishes it meanwhile
                os.kill(os.getpid(), signal.SIGKILL)
            return torch.zeros(1, dtype=torch.bool, device=input_ids.device)

    conversation_generate(model, torch.cat([first, _message(1, 16)], dim=1), "resume", "next", runtime=rt,
                          max_cache_len=n + 64, max_new_tokens=8, do_sample=False,
                          stopping_criteria=StoppingCriteriaList([Kill()]))


def h2d_bandwidth() -> float:
    """Pinned host-to-device copy bandwidth in bytes/s: 1 GiB, median of 5."""
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del src, dst
    return (1 << 30) / statistics.median(times[1:])


def ring_registration(sizes: tuple[int, ...] = (64 << 20, 512 << 20, 3 << 30)) -> list[dict[str, float]]:
    """What page-locking a host ring for the device costs (the CuPy backend's
    first commit of a session whose ring this process has not kept): per ring
    size, ``cudaHostRegister`` of a new ``/dev/shm`` ring file (its pages not
    yet faulted in), of the same file again (pages present: a crashed owner's
    ring), and ``cudaHostUnregister``."""
    import cupy

    from gpu_runtime.cuda.memory import register_host_memory
    from gpu_runtime.logring import LogRing

    rows = []
    for size in sizes:
        path = Path(tempfile.mkdtemp(dir="/dev/shm")) / "ring"
        ring = LogRing.create(path, capacity=size, session_tag=1, owner_token=1, base=0)
        try:
            row: dict[str, float] = {"ring_bytes": size}
            for label in ("fresh", "present"):
                t = time.perf_counter()
                register_host_memory(ring.address, ring.capacity)
                row[f"register_{label}_s"] = time.perf_counter() - t
                t = time.perf_counter()
                cupy.cuda.runtime.hostUnregister(ring.address)
                row[f"unregister_{label}_s"] = time.perf_counter() - t
            rows.append(row)
            print("ring registration", json.dumps(row), flush=True)
        finally:
            ring.unlink()
            shutil.rmtree(path.parent, ignore_errors=True)
    return rows


def _read_rate(files: list[Path], threads: int, chunk: int = 16 << 20) -> float:
    """Bytes/s of ``pread`` of ``files`` (in the page cache) into page-locked
    memory with ``threads`` threads in ``chunk``-byte pieces: the restore
    pipeline's host side alone."""
    from concurrent.futures import ThreadPoolExecutor

    from gpu_runtime.cuda.memory import PinnedBuffer

    jobs = [(f, at, min(chunk, f.stat().st_size - at)) for f in files for at in range(0, f.stat().st_size, chunk)]
    bufs = [PinnedBuffer(chunk) for _ in range(threads)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}
    try:
        def read(i: int) -> None:
            buf = bufs[i % threads].array
            for f, at, n in jobs[i::threads]:
                os.preadv(fds[f], [buf[:n]], at)

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(threads)))
        return sum(n for _, _, n in jobs) / (time.perf_counter() - t)
    finally:
        for fd in fds.values():
            os.close(fd)
        for b in bufs:
            b.close()


def restore_sweep(src: Path, sid: str = "conversation:resume") -> dict[str, Any]:
    """Where the restore rate goes (issue 18 asks for 80 % of pinned H2D): the
    child's log read by ``pread`` alone into pinned memory with 4/8/15 threads,
    then whole restores (``rt.resume``) with the backend's restore options
    varied — reader threads, span size, spans in flight (a buffer is held
    while its span is read and while the device copies and sums it), spans
    read whole or in pieces on several threads (``restore_piece``; the
    checksum site and ``restore_prepare`` were swept until 2026-12-07, spans
    read whole and 8 x 32 MiB spans until 22:30 that day), and the scatter by
    copy calls or by one kernel launch a span (``restore_engine``) — each
    on a fresh copy, twice per runtime: the first
    pays for what the pipeline makes on first use, the second finds it kept.
    Each run's ``pipeline`` is the pipeline's own account of the largest
    region (``RestoreStats``)."""
    from concordia_agents import Runtime

    files = [f for f in src.rglob("*") if f.is_file() and f.suffix in (".log", ".img")]  # segments, base images
    out: dict[str, Any] = {"log_bytes": sum(f.stat().st_size for f in files)}
    for threads in (4, 8, 15):
        _read_rate(files, threads)  # warm: the files in the page cache, the buffers' first touch
        out[f"pread_GBps_{threads}_threads"] = statistics.median(_read_rate(files, threads) for _ in range(3)) / 1e9
    out["pread_GBps_15_threads_4MiB"] = statistics.median(_read_rate(files, 15, 4 << 20) for _ in range(3)) / 1e9
    # Spans read in 4 MiB pieces (restore_piece, the default since 2026-12-07 19:40): a span's read no longer
    # waits for one thread, so larger spans (fewer of the calling thread's per-span steps) can keep up.
    variants = {"default (15 threads, 4 x 64 MiB spans read in 4 MiB pieces, device sums)": {},
                "the defaults before 2026-12-07 19:40 (8 threads, 8 x 16 MiB spans read whole)": {
                    "restore_threads": 8, "restore_span": 16 << 20, "restore_depth": 8, "restore_piece": 0},
                "8 x 64 MiB spans": {"restore_depth": 8},
                "8 threads": {"restore_threads": 8},
                # One cnc_scatter_rows launch a span instead of a copy call per record (2026-12-07 22:35):
                # fewer of the calling thread's CUDA calls, each of which gives up the interpreter lock.
                "scatter kernel": {"restore_engine": "kernel"},
                "scatter kernel, 8 x 64 MiB spans": {"restore_engine": "kernel", "restore_depth": 8},
                "scatter kernel, 8 threads": {"restore_engine": "kernel", "restore_threads": 8}}
    for name, options in variants.items():
        first: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        for _ in range(3):
            home = Path(tempfile.mkdtemp())
            try:
                shutil.copytree(src, home, dirs_exist_ok=True)
                with Runtime.open(home=home, **{**_OPTIONS, "backend_options": options}) as rt:
                    time.sleep(0.5)  # as a process loads its model between opening its runtime and resuming
                    for runs in (first, kept):
                        with ResumeParts() as measured:
                            s = rt.resume(sid)
                            s.release()
                            del s
                        runs.append(measured.report())
                torch.cuda.empty_cache()
            finally:
                shutil.rmtree(home, ignore_errors=True)

        def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
            rates = [r["restore_GBps"] for r in runs]
            mid = sorted(runs, key=lambda r: r["restore_GBps"])[len(runs) // 2]
            return {"restore_GBps": statistics.median(rates), "runs": rates, "pipeline": mid["pipeline"]}

        out[name] = {**summary(first), "buffers_kept": summary(kept)}
    return out


def resume_section(model: Any, shape: str, n: int, repeats: int) -> dict[str, Any]:
    from concordia_agents import Runtime
    from integrations.transformers import ConversationCall, ResidentConversations, conversation_generate

    src = Path(tempfile.mkdtemp())
    # The child's ring in a directory of its own, removed after it (a SIGKILLed child leaves it behind).
    env = dict(os.environ, CONCORDIA_RING_DIR=tempfile.mkdtemp(dir="/dev/shm"))
    resumed: list[float] = []
    recompute: list[float] = []
    calls: list[ConversationCall] = []
    parts: list[dict[str, float]] = []
    prompts: list[torch.Tensor] = []

    def resume_once(timed: bool) -> None:
        """A fresh copy of the child's home, a new runtime; the interrupted call retried to its first token."""
        home = Path(tempfile.mkdtemp())
        try:
            shutil.copytree(src, home, dirs_exist_ok=True)
            # The child's lease is taken over at once: its owner's PID on this machine is dead (_owner.py).
            # The interrupted call's prompt is read in a runtime of its own, so that the timed call's restore is
            # the first of its runtime, as a new process's after a crash is (the restore's pinned pool is made
            # there; an earlier restore in the same runtime would have made it).
            with Runtime.open(home=home, **_OPTIONS) as rt:
                s = rt.resume("conversation:resume")
                held = int(s.meta["call"]["start"])
                prompts[:] = [s.regions["tokens"].array[:, :held].clone()]
                s.release()
                del s  # its restored KV (4 GiB at 32k) is not held through the timed call
            with Runtime.open(home=home, **_OPTIONS) as rt:
                # As a process loads its model between opening its runtime and resuming: without the pause the
                # backend's pool preparation (restore_prepare) ran beside the timed call and the first token was
                # no sooner (0.136 s without it and 0.137 s with it on 2026-12-07, while the restore itself halved).
                time.sleep(0.5)
                got: list[ConversationCall] = []
                ft = FirstToken()
                torch.cuda.synchronize()
                with ResumeParts() as measured:
                    t = time.perf_counter()
                    conversation_generate(model, prompts[0], "resume", "next", runtime=rt,
                                          resident=ResidentConversations(), max_cache_len=n + 64, max_new_tokens=8,
                                          do_sample=False, stopping_criteria=StoppingCriteriaList([ft]),
                                          on_call=got.append)
                if timed:
                    resumed.append(ft.at - t)
                    parts.append(measured.report())
                    calls.append(got[-1])
        finally:
            shutil.rmtree(home, ignore_errors=True)

    def reprefill_once(timed: bool) -> None:
        ft = FirstToken()
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(prompts[0], attention_mask=torch.ones_like(prompts[0]), max_new_tokens=1, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([ft]))
        if timed:
            recompute.append(ft.at - t)

    try:
        r = subprocess.run([sys.executable, __file__, "--child", shape, str(n), str(src)], check=False,
                           capture_output=True, text=True, timeout=900, env=env)
        if r.returncode != -signal.SIGKILL:
            raise RuntimeError(f"child ended with {r.returncode}: {r.stderr[-2000:]}")
        resume_once(False)  # warm-up: this context length's first resume and prefill in the process
        reprefill_once(False)
        for i in range(repeats):
            for fn in (resume_once, reprefill_once)[:: 1 if i % 2 == 0 else -1]:
                fn(True)
        try:
            sweep = restore_sweep(src)
        except Exception:  # noqa: BLE001 - record and go on
            sweep = {"error": traceback.format_exc()[-3000:]}
    finally:
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(env["CONCORDIA_RING_DIR"], ignore_errors=True)
    return {"tokens": n, "resume_first_token_s": statistics.median(resumed),
            "reprefill_first_token_s": statistics.median(recompute),
            "speedup": statistics.median(recompute) / statistics.median(resumed),
            "runs": {"resume_s": resumed, "reprefill_s": recompute},
            "parts": parts,
            "restore_GBps": statistics.median(p["restore_GBps"] for p in parts),
            "fixed_costs_s": statistics.median(p["session_open_s"] + p["register_less_restore_s"]
                                               + p["ring_register_s"] for p in parts),
            "calls": [{"retried": c.retried, "prefilled": c.prefilled, "source": c.source} for c in calls],
            "restore_sweep": sweep}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=3, metavar=("SHAPE", "N", "HOME"))
    p.add_argument("--shape", default="llama-3-8b", choices=list(SHAPES))
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--user-tokens", type=int, default=1500)
    p.add_argument("--reply-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="6 turns, resume at 8k only, 2 repeats")
    p.add_argument("--only", choices=["turns", "resume"])
    p.add_argument("--profile-turn", type=int, help="profile this turn (1-based) of both variants; its times are "
                                                    "marked and not comparable")
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    torch.use_deterministic_algorithms(False)
    result: dict[str, Any] = {"benchmark": "conversation_gpu", "device": torch.cuda.get_device_name(0),
                              "versions": versions("transformers", "cupy-cuda13x"), "shape": args.shape,
                              "runtime_options": _OPTIONS, "quick": args.quick}
    turns = 6 if args.quick else args.turns
    with written("conversation_gpu" + ("-quick" if args.quick else ""), result):
        for key, measure in (("pinned_h2d_GBps", lambda: h2d_bandwidth() / 1e9),
                             ("ring_registration", ring_registration)):
            try:
                result[key] = measure()
            except Exception:  # noqa: BLE001 - record and go on
                result[key] = {"error": traceback.format_exc()[-3000:]}
        model = build(args.shape)
        if args.only != "resume":
            try:
                result["turns"] = turns_section(model, turns, args.user_tokens, args.reply_tokens,
                                                 args.profile_turn)
            except Exception:  # noqa: BLE001 - record and go on
                result["turns"] = {"error": traceback.format_exc()[-3000:]}
        if args.only != "turns":
            for n in (8192,) if args.quick else (8192, 32768):
                key = f"resume_{n // 1024}k"
                try:
                    result[key] = resume_section(model, args.shape, n, 2 if args.quick else args.repeats)
                except Exception:  # noqa: BLE001
                    result[key] = {"error": traceback.format_exc()[-3000:]}
                print(key, json.dumps({k: v for k, v in result[key].items() if k != "runs"}), flush=True)

if __name__ == "__main__":
    main()
