"""Opening and resuming a session whose log holds many small epochs (CPU, host backend).

An agent's conversation commits one epoch per generated token (a kv rows
record, a tokens record, a COMMIT whose body carries the conversation's
meta), so after a few turns its log holds thousands of records, and a
resume's fixed costs grow with them: the replay scan reads every header and
verifies every COMMIT checksum. Per log size (``--epochs``): the time to open
the session (``rt.session``: lease, ring, scan) and to resume it (open plus
restoring both regions), for the log written with compaction off
(``per_token``: every epoch's records stay), with the default compaction
(``folded``: every 256 epochs the tail is folded into a layer on the base
image, ``_base_image``), and against the same final state committed as one
epoch (the baseline: what the open costs without the per-token history), in
the same run. Medians after a warm-up; JSON to ``bench/results/``.

    python bench/bench_open_cpu.py [--epochs 500 2000 8000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_device, measure, versions, write

_OUTER, _ROW = 64, 64  #: kv region [outer, rows, row]: 64 rows of 64 uint16 per token (8 KiB)
_CALLS = [{"id": f"call-{i}", "prompt": "p" * 64, "generation": "g" * 64, "start": 1000 * i, "max_new": 100,
           "end": 1000 * i + 100} for i in range(20)]  #: a conversation's meta of 20 finished calls (~4.5 KB)


#: how each log is written: compaction options, and whether the state is committed as one epoch
_MODES: dict[str, tuple[dict[str, int], bool]] = {
    "per_token": ({"compact_bytes": 0}, False),
    "folded": ({}, False),  # the defaults: compact_bytes 256 MiB, compact_epochs 256
    "one_epoch": ({"compact_bytes": 0}, True),
}


def build(home: Path, epochs: int, *, one_epoch: bool, options: dict[str, int]) -> None:
    from concordia_agents import Runtime

    with Runtime.open(home=home, backend="host", fsync="none", **options) as rt:
        s = rt.session("conv")
        kv = np.zeros((_OUTER, epochs + 1, _ROW), np.uint16)
        tok = np.zeros((1, epochs + 1), np.int64)
        s.register("kv", kv, kind="kv", seq_axis=1)
        s.register("tokens", tok, kind="kv", seq_axis=1)
        kv[:, :epochs] = np.arange(epochs, dtype=np.uint16)[None, :, None]
        tok[0, :epochs] = np.arange(epochs)
        meta = {"calls": _CALLS, "call": _CALLS[-1], "fingerprint": {"model": "m" * 64}}
        for n in [epochs] if one_epoch else range(1, epochs + 1):
            s.commit({**meta, "n_tokens": n}, rows={"kv": n, "tokens": n})
        s.close()


def run(epochs: int, repeats: int) -> dict[str, Any]:
    from concordia_agents import Runtime

    out: dict[str, Any] = {"epochs": epochs}
    for label, (options, one) in _MODES.items():
        home = Path(tempfile.mkdtemp())
        try:
            build(home, epochs, one_epoch=one, options=options)
            rt = Runtime.open(home=home, backend="host", fsync="none", compact_bytes=0, warm_ring_bytes=0)
            try:
                out[f"{label}_open_s"] = measure(lambda rt=rt: rt.session("conv").release(), warmup=1,
                                                 repeats=repeats)
                out[f"{label}_resume_s"] = measure(lambda rt=rt: rt.resume("conv").release(), warmup=1,
                                                   repeats=repeats)
            finally:
                rt.close()
            out[f"{label}_log_bytes"] = sum(f.stat().st_size for f in (home / "sessions").rglob("*") if f.is_file())
        finally:
            shutil.rmtree(home, ignore_errors=True)
    records = 3 * epochs
    out["per_token_open_us_per_record"] = (out["per_token_open_s"]["median_s"]
                                           - out["one_epoch_open_s"]["median_s"]) / records * 1e6
    out["open_ratio"] = out["per_token_open_s"]["median_s"] / out["one_epoch_open_s"]["median_s"]
    out["resume_ratio"] = out["per_token_resume_s"]["median_s"] / out["one_epoch_resume_s"]["median_s"]
    out["folded_open_ratio"] = out["folded_open_s"]["median_s"] / out["one_epoch_open_s"]["median_s"]
    out["folded_resume_ratio"] = out["folded_resume_s"]["median_s"] / out["one_epoch_resume_s"]["median_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, nargs="+", default=[500, 2000, 8000])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    result: dict[str, Any] = {"benchmark": "open_cpu", "device": cpu_device(), "versions": versions(),
                              "repeats": args.repeats, "kv_row_bytes": _OUTER * _ROW * 2,
                              "runs": [run(n, args.repeats) for n in args.epochs]}
    for r in result["runs"]:
        print(json.dumps({k: (v["median_s"] if isinstance(v, dict) else v) for k, v in r.items()}), flush=True)
    print(write("open_cpu", result))


if __name__ == "__main__":
    main()
