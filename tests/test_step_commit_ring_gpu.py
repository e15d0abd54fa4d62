"""The in-step producer's side of the ring protocol on a real GPU
(``kernels/step_commit.cu``): the room it waits for, and fencing.

``cnc_step_check`` reads the ring header's owner and consumed words once per
committing launch, before any of the launch's stores; the producer's blocks
then use what it read (or read the ring themselves when no check ran). What
must hold either way:

* a full ring is waited on (fresh reads) until the flusher frees room, and a
  ring that stays full past the space timeout stops the producer with
  ``ring_full``, the epochs before it standing;
* a takeover (another owner's token in the header) stops the producer before
  it stores anything of the next epoch;
* a takeover after the check and before the stores is caught before
  anything is published (the window the check leaves open: the stores land,
  nothing makes them committed);
* what the check read serves one launch only: the launch clears it, and so
  does arming.

Each runs on a one-block producer and on a five-block one (the producer
checks from five blocks on).

The producer writes a ring of its own here, which no flusher drains: the test
plays the flusher by publishing ``consumed``, so fullness and takeovers
happen where the test puts them. Skipped (with the reason) where no CUDA GPU
with CuPy is present."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import remove_rings

pytestmark = pytest.mark.gpu

TAG, OWNER = 7, 11
START = 4  #: rows committed before the producer is armed
TEMPLATE = b'{"n_tokens":\x00}'  #: a COMMIT body with one place of the length
#: kv storage shapes [2L, B, H, T, D]: 256 bytes a row (one block), 64 KiB a row (five blocks)
GEOMETRIES = {"one-block": (4, 1, 2, 64, 16), "five-blocks": (4, 8, 8, 64, 128)}


class Bench:
    """A session's kv and tokens regions on the GPU, and a producer of them
    armed on a ring of about four epochs that nobody drains."""

    def __init__(self, rt: Any, home: Path, shape: tuple[int, ...], *, timeout_s: float) -> None:
        import torch

        from gpu_runtime.cuda.step_commit import StepCommitter
        from gpu_runtime.logring import LogRing, default_ring_dir

        batch, row = shape[1], shape[0] * shape[1] * shape[2] * shape[4] * 2
        self.kv = torch.randn(*shape, device="cuda").to(torch.bfloat16)
        self.tokens = torch.zeros(batch, shape[3], dtype=torch.int64, device="cuda")
        self.session = rt.session("ring")
        self.session.register("kv", self.kv, kind="kv", seq_axis=3)
        self.session.register("tokens", self.tokens, kind="kv", seq_axis=1)
        # named as the home's rings are, so that remove_rings finds it whatever happens
        tag = hashlib.blake2b(str(home.resolve()).encode(), digest_size=4).hexdigest()
        self.ring = LogRing.create(default_ring_dir(home) / f"concordia-{tag}-producer-test.ring",
                                   capacity=-(-9 * (row + 512) // 2 // 4096) * 4096, session_tag=TAG,
                                   owner_token=OWNER, base=0)
        header, _ = rt.backend.commits.ring(self.ring)
        self.producer = StepCommitter(
            arch=rt.backend.executor.arch, sms=torch.cuda.get_device_properties(0).multi_processor_count,
            ring=self.ring, ring_header=header, session_tag=TAG, owner_token=OWNER, max_record_bytes=4 << 20,
            kv=self.session.regions["kv"]._handle, tokens=self.session.regions["tokens"]._handle,
            template=TEMPLATE, slots=1, every=1, space_timeout_s=timeout_s)
        self.stream = torch.cuda.current_stream()
        self.length = torch.full((), START, dtype=torch.int64, device="cuda")
        self.ids = torch.randint(3, 30000, (batch, shape[3]), device="cuda", dtype=torch.int64)
        self.producer.arm(self.stream.cuda_stream, position=0, epoch=0, committed=START)

    def epoch_bytes(self, length: int) -> int:
        """Log bytes of the one-row epoch that reaches ``length``."""
        return self.producer.epoch_bytes(1, len(TEMPLATE) - 1 + len(str(length)))

    def step(self, *, check: bool = True) -> None:
        """One decode step: the length advances by one, the producer launches."""
        self.producer.ring_check = check
        self.length.add_(1)
        n = int(self.length.item())
        ids = self.ids[:, n - 1:n]
        self.producer.launch(self.stream.cuda_stream, self.length.data_ptr(), ids.data_ptr(), 1, ids.stride(0))

    def fits(self) -> int:
        """Steps from here whose epochs fit the ring's free space as it is."""
        n, room = int(self.length.item()), self.ring.capacity - (self.ring.written - self.ring.consumed)
        k = 0
        while self.epoch_bytes(n + k + 1) <= room:
            room -= self.epoch_bytes(n + k + 1)
            k += 1
        return k

    def pattern(self, length: int) -> tuple[int, bytes]:
        """Lay a byte pattern where the epoch reaching ``length`` would go
        (from the last commit on); returns its offset and bytes."""
        at, size = self.ring.written, self.epoch_bytes(length)
        self.ring.write_at(at, b"\xab" * size)
        return at, b"\xab" * size

    def check_ahead(self) -> None:
        """Launch the ring check of the next step, not the step (done by the
        time this returns)."""
        self.length.add_(1)
        self.producer.check_ring(self.stream.cuda_stream, self.length.data_ptr())
        self.length.sub_(1)
        self.stream.synchronize()

    def taken_over_step(self, *, check: bool) -> tuple[Any, int, bytes]:
        """Lay a pattern where the next epoch goes, give the ring to another
        owner (token 99), run the next step: the producer's state after it,
        and the pattern's offset and bytes."""
        at, laid = self.pattern(int(self.length.item()) + 1)
        self.ring.set_owner(99)
        self.step(check=check)
        self.stream.synchronize()
        return self.producer.state(), at, laid

    def close(self) -> None:
        try:
            self.producer.disarm()
        finally:
            try:
                self.ring.unlink()  # unregistered while the runtime's device is still open
            finally:
                self.session.close()


