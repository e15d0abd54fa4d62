"""The benchmarks' shared resume account (``bench.common.ResumeParts``) on the
CPU: a real resume on the host backend is split into its parts, and the
wrapped methods are put back afterwards."""

from __future__ import annotations

import numpy as np

from bench.common import ResumeParts
from concordia_agents import Runtime
from concordia_agents._runtime import Runtime as RuntimeClass
from concordia_agents._session import Session


def test_resume_parts_account_for_a_resume_and_restore_the_wrapped_methods(tmp_path):
    """Inside ``ResumeParts`` a resume's session open and restore are timed, the restored payload bytes are those
    the log holds for the region (the first commit's whole 8 MiB image, then the second's dirty pages only) and
    no ring was page-locked (host backend); on exit the methods are the originals again."""
    originals = (RuntimeClass.session, Session.register, Session._restore_into)
    with Runtime.open(home=tmp_path, backend="host") as rt:
        s = rt.session("x")
        a = np.arange(1 << 20, dtype=np.int64)
        s.register("a", a)
        s.commit()
        a[5] = 7
        s.commit()
        s.close()
    with Runtime.open(home=tmp_path, backend="host") as rt, ResumeParts() as measured:
        r = rt.resume("x")
        assert int(r.regions["a"].array[5]) == 7
        r.close()
    report = measured.report()
    assert report["session_open_s"] > 0 and report["restore_s"] > 0
    assert a.nbytes < report["restore_bytes"] < 2 * a.nbytes and report["ring_register_s"] == 0.0
    assert report["restore_GBps"] == report["restore_bytes"] / report["restore_s"] / 1e9
    assert (RuntimeClass.session, Session.register, Session._restore_into) == originals
