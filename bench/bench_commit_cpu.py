"""CPU commit benchmark (host backend): Concordia deltas against whole-region saves.

Workloads, each against a baseline measured in the same run:

(a) ``pages``: a 256 MiB region, 1 % of its 4 KiB pages dirtied per epoch.
(b) ``kv``: a Llama-3.2-1B-shaped bf16 KV region (32 KiB per token), one
    token appended per epoch.

Concordia figures: ``commit()`` latency (epoch in the host ring: survives a
process crash) and ``commit() + flush()`` latency (fsynced to a segment:
survives a host crash), plus sustained epochs/s with the flusher on
``every_commit``. Baseline: ``np.save`` of the whole region + ``fsync`` per
epoch, the naive way to make the same state durable.

    python bench/bench_commit_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_device, measure, versions, write
from concordia_agents import Runtime


def np_save_fsync(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def bench_pages(home: Path, *, mib: int, repeats: int) -> dict:
    a = np.random.default_rng(0).integers(0, 256, size=mib << 20, dtype=np.uint8)
    npages = a.size // 4096
    rng = np.random.default_rng(1)

    def dirty() -> None:
        pages = rng.choice(npages, npages // 100, replace=False)
        a[pages * 4096 + rng.integers(0, 4096, pages.size)] += 1

    with Runtime.open(home=home / "pages", backend="host", compact_bytes=0) as rt:
        s = rt.session("bench-pages")
        s.register("a", a)
        s.commit()
        s.flush()

        def commit() -> None:
            dirty()
            s.commit()

        def commit_flush() -> None:
            dirty()
            s.commit()
            s.flush()

        c = measure(commit, warmup=3, repeats=repeats)
        cf = measure(commit_flush, warmup=3, repeats=repeats)
        t = time.perf_counter()
        n = repeats
        for _ in range(n):
            commit()
        s.flush()
        sustained = n / (time.perf_counter() - t)
        s.close()
    base_path = home / "baseline-pages.npy"
    b = measure(lambda: (dirty(), np_save_fsync(base_path, a)), warmup=1, repeats=max(3, repeats // 4))
    return {
        "region_bytes": a.nbytes, "dirty_fraction": 0.01, "page_size": 4096,
        "concordia_commit": c, "concordia_commit_flush": cf, "concordia_sustained_epochs_per_s": sustained,
        "baseline_np_save_fsync": b,
        "ratio_baseline_over_commit": b["median_s"] / c["median_s"],
        "ratio_baseline_over_commit_flush": b["median_s"] / cf["median_s"],
    }


def bench_kv(home: Path, *, tokens: int, repeats: int) -> dict:
    import torch

    # Llama-3.2-1B shape: 16 layers x (K, V), 8 KV heads, head dim 64, bf16: 32 KiB per token.
    kv = torch.zeros(32, 8, tokens, 64, dtype=torch.bfloat16)
    per_token = 32 * 8 * 64 * 2
    pos = [0]

    def append() -> None:
        kv[:, :, pos[0]] = torch.randn(32, 8, 64).to(torch.bfloat16)
        pos[0] += 1

    with Runtime.open(home=home / "kv", backend="host", compact_bytes=0) as rt:
        s = rt.session("bench-kv")
        s.register("kv", kv, kind="kv", seq_axis=2)

        def commit() -> None:
            append()
            s.commit(rows={"kv": pos[0]})

        def commit_flush() -> None:
            commit()
            s.flush()

        c = measure(commit, warmup=5, repeats=repeats)
        cf = measure(commit_flush, warmup=5, repeats=repeats)
        t = time.perf_counter()
        for _ in range(repeats):
            commit()
        s.flush()
        sustained = repeats / (time.perf_counter() - t)
        s.close()
    base_path = home / "baseline-kv.npy"
    view = kv.view(torch.uint8).numpy()
    b = measure(lambda: (append(), np_save_fsync(base_path, view)), warmup=1, repeats=max(3, repeats // 20))
    return {
        "region_bytes": view.nbytes, "bytes_per_epoch": per_token, "shape": list(kv.shape), "dtype": "bfloat16",
        "concordia_commit": c, "concordia_commit_flush": cf, "concordia_sustained_epochs_per_s": sustained,
        "baseline_np_save_fsync": b,
        "ratio_baseline_over_commit": b["median_s"] / c["median_s"],
        "ratio_baseline_over_commit_flush": b["median_s"] / cf["median_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (smoke run)")
    args = p.parse_args()
    mib, repeats, tokens = (32, 10, 512) if args.quick else (256, 40, 4096)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        home = Path(d)
        result = {
            "benchmark": "commit_cpu", "device": cpu_device(), "backend": "host", "versions": versions(),
            "fsync": "every_commit", "disk_dir": str(home),
            "pages": bench_pages(home, mib=mib, repeats=repeats),
            "kv": bench_kv(home, tokens=tokens, repeats=repeats * 5),
        }
    path = write("commit_cpu" + ("-quick" if args.quick else ""), result)
    for w in ("pages", "kv"):
        r = result[w]
        print(f"{w:5}: commit {r['concordia_commit']['median_s'] * 1e3:8.3f} ms  "
              f"commit+flush {r['concordia_commit_flush']['median_s'] * 1e3:8.3f} ms  "
              f"baseline {r['baseline_np_save_fsync']['median_s'] * 1e3:9.2f} ms  "
              f"ratio x{r['ratio_baseline_over_commit']:.0f} (x{r['ratio_baseline_over_commit_flush']:.1f} durable)  "
              f"sustained {r['concordia_sustained_epochs_per_s']:.0f} epochs/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
