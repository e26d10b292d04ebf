"""Random operation sequences on the lifecycle table (hypothesis) keep its invariants."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import errors
from gateway.routing import model
from gateway.routing.model import Op, PortOptions, Sandbox, State, Verdict

SID, OTHER, LABEL = "sbx001", "sbx002", "sbx"
steps = st.lists(
    st.tuples(st.sampled_from(list(Op)), st.sampled_from([SID, OTHER]),
              st.sampled_from([3000, 5173, 8080])),
    max_size=40,
)  # fmt: skip


def _apply(record: Sandbox | None, op: Op, sid: str, port: int, now: float) -> Sandbox | None:
    """The effect of an APPLY verdict, as the writer performs it."""
    if op is Op.CREATE:
        return model.created(sid, label=LABEL, address="10.0.0.1", incarnation=f"i{now}", now=now)
    assert record is not None
    if op is Op.EXPOSE:
        return model.exposed(record, port, PortOptions(), now=now)
    if op is Op.CLOSE:
        return model.closed(record, port, now=now)
    if op is Op.PAUSE:
        return model.paused(record, now=now)
    if op is Op.RESUME:
        return model.resumed(record, address=None, incarnation=f"i{now}", now=now)
    if op is Op.TERMINATE:
        return model.terminated(record, now=now)
    raise AssertionError(f"{op} never applies")


@settings(max_examples=400)
@given(steps)
def test_random_sequences_follow_the_table(ops: list[tuple[Op, str, int]]) -> None:
    """Each verdict is the table's cell; refusals raise; applied effects give the state the
    operation names; a tombstone is never revived; routes resolve only while running."""
    record: Sandbox | None = None
    for now, (op, sid, port) in enumerate(ops, start=1):
        column = record.state if record is not None and (record.id == sid or op is Op.CREATE) \
            else model.UNKNOWN  # fmt: skip
        expected = model.TRANSITIONS[(op, column)]
        assert model.verdict(op, record, sid) is expected
        try:
            checked = model.check(op, record, sid)
        except (errors.UnknownSandbox, errors.LifecycleConflict):
            assert expected in (Verdict.CONFLICT, Verdict.NOT_FOUND)
            continue
        assert checked is expected
        before = record
        if expected is Verdict.APPLY:
            record = _apply(record, op, sid, port, float(now))
        assert record is not None
        if before is not None and before.state is State.TERMINATED:
            assert record.state is State.TERMINATED, "a tombstone came back"
        wanted = {Op.CREATE: State.RUNNING, Op.PAUSE: State.PAUSED, Op.RESUME: State.RUNNING,
                  Op.TERMINATE: State.TERMINATED}.get(op)  # fmt: skip
        if wanted is not None and expected is Verdict.APPLY:
            assert record.state is wanted
        if record.state is State.TERMINATED:
            assert not record.ports and record.address == ""
        for exposed_port in record.ports:
            try:
                model.resolve(record, exposed_port, label=LABEL)
                assert record.state is State.RUNNING
            except (errors.SandboxPaused, errors.SandboxTerminated):
                assert record.state is not State.RUNNING
