"""Layers: compaction of a log's tail into a base image that lies on the
previous one (``_base_image``, ``_segments``), so that a conversation of
thousands of per-token epochs resumes from a few large records."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from concordia_agents import CorruptLogError, Runtime
from concordia_agents._catalog._objects import ObjectInfo
from concordia_agents._names import session_dir_name
from concordia_agents._replay import scan
from concordia_agents._segments import KIND_LAYER, base_chain, list_segments, read_segment_header
from concordia_agents._uploader import needed_objects, newest_base
from gpu_runtime.records import session_tag

from .conftest import expire_lease

ROWS = 1024


def _value(t: int) -> np.ndarray:
    """Row ``t``'s contents (4 outer slices of 8 floats) at commit ``t + 1``."""
    return np.full((4, 8), t + 1, np.float32)


def _pages_after(n: int) -> np.ndarray:
    """The pages region after commits 1..n (one byte changed per commit)."""
    a = np.zeros(1 << 16, np.uint8)
    for t in range(n):
        a[(t * 4099) % a.size] += 1
    return a


def _commit_tokens(s, kv: np.ndarray, a: np.ndarray, first: int, last: int, flush_every: int = 8) -> None:  # type: ignore[no-untyped-def]
    for t in range(first, last):
        kv[:, t] = _value(t)
        a[(t * 4099) % a.size] += 1
        s.commit({"t": t + 1}, rows={"kv": t + 1})
        if t % flush_every == flush_every - 1:
            s.flush()


def _new_session(rt: Runtime, sid: str):  # type: ignore[no-untyped-def]
    """A new session with the tests' two regions: kv rows and a pages region."""
    s = rt.session(sid)
    kv, a = np.zeros((4, ROWS, 8), np.float32), np.zeros(1 << 16, np.uint8)
    s.register("kv", kv, kind="kv", seq_axis=1)
    s.register("a", a)
    return s, kv, a


def _fold(s, kv: np.ndarray, a: np.ndarray, first: int, last: int) -> Path | None:  # type: ignore[no-untyped-def]
    """Commit tokens ``[first, last)``, flush, and compact: the image written."""
    _commit_tokens(s, kv, a, first, last)
    s.flush()
    return s._log.compact()


def _open(home: Path, url: str, **kw) -> Runtime:  # type: ignore[no-untyped-def]
    return Runtime.open(home=home, catalog_url=url, backend="host", fsync="none", **kw)


def _check_state(s, n: int) -> None:  # type: ignore[no-untyped-def]
    assert s.epoch == n and s.meta == {"t": n}
    kv, a = s.regions["kv"], s.regions["a"]
    assert kv.length == n
    want = np.stack([_value(t) for t in range(n)], axis=1) if n else np.zeros((4, 0, 8), np.float32)
    assert np.array_equal(kv.array[:, :n], want)
    assert np.array_equal(a.array, _pages_after(n))


def _session_dir(home: Path, sid: str) -> Path:
    return home / "sessions" / session_dir_name(sid, session_tag(sid))


def test_per_token_epochs_fold_into_layers_and_resume_exactly(home: Path, catalog_url: str):
    """Every 32 epochs the tail is folded: layers on a full image until the
    layers would outweigh it, then a full image again; the log a resume scans
    keeps at most ~32 epochs of per-token records, and restores the state."""
    seen_layers: set[str] = set()
    with _open(home, catalog_url, compact_epochs=32) as rt:
        s, kv, a = _new_session(rt, "conv")
        for chunk in range(0, 600, 40):
            _commit_tokens(s, kv, a, chunk, chunk + 40)
            s.flush()
            bases, _ = list_segments(_session_dir(home, "conv"))
            seen_layers |= {f.path.name for f in bases if f.kind == KIND_LAYER}
        s.close()
    assert len(seen_layers) >= 3, seen_layers
    directory = _session_dir(home, "conv")
    bases, _ = list_segments(directory)
    names = [f.path.name for f in bases]
    chain = base_chain(names[-1], names)
    assert chain is not None and sorted(chain) == sorted(names)  # compaction kept the chain, nothing else
    for f in bases:  # a layer's header says format 2, which a reader of format 1 refuses
        hdr = read_segment_header(f.path, session_tag=session_tag("conv"))
        assert hdr.kind == f.kind
        assert struct.unpack_from("<I", f.path.read_bytes()[:12], 8)[0] == (2 if f.kind == KIND_LAYER else 1)
    index = scan(directory, session_tag=session_tag("conv"))
    assert index.epoch == 600
    tail = [r for recs in index.records.values() for r in recs if r.logical >= 0]
    assert len(tail) <= 2 * 33  # a kv and a pages record per epoch since the newest base image
    folded = [r for recs in index.records.values() for r in recs if r.logical < 0]
    assert len(folded) <= 4 * len(index.chain)  # one or two records per region per image, not one per token
    expire_lease(catalog_url, "conv")
    with _open(home, catalog_url, compact_epochs=32) as rt:
        r = rt.resume("conv")
        _check_state(r, 600)
        _commit_tokens(r, r.regions["kv"].array, r.regions["a"].array, 600, 700)  # and goes on
        r.close()
    with _open(home, catalog_url) as rt:
        _check_state(rt.resume("conv"), 700)


