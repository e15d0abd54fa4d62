"""Step commits on the host (``concordia_agents/_step_commits.py``): the epochs a model's
steps commit, every ``every`` rows, and the COMMIT body template the GPU's in-step producer
fills (its bytes checked here against the body the host writes; the device side is
tests/test_step_commit_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest

from concordia_agents import ConcordiaError, RegionError, Runtime, Session
from concordia_agents._step_commits import StepCommits, body_template

META = {"fingerprint": {"model": "abc", "prompt": "0123456789"}, "prompt_len": 4, "n_tokens": 4, "done": False}


def _session(rt: Runtime, sid: str = "s") -> tuple[Session, np.ndarray, np.ndarray]:
    s = rt.session(sid)
    kv = np.arange(2 * 3 * 64 * 4, dtype=np.float32).reshape(2, 3, 64, 4)
    tokens = np.zeros((3, 64), np.int64)
    s.register("kv", kv, kind="kv", seq_axis=2)
    s.register("tokens", tokens, kind="kv", seq_axis=1)
    return s, kv, tokens


def test_body_template_marks_every_place_of_the_value_and_refuses_a_wrong_count():
    body = b'{"lengths":{"kv":98765,"t":98765},"meta":{"n":98765,"x":"a98765b"}}'
    assert body_template(body, 98765, 4) == b'{"lengths":{"kv":\0,"t":\0},"meta":{"n":\0,"x":"a\0b"}}'
    with pytest.raises(ValueError, match=r"expected 98765 3 times .* found it 4 times"):
        body_template(body, 98765, 3)
    with pytest.raises(ValueError, match="no 0 byte"):
        body_template(b'{"a":"\0",98765}', 98765, 1)


def test_the_template_filled_with_a_length_is_the_body_a_host_commit_writes(make_runtime):
    """What the device formats (the template with the decimal of L in its places) is byte for
    byte the COMMIT body Session.commit writes for that step, for lengths of 1 to 20 digits."""
    rt = make_runtime()
    s, _, _ = _session(rt)
    s.register("other", np.zeros((2, 8), np.int64), kind="kv", seq_axis=1)  # a kv region the steps leave alone
    template, slots = StepCommits.template(s._commit_body, META, "n_tokens", s._current_lengths(), ("kv", "tokens"))
    assert slots == 3 and template.count(b"\0") == 3
    for length in (1, 9, 10, 12345, 10**19 - 1, 2**64 - 1):
        lengths = {**s._current_lengths(), "kv": length, "tokens": length}
        want = s._commit_body({**META, "n_tokens": length}, lengths)
        assert template.replace(b"\0", str(length).encode()) == want


def test_host_steps_commit_every_n_rows_and_resume_at_the_last_one(make_runtime):
    """every=3 from a committed prompt of 4: a forced first step commits, then one epoch per 3
    new rows; a new process resumes with both regions at the last epoch's length."""
    rt = make_runtime()
    s, kv, tokens = _session(rt)
    tokens[:, :4] = 7
    s.commit(dict(META), rows={"tokens": 4})
    steps = s.step_commits(kv="kv", tokens="tokens", meta=META, length_key="n_tokens", every=3, device=False)
    assert steps.device is None
    assert steps.host_step(4, force=True) == 2  # the prompt's KV (tokens already committed)
    committed = []
    for n in range(5, 15):
        tokens[:, n - 1] = n
        if steps.host_step(n) is not None:
            committed.append(n)
    assert committed == [7, 10, 13] and steps.host_commits == 4
    assert (s.epoch, s.meta["n_tokens"], s.regions["kv"].length, s.regions["tokens"].length) == (5, 13, 13, 13)
    steps.arm(0)  # no device producer: nothing to hand over
    assert steps.close() is None
    s.close()
    s2, kv2, tokens2 = _session(make_runtime())
    assert s2.epoch == 5 and s2.meta == {**META, "n_tokens": 13}
    assert np.array_equal(tokens2[:, :13], tokens[:, :13]) and not tokens2[:, 13:].any()
    assert np.array_equal(kv2[:, :, :13], kv[:, :, :13])
    s2.close()


def test_step_commits_need_two_registered_kv_regions_and_every_of_at_least_one(make_runtime):
    rt = make_runtime()
    s, _, _ = _session(rt)
    s.register("blob", np.zeros(64, np.uint8))
    with pytest.raises(RegionError, match="'blob' is not a registered kv region"):
        s.step_commits(kv="blob", tokens="tokens", meta=META, length_key="n_tokens", device=False)
    with pytest.raises(RegionError, match="'nope' is not a registered kv region"):
        s.step_commits(kv="kv", tokens="nope", meta=META, length_key="n_tokens", device=False)
    with pytest.raises(ConcordiaError, match="expected every >= 1, found 0"):
        s.step_commits(kv="kv", tokens="tokens", meta=META, length_key="n_tokens", every=0, device=False)