@pytest.fixture(params=list(GEOMETRIES))
def bench(request: pytest.FixtureRequest, home: Path) -> Iterator[Any]:
    from concordia_agents import Runtime

    made: list[Bench] = []

    def make(timeout_s: float = 5.0) -> Bench:
        made.append(Bench(rt, home, GEOMETRIES[request.param], timeout_s=timeout_s))
        assert made[-1].producer.blocks == (1 if request.param == "one-block" else 5)
        return made[-1]

    try:
        with Runtime.open(home=home, backend="cupy", fsync="none") as rt:
            yield make
            for b in made:
                b.close()
    finally:
        remove_rings(home)


def test_a_full_ring_is_waited_on_until_the_flusher_frees_room(bench):
    """The check reads a consumed that leaves no room; the producer's wait reads the ring afresh and
    commits once the (test's) flusher publishes consumed, 0.3 s later."""
    b = bench()
    k = b.fits()
    assert k >= 3
    for _ in range(k):
        b.step()
    b.stream.synchronize()
    written = b.ring.written
    assert b.producer.state().commits == k and b.ring.committed == written and b.ring.committed_epoch == k
    at, laid = b.pattern(START + k + 1)
    seen: list[bytes] = []

    def flusher() -> None:  # what the waiting producer left where its epoch goes, then room
        seen.append(b.ring.read(at, len(laid)))
        b.ring.publish_consumed(written)

    timer = threading.Timer(0.3, flusher)
    t0 = time.monotonic()
    timer.start()
    try:
        b.step()
        b.stream.synchronize()
    finally:
        timer.join()
    waited = time.monotonic() - t0
    state = b.producer.state()
    assert state.error is None and state.commits == k + 1, state
    assert waited >= 0.29, waited
    assert seen == [laid]  # nothing stored before the room was there
    assert b.ring.read(at, len(laid)) != laid
    assert b.ring.committed_epoch == k + 1 and b.ring.committed == written + b.epoch_bytes(START + k + 1)


def test_a_ring_that_stays_full_stops_the_producer_with_ring_full(bench):
    """Past the space timeout: ring_full, the consumed offset it saw, the epochs before it standing."""
    b = bench(timeout_s=0.2)
    k = b.fits()
    for _ in range(k):
        b.step()
    b.stream.synchronize()
    at, laid = b.pattern(START + k + 1)
    b.step()
    b.stream.synchronize()
    state = b.producer.state()
    assert (state.error, state.error_info, state.commits) == ("ring_full", 0, k), state
    assert b.ring.committed_epoch == k and b.ring.committed == b.ring.written == state.position
    assert b.ring.read(at, len(laid)) == laid


@pytest.mark.parametrize("check", [True, False], ids=["ring-checked", "blocks-read"])
def test_a_takeover_stops_the_producer_before_it_stores_the_next_epoch(bench, check):
    """Another owner's token in the header: fenced, its token reported, not one byte of the next
    epoch stored (the bytes past the last commit keep a pattern laid there), nothing published."""
    b = bench()
    for _ in range(2):
        b.step(check=check)
    b.stream.synchronize()
    written = b.ring.written
    state, at, laid = b.taken_over_step(check=check)
    assert (state.error, state.error_info, state.commits) == ("fenced", 99, 2), state
    assert b.ring.written == b.ring.committed == written and b.ring.committed_epoch == 2
    assert b.ring.read(at, len(laid)) == laid


def test_a_takeover_after_the_check_is_caught_before_anything_is_published(bench):
    """The check read the old owner; the takeover lands before the producer runs (the window the
    check leaves): its rows land past the last commit, but the last block's read of the owner
    before publishing stops it, so written, committed and the epoch do not move."""
    b = bench()
    b.step()
    b.stream.synchronize()
    written = b.ring.written
    b.check_ahead()
    state, at, laid = b.taken_over_step(check=False)  # the check above is this launch's
    assert (state.error, state.error_info, state.commits) == ("fenced", 99, 1), state
    assert b.ring.written == b.ring.committed == written and b.ring.committed_epoch == 1
    assert b.ring.read(at, len(laid)) != laid  # the window is real: the rows were stored


def test_a_launch_clears_what_its_check_read(bench):
    """After a checked launch (its last block clears the check's words), a launch with no check of
    its own reads the ring itself: a takeover stops it before it stores anything."""
    b = bench()
    b.step(check=True)
    b.stream.synchronize()
    state, at, laid = b.taken_over_step(check=False)
    assert state.error == "fenced"
    assert b.ring.read(at, len(laid)) == laid


def test_arming_clears_a_check_whose_launch_never_ran(bench):
    """A check read the old owner and its launch never came; after arming again, a launch with no
    check of its own reads the ring itself: a takeover stops it before it stores anything."""
    b = bench()
    b.step()
    b.stream.synchronize()
    b.check_ahead()
    state = b.producer.state()
    b.producer.arm(b.stream.cuda_stream, position=state.position, epoch=state.epoch, committed=state.committed)
    state, at, laid = b.taken_over_step(check=False)
    assert state.error == "fenced"
    assert b.ring.read(at, len(laid)) == laid