def test_a_layer_holds_only_the_tail_and_rewrites_stay_exact(home: Path, catalog_url: str):
    """A layer on a full image holds only the rows the tail wrote; rows the tail
    rewrote (a conversation's crop) come back as rewritten, the others as the
    image below holds them."""
    with _open(home, catalog_url, compact_epochs=0) as rt:
        s, kv, a = _new_session(rt, "crop")
        full = _fold(s, kv, a, 0, 400)
        kv[:, 100:110] = -1.0  # crop to 100 tokens and write 10 new rows
        s.commit({"t": "cropped"}, rows={"kv": (100, 110)})
        s.flush()
        layer = s._log.compact()
        assert full is not None and layer is not None
        assert layer.name.endswith(f"-on-{full.name[5:21]}.img")
        assert layer.stat().st_size < full.stat().st_size / 20  # 10 rows + the pages region's one byte's page
        s.close()
    with _open(home, catalog_url) as rt:
        r = rt.resume("crop")
        assert r.meta == {"t": "cropped"} and r.regions["kv"].length == 110
        assert np.array_equal(r.regions["kv"].array[:, :110], kv[:, :110])
        assert np.array_equal(r.regions["a"].array, _pages_after(400))


def test_a_layer_whose_parent_is_missing_is_named_and_nothing_is_deleted(home: Path, catalog_url: str):
    with _open(home, catalog_url, compact_epochs=0) as rt:
        s, kv, a = _new_session(rt, "gone")
        full = _fold(s, kv, a, 0, 50)
        layer = _fold(s, kv, a, 50, 60)
        s.close()
    assert full is not None and layer is not None
    full.unlink()
    before = sorted(p.name for p in layer.parent.iterdir())
    with _open(home, catalog_url) as rt:
        with pytest.raises(CorruptLogError) as e:
            rt.resume("gone")
    assert full.name in str(e.value) and "missing" in str(e.value)
    assert sorted(p.name for p in layer.parent.iterdir()) == before


def test_a_version_1_header_naming_a_layer_is_refused(home: Path, catalog_url: str):
    """Kind and format version go together: a layer under format 1 (or a full
    image under format 2) is damage, not a state."""
    with _open(home, catalog_url, compact_epochs=0) as rt:
        s, kv, a = _new_session(rt, "hdr")
        _fold(s, kv, a, 0, 20)
        layer = _fold(s, kv, a, 20, 30)
        s.close()
    assert layer is not None
    raw = bytearray(layer.read_bytes())
    struct.pack_into("<I", raw, 8, 1)
    from gpu_runtime.records import checksum

    struct.pack_into("<I", raw, 60, checksum(bytes(raw[:60])))
    layer.write_bytes(bytes(raw))
    with pytest.raises(CorruptLogError, match="format version 1 names kind 2"):
        read_segment_header(layer, session_tag=session_tag("hdr"))


def _obj(name: str, kind: str, offset: int, state: str = "remote", token: int = 1, nbytes: int = 1000) -> ObjectInfo:
    return ObjectInfo("s", name, name, kind, token, offset, state, nbytes, "")


def test_the_remote_keeps_and_fetches_a_layer_with_its_chain():
    """The uploader's rules (pure): the newest remote base image is the newest
    whose chain is all remote; its chain is needed, never deleted."""
    root = _obj(f"base-{0x100:016x}.img", "base", 0x100)
    l1 = _obj(f"base-{0x200:016x}-on-{0x100:016x}.img", "base", 0x200)
    l2 = _obj(f"base-{0x300:016x}-on-{0x200:016x}.img", "base", 0x300)
    old = _obj(f"base-{0x80:016x}.img", "base", 0x80)
    covered = _obj(f"seg-{1:010d}-{0x250:016x}.log", "delta", 0x250, nbytes=64 + 0x20)
    tail = _obj(f"seg-{1:010d}-{0x300:016x}.log", "delta", 0x300)
    base, chain = newest_base([old, root, l1, l2, covered, tail])
    assert base is l2 and chain == {0x100, 0x200}
    assert {o.name for o in needed_objects([old, root, l1, l2, covered, tail])} == {root.name, l1.name, l2.name,
                                                                                     tail.name}
    orphan = _obj(f"base-{0x900:016x}-on-{0x800:016x}.img", "base", 0x900)  # its parent is nowhere
    assert newest_base([root, l1, l2, orphan, tail])[0] is l2
    assert orphan.name not in {o.name for o in needed_objects([root, l1, l2, orphan, tail])}
    l1_up = _obj(l1.name, "base", 0x200, state="uploading")  # the chain is not all remote yet: l2 is of no use
    base, chain = newest_base([root, l1_up, l2, tail])
    assert base is root and chain == frozenset()
    assert {o.name for o in needed_objects([root, l1_up, l2, tail])} == {root.name, tail.name}
    assert base_chain(l2.name, [root.name, l2.name]) is None
    assert base_chain(l2.name, [root.name, l1.name, l2.name]) == [l2.name, l1.name, root.name]


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from concordia_agents import Runtime
    sys.path.insert(0, sys.argv[3])
    from tests.test_base_layers import _commit_tokens
    home, url = sys.argv[1], sys.argv[2]
    with Runtime.open(home=home, catalog_url=url, backend="host", fsync="none", compact_epochs=4,
                      flush_poll=0.001) as rt:
        s = rt.resume("kill") if "--resume" in sys.argv else rt.session("kill")
        if "--resume" in sys.argv:
            kv, a, n = s.regions["kv"].array, s.regions["a"].array, s.epoch
        else:
            kv, a, n = np.zeros((4, 1024, 8), np.float32), np.zeros(1 << 16, np.uint8), 0
            s.register("kv", kv, kind="kv", seq_axis=1)
            s.register("a", a)
        print("ready", flush=True)
        _commit_tokens(s, kv, a, n, 1000, flush_every=1)
