"""Property test: any interleaving of commits (appends and rewrites of kv rows),
crashes, aborted epochs, flushes and compactions (full base images and layers
on them, by the byte and the epoch triggers and asked for) replays to exactly
the last committed state."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from concordia_agents import Runtime
from gpu_runtime.records import RecordType

from .conftest import expire_lease

ops = st.lists(
    st.one_of(
        st.tuples(st.just("commit"), st.lists(st.integers(0, 8 * 1024 - 1), max_size=12), st.integers(0, 3),
                  st.integers(0, 3)),
        st.tuples(st.just("compact")),
        st.tuples(st.just("crash")),
        st.tuples(st.just("orphan"), st.integers(1, 3)),
        st.tuples(st.just("flush")),
    ),
    min_size=1, max_size=25,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from([0, 1, 3]))
def test_replay_matches_the_model(steps, compact_epochs):
    """Resume after the last step equals a model that applies only committed epochs."""
    home = Path(tempfile.mkdtemp())
    url = f"sqlite:///{home / 'catalog.db'}"
    opts = dict(home=home, catalog_url=url, backend="host", compact_bytes=48 << 10, compact_epochs=compact_epochs,
                segment_bytes=16 << 10, max_record_bytes=4096, ring_bytes=1 << 20)
    runtimes = [Runtime.open(**opts)]
    try:
        s = runtimes[0].session("p")
        s.register("a", np.zeros(8 * 1024, np.uint8))
        s.register("kv", np.zeros((2, 64, 4), np.int32), kind="kv", seq_axis=1)
        model_a, model_kv, model_len, model_epoch = np.zeros(8 * 1024, np.uint8), np.zeros((2, 64, 4), np.int32), 0, 0

        def reopen():  # type: ignore[no-untyped-def]
            expire_lease(url, "p")
            rt = Runtime.open(**opts)
            runtimes.append(rt)
            r = rt.resume("p")
            if model_epoch == 0:  # nothing committed: the regions were never logged
                assert r.recorded == {}
                r.register("a", np.zeros(8 * 1024, np.uint8))
                r.register("kv", np.zeros((2, 64, 4), np.int32), kind="kv", seq_axis=1)
            return r

        for step in steps:
            kind = step[0]
            if kind == "commit":
                _, positions, new_rows, back = step
                a, kv = s.regions["a"].array, s.regions["kv"].array
                t0 = max(0, s.regions["kv"].length - back)  # back > 0: a rewrite (a conversation's crop)
                t1 = min(t0 + new_rows, 64)
                for p in positions:
                    a[p] = (int(a[p]) + 1) % 256
                kv[:, t0:t1] = model_epoch + 1
                s.commit({"epoch": model_epoch + 1}, rows={"kv": (t0, t1)})
                model_epoch += 1
                model_a, model_kv, model_len = a.copy(), kv.copy(), t1
            elif kind == "orphan":  # an epoch whose commit never happened
                for i in range(step[1]):
                    s._log.writer.append(RecordType.PAGES, bytes([9]) * 4096, epoch=model_epoch + 1,
                                         region=s.regions["a"].spec.region_id, offset=4096 * i)
                s._abandon()
                s = reopen()
            elif kind == "crash":
                s.regions["a"].array[0] ^= 0xFF  # uncommitted change: must vanish
                s._abandon()
                s = reopen()
            elif kind == "compact":
                s.flush()
                s._log.compact()
            else:
                s.flush()
            assert s.epoch == model_epoch
        s._abandon()
        r = reopen()
        assert r.epoch == model_epoch
        if model_epoch:
            assert r.meta == {"epoch": model_epoch}
        assert np.array_equal(r.regions["a"].array, model_a)
        assert r.regions["kv"].length == model_len
        assert np.array_equal(r.regions["kv"].array[:, :model_len], model_kv[:, :model_len])
    finally:
        for rt in runtimes:
            rt.close()
        shutil.rmtree(home, ignore_errors=True)
