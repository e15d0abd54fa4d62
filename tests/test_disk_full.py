"""A full disk under the segments: a named error, and nothing committed is lost."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import LogFullError, Runtime

from .conftest import expire_lease


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 3 MiB filesystem (tmpfs), so writes fail with ENOSPC for real."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_raises_log_full_and_loses_nothing(small_disk: Path, tmp_path: Path):
    """When the segment disk fills, commits continue into the host ring until it is
    full, then raise LogFullError; after space is freed every committed epoch is
    on disk and a crash resumes to the last one."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    opts = dict(home=small_disk, catalog_url=url, backend="host", ring_bytes=1 << 20,
                max_record_bytes=64 << 10, space_timeout=1.0, compact_bytes=0, ring_dir=tmp_path / "shm")
    rt = Runtime.open(**opts)
    s = rt.session("big")
    a = np.zeros(512 << 10, np.uint8)
    s.register("a", a)
    rng = np.random.default_rng(0)
    with pytest.raises(LogFullError) as e:
        for _ in range(40):
            a[:] = rng.integers(0, 256, a.size, dtype=np.uint8)  # every page dirty: 512 KiB per epoch
            s.commit({"epoch": s.epoch + 1})
    assert "stayed full" in str(e.value) or "No space" in str(e.value)
    last = s.epoch
    assert last >= 4  # the disk took some, the ring the rest
    with pytest.raises(LogFullError):
        s.flush(timeout=1.0)
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert s.flush(timeout=30) == last
    a[:] = 7
    assert s.commit({"epoch": last + 1}) == last + 1  # the same session goes on
    s.flush()
    expected = a.copy()
    s._abandon()
    expire_lease(url, "big")
    with Runtime.open(**opts) as rt2:
        r = rt2.resume("big")
        assert r.epoch == last + 1 and r.meta == {"epoch": last + 1}
        assert np.array_equal(r.regions["a"].array, expected)
        r.close()
    rt.close()