""")


def test_sigkill_while_layers_are_written_loses_no_committed_epoch(home: Path, catalog_url: str):
    """A process folding its tail every 4 epochs is SIGKILLed three times at
    random moments; each resume holds a committed prefix, at least every epoch
    a flush had made durable, exactly."""
    rng = np.random.default_rng(7)
    repo = str(Path(__file__).resolve().parents[1])
    n = 0
    for round_ in range(3):
        args = [sys.executable, "-c", _CHILD, str(home), catalog_url, repo] + (["--resume"] if round_ else [])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": repo})
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.3, 1.2)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        expire_lease(catalog_url, "kill")
        with _open(home, catalog_url, compact_epochs=0) as rt:
            r = rt.resume("kill")
            assert r.epoch >= n  # nothing committed before is lost
            n = r.epoch
            _check_state(r, n)
            r.release()
        expire_lease(catalog_url, "kill")
    assert n > 8
    assert list_segments(_session_dir(home, "kill"))[0], "compaction ran (which kind is last depends on timing)"


def test_a_damaged_layer_rolls_back_to_the_images_below_it(home: Path, catalog_url: str):
    """A flipped byte in a layer: a plain resume refuses with CorruptLogError; one
    with allow_rollback keeps the intact full image below it (epoch 300, not 0) and
    moves the damaged layer aside."""
    with _open(home, catalog_url, compact_epochs=0) as rt:
        s, kv, a = _new_session(rt, "salv")
        full = _fold(s, kv, a, 0, 300)
        layer = _fold(s, kv, a, 300, 305)
        s.close()
    assert full is not None and layer is not None and "-on-" in layer.name
    index = scan(layer.parent, session_tag=session_tag("salv"))
    loc = next(r for recs in index.records.values() for r in recs if r.path == layer)
    raw = bytearray(layer.read_bytes())
    raw[loc.file_offset + 64] ^= 0xFF  # the first payload byte of a data record of the layer
    layer.write_bytes(bytes(raw))
    with _open(home, catalog_url) as rt:
        with pytest.raises(CorruptLogError):
            rt.resume("salv")
        r = rt.resume("salv", allow_rollback=True)
        assert r.rollback is not None and r.rollback.epoch == 300
        _check_state(r, 300)
        r.close()
    assert full.exists() and not layer.exists()
    assert list(layer.parent.glob(f"quarantine-*/{layer.name}"))


def test_a_full_image_supersedes_a_chain_newest_first(home: Path, catalog_url: str):
    """The files a new full image makes unnecessary are deleted layers first, so a
    crash midway never leaves a layer without the images it lies on."""
    from concordia_agents._base_image import superseded, write_base_image

    with _open(home, catalog_url, compact_epochs=0) as rt:
        s, kv, a = _new_session(rt, "order")
        images = []
        for first in (0, 100, 103):
            images.append(_fold(s, kv, a, first, first + (100 if first == 0 else 3)))
        assert [p is not None and "-on-" in p.name for p in images] == [False, True, True]
        _commit_tokens(s, kv, a, 106, 107)
        s.flush()
        log = s._log
        with log.lock:
            log._roll(log.ring.consumed)
            index = scan(log.dir, session_tag=log.tag)
            full = write_base_image(log.dir, log.tag, log.token, index)
            doomed = superseded(log.dir, full, index, layer=False, token=log.token, current=log.segment.path)
        assert [p.name for p in doomed if p.name.startswith("base-")] == [p.name for p in reversed(images)]
        s.close()