def test_every_backend_refuses_what_the_in_step_producer_could_not_commit(make_runtime):
    """A meta whose COMMIT body cannot fit the producer's 4096 bytes, or tokens rows that are not
    int64, are refused when device step commits are asked for, on the host backend too (a program
    that runs here must not be refused later on the GPU), naming what was expected and found; the
    session commits on unchanged. device=False (host steps only) has no such limit."""
    from gpu_runtime.cuda.step_commit import MAX_BODY

    rt = make_runtime()
    s, _, _ = _session(rt)
    epoch = s.epoch
    big = {**META, "note": "x" * MAX_BODY}
    with pytest.raises(RegionError, match=rf"must fit the in-step producer's {MAX_BODY} bytes, found 4[0-9]{{3}}"):
        s.step_commits(kv="kv", tokens="tokens", meta=big, length_key="n_tokens")
    # Just under the limit at the largest length (20 digits in each of 3 places) is accepted.
    fits = {**META, "note": ""}
    template, slots = StepCommits.template(s._commit_body, fits, "n_tokens", s._current_lengths(), ("kv", "tokens"))
    fits["note"] = "x" * (MAX_BODY - (len(template) - slots + 20 * slots))
    assert s.step_commits(kv="kv", tokens="tokens", meta=fits, length_key="n_tokens").every == 1
    fits["note"] += "x"
    with pytest.raises(RegionError, match=f"found {MAX_BODY + 1}: shorten the meta"):
        s.step_commits(kv="kv", tokens="tokens", meta=fits, length_key="n_tokens")
    assert s.step_commits(kv="kv", tokens="tokens", meta=big, length_key="n_tokens", device=False).device is None
    s.register("tokens32", np.zeros((3, 64), np.int32), kind="kv", seq_axis=1)
    with pytest.raises(RegionError, match=r"'tokens32': step commits store 64-bit tokens .* found rows of 4 bytes"):
        s.step_commits(kv="kv", tokens="tokens32", meta=META, length_key="n_tokens")
    assert s.epoch == epoch and s.commit({"after": 1}) == epoch + 1


class _ReportingProducer:
    """Stands in for the GPU's in-step producer at the handover (arm / state / disarm), reporting a
    given final state: the host side of the protocol is what is tested here; the kernel is tested
    on the GPU (tests/test_step_commit_gpu.py)."""

    def __init__(self, state) -> None:  # type: ignore[no-untyped-def]
        self.final, self.armed_with, self.disarmed = state, None, False

    def arm(self, stream: int, **kw: int) -> None:
        self.armed_with = kw

    def disarm(self) -> None:
        self.disarmed = True

    def state(self):  # type: ignore[no-untyped-def]
        return self.final(self.armed_with)


def test_close_adopts_the_devices_epochs_and_a_fenced_producer_raises_ownership_error(make_runtime):
    """close() makes the producer's epochs the session's (epoch, meta, lengths, log position) and
    refuses host commits while armed; a producer that lost the ring to another owner raises
    OwnershipError (not a position error), the session's state left as the host knew it."""
    from concordia_agents import OwnershipError
    from gpu_runtime.cuda.step_commit import StepState
    from gpu_runtime.records import RecordType, encode_record

    rt = make_runtime()
    s, _, tokens = _session(rt)
    tokens[:, :4] = 7
    s.commit(dict(META), rows={"tokens": 4})
    steps = s.step_commits(kv="kv", tokens="tokens", meta=META, length_key="n_tokens", device=False)
    steps.host_step(4, force=True)
    writer, ring = s._log.writer, s._log.ring
    # The "device" publishes one epoch (a COMMIT record) itself, as the kernel does.
    body = s._commit_body({**META, "n_tokens": 6}, {"kv": 6, "tokens": 6})
    at = writer.position
    record = encode_record(RecordType.COMMIT, body, session_tag=writer.session_tag, epoch=s.epoch + 1, offset=at)
    steps.device = _ReportingProducer(lambda armed: StepState(True, at + len(record), armed["epoch"] + 1, 6, None,
                                                              0, 1, 2))
    steps.arm(0)
    assert steps.device.armed_with == {"position": at, "epoch": 2, "committed": 4}
    with pytest.raises(ConcordiaError, match="in-step producer holds the log"):
        s.commit({"x": 1})
    ring.write_at(at, record)
    ring.publish_commit(at + len(record), 3)
    state = steps.close()
    assert steps.device.disarmed and state.commits == 1
    assert (s.epoch, s.meta["n_tokens"], s.regions["kv"].length, writer.position) == (3, 6, 6, at + len(record))
    assert s.commit({**META, "n_tokens": 6}) == 4  # the host commits again after close

    steps.device = _ReportingProducer(lambda armed: StepState(True, writer.position, armed["epoch"], 6, "fenced",
                                                              99, 0, 1))
    steps.arm(0)
    ring.set_owner(99)  # another owner took the ring over
    with pytest.raises(OwnershipError, match="fencing token 99"):
        steps.close()
    assert s.epoch == 4 and not s._stepping
