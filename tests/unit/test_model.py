"""gateway.routing.model: the lifecycle table, the effects and ``resolve``. Pure, no sockets."""

from __future__ import annotations

import dataclasses

import pytest

from gateway import errors
from gateway.routing import model
from gateway.routing.model import Op, PortOptions, Sandbox, State, Verdict

# ---------------------------------------------------------------------------------------
# DESIGN.md section 2's lifecycle table, copied here as literal text (not from model.py),
# so a change to either side shows up as a failing cell.
# ---------------------------------------------------------------------------------------

COLUMNS = ("running", "paused", "terminated", "unknown id")
DESIGN_TABLE: dict[str, tuple[str, str, str, str]] = {
    "create (same id)": ("conflict", "conflict", "conflict", "ok"),
    "expose port": ("ok", "conflict", "conflict", "not found"),
    "close port": ("ok", "ok", "conflict", "not found"),
    "list ports": ("ok", "ok", "conflict", "not found"),
    "pause": ("ok", "ok (no-op)", "conflict", "not found"),
    "resume [address]": ("ok", "ok", "conflict", "not found"),
    "terminate": ("ok", "ok", "ok (no-op)", "not found"),
}
ROW_OPS = {
    "create (same id)": Op.CREATE,
    "expose port": Op.EXPOSE,
    "close port": Op.CLOSE,
    "list ports": Op.LIST,
    "pause": Op.PAUSE,
    "resume [address]": Op.RESUME,
    "terminate": Op.TERMINATE,
}
COLUMN_STATES: dict[str, State | None] = {
    "running": State.RUNNING,
    "paused": State.PAUSED,
    "terminated": State.TERMINATED,
    "unknown id": None,
}
READ_ONLY_OPS = {Op.LIST, Op.SHOW}


def expected_verdict(op: Op, cell: str) -> Verdict:
    """The verdict a DESIGN.md cell means: "ok" reads for read-only operations."""
    if cell == "ok":
        return Verdict.READ if op in READ_ONLY_OPS else Verdict.APPLY
    return {
        "ok (no-op)": Verdict.NOOP,
        "conflict": Verdict.CONFLICT,
        "not found": Verdict.NOT_FOUND,
    }[cell]


CELLS = [
    pytest.param(ROW_OPS[row], COLUMN_STATES[column], cell, id=f"{row}|{column}")
    for row, cells in DESIGN_TABLE.items()
    for column, cell in zip(COLUMNS, cells, strict=True)
]


def record(
    state: State = State.RUNNING,
    *,
    sandbox_id: str = "abc123xyz",
    ports: dict[int, PortOptions] | None = None,
    allow_ports: frozenset[int] | None = None,
    address: str = "10.0.0.5",
) -> Sandbox:
    return Sandbox(
        id=sandbox_id,
        label=sandbox_id[:6],
        state=state,
        address=address,
        incarnation="inc0",
        gen=7,
        allow_ports=allow_ports,
        ports=ports if ports is not None else {3000: PortOptions()},
        limits={"connections": 10},
        created_at=100.0,
        updated_at=100.0,
    )


@pytest.mark.parametrize(("op", "state", "cell"), CELLS)
def test_transition_cell_matches_design(op: Op, state: State | None, cell: str) -> None:
    """Each cell of TRANSITIONS says what DESIGN.md section 2 says for that cell."""
    assert model.TRANSITIONS[(op, state)] is expected_verdict(op, cell)


@pytest.mark.parametrize(("op", "state", "cell"), CELLS)
def test_verdict_on_a_record_follows_the_cell(op: Op, state: State | None, cell: str) -> None:
    """verdict() on a record in that state (or on no record) gives the cell's answer."""
    found = None if state is None else record(state)
    assert model.verdict(op, found, "abc123xyz") is expected_verdict(op, cell)


def test_table_has_exactly_the_design_rows_plus_show() -> None:
    """TRANSITIONS covers every operation x column once: DESIGN's rows plus show."""
    expected = {(op, s) for op in ROW_OPS.values() for s in COLUMN_STATES.values()}
    expected |= {(Op.SHOW, s) for s in COLUMN_STATES.values()}
    assert set(model.TRANSITIONS) == expected


@pytest.mark.parametrize(
    ("state", "verdict"),
    [
        (State.RUNNING, Verdict.READ),
        (State.PAUSED, Verdict.READ),
        (State.TERMINATED, Verdict.READ),
        (None, Verdict.NOT_FOUND),
    ],
    ids=["running", "paused", "terminated", "unknown"],
)
def test_show_reads_every_state(state: State | None, verdict: Verdict) -> None:
    """show (not in DESIGN's table) reads any record, tombstones included; unknown is 404."""
    assert model.TRANSITIONS[(Op.SHOW, state)] is verdict


@pytest.mark.parametrize("state", [State.RUNNING, State.PAUSED], ids=["running", "paused"])
def test_create_on_a_label_held_by_another_id_is_label_taken(state: State) -> None:
    """A create whose label a live sandbox of another id holds is a 409 label_taken."""
    holder = record(state, sandbox_id="abc123old")
    assert model.verdict(Op.CREATE, holder, "abc123new") is Verdict.CONFLICT
    with pytest.raises(errors.LifecycleConflict) as caught:
        model.check(Op.CREATE, holder, "abc123new")
    assert caught.value.code == "label_taken"
    assert caught.value.status == 409
    assert "abc123" in caught.value.message and "abc123old" in caught.value.message


@pytest.mark.parametrize("sandbox_id", ["abc123old", "abc123new"], ids=["same-id", "other-id"])
def test_create_on_a_tombstone_is_quarantined(sandbox_id: str) -> None:
    """A tombstone quarantines its label for every id, its own included."""
    tombstone = record(State.TERMINATED, sandbox_id="abc123old")
    with pytest.raises(errors.LifecycleConflict) as caught:
        model.check(Op.CREATE, tombstone, sandbox_id)
    assert caught.value.code == "label_quarantined"
    assert "quarantined" in caught.value.message and "abc123" in caught.value.message


def test_create_of_an_existing_id_is_sandbox_exists() -> None:
    """Creating an id that is already live is 409 sandbox_exists."""
    with pytest.raises(errors.LifecycleConflict) as caught:
        model.check(Op.CREATE, record(), "abc123xyz")
    assert caught.value.code == "sandbox_exists"


@pytest.mark.parametrize("op", [op for op in Op if op is not Op.CREATE])
@pytest.mark.parametrize("state", list(State))
def test_other_ops_on_a_label_held_by_another_id_are_not_found(op: Op, state: State) -> None:
    """Every non-create operation treats another id's record under the label as unknown."""
    holder = record(state, sandbox_id="abc123old")
    assert model.verdict(op, holder, "abc123new") is Verdict.NOT_FOUND
    with pytest.raises(errors.UnknownSandbox, match="abc123new"):
        model.check(op, holder, "abc123new")


@pytest.mark.parametrize(
    ("op", "state", "code"),
    [
        (Op.EXPOSE, State.PAUSED, "sandbox_paused"),
        (Op.EXPOSE, State.TERMINATED, "sandbox_terminated"),
        (Op.CLOSE, State.TERMINATED, "sandbox_terminated"),
        (Op.LIST, State.TERMINATED, "sandbox_terminated"),
        (Op.PAUSE, State.TERMINATED, "sandbox_terminated"),
        (Op.RESUME, State.TERMINATED, "sandbox_terminated"),
    ],
    ids=str,
)
def test_conflicts_name_the_state(op: Op, state: State, code: str) -> None:
    """A refused move is a 409 whose code and message name the state it met."""
    with pytest.raises(errors.LifecycleConflict) as caught:
        model.check(op, record(state), "abc123xyz")
    assert caught.value.code == code
    assert str(state) in caught.value.message and str(op) in caught.value.message


# ---------------------------------------------------------------------------------------
# Effects
# ---------------------------------------------------------------------------------------


def test_created_is_running_with_no_ports() -> None:
    """created() gives a running record with its address, policy, limits and times."""
    new = model.created(
        "abc123xyz",
        label="abc123",
        address="10.0.0.5",
        incarnation="i1",
        now=5.0,
        allow_ports=frozenset({3000}),
        limits={"connections": 3},
    )
    assert new.state is State.RUNNING
    assert (new.id, new.label, new.address, new.incarnation) == (
        "abc123xyz",
        "abc123",
        "10.0.0.5",
        "i1",
    )
    assert new.ports == {}
    assert new.allow_ports == frozenset({3000})
    assert new.limits == {"connections": 3}
    assert (new.created_at, new.updated_at) == (5.0, 5.0)


def test_expose_adds_the_port_and_is_idempotent() -> None:
    """exposed() adds a port once; the same options again return the same object."""
    first = model.exposed(record(), 5173, PortOptions(), now=9.0)
    assert set(first.ports) == {3000, 5173}
    assert first.updated_at == 9.0
    assert model.exposed(first, 5173, PortOptions(), now=10.0) is first


def test_expose_with_other_options_changes_them() -> None:
    """exposed() with new options on an exposed port replaces the options."""
    changed = model.exposed(record(), 3000, PortOptions(host_rewrite=True), now=9.0)
    assert changed.ports[3000] == PortOptions(host_rewrite=True)


def test_close_removes_the_port_and_is_idempotent() -> None:
    """closed() drops the port; closing it again returns the same object."""
    first = model.closed(record(), 3000, now=9.0)
    assert first.ports == {}
    assert model.closed(first, 3000, now=10.0) is first


def test_close_works_while_paused() -> None:
    """A port closed while paused is gone from the record (it won't come back on resume)."""
    paused = model.paused(record(), now=2.0)
    closed = model.closed(paused, 3000, now=3.0)
    assert closed.state is State.PAUSED and closed.ports == {}
    resumed = model.resumed(closed, address=None, incarnation="i2", now=4.0)
    assert resumed.ports == {}


def test_pause_keeps_exposures_and_pausing_again_is_a_noop() -> None:
    """paused() keeps ports, address and incarnation; on a paused record it changes nothing."""
    running = record()
    paused = model.paused(running, now=9.0)
    assert paused.state is State.PAUSED
    assert (paused.ports, paused.address, paused.incarnation) == (
        running.ports,
        running.address,
        running.incarnation,
    )
    assert model.paused(paused, now=10.0) is paused


def test_resume_same_address_while_running_changes_nothing() -> None:
    """resumed() on a running record with no or the same address returns the same object."""
    running = record()
    assert model.resumed(running, address=None, incarnation="new", now=9.0) is running
    assert model.resumed(running, address="10.0.0.5", incarnation="new", now=9.0) is running


def test_resume_new_address_is_a_new_incarnation() -> None:
    """resumed() with a new address moves the record and mints a new incarnation."""
    moved = model.resumed(record(), address="10.0.0.9", incarnation="new", now=9.0)
    assert (moved.state, moved.address, moved.incarnation) == (State.RUNNING, "10.0.0.9", "new")
    assert moved.ports == record().ports


def test_resume_from_paused_keeps_ports_with_a_new_incarnation() -> None:
    """resumed() of a paused record runs again with the same ports and a new incarnation."""
    paused = model.paused(record(), now=1.0)
    resumed = model.resumed(paused, address=None, incarnation="new", now=2.0)
    assert resumed.state is State.RUNNING
    assert (resumed.ports, resumed.address, resumed.incarnation) == (
        paused.ports,
        paused.address,
        "new",
    )


def test_terminate_keeps_only_id_and_label() -> None:
    """terminated() is a tombstone: id, label and created_at; no address, ports or policy."""
    original = record(allow_ports=frozenset({3000}))
    tombstone = model.terminated(original, now=9.0)
    expected = Sandbox(
        id=original.id,
        label=original.label,
        state=State.TERMINATED,
        address="",
        incarnation="",
        created_at=original.created_at,
        updated_at=9.0,
    )
    assert tombstone == expected
    assert model.terminated(tombstone, now=10.0) is tombstone


def test_records_are_immutable() -> None:
    """A Sandbox is frozen: effects build new records instead of mutating."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        record().state = State.PAUSED  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "port", "error"),
    [
        (None, 3000, errors.SandboxNotFound),
        (record(State.TERMINATED, allow_ports=frozenset({1})), 3000, errors.SandboxTerminated),
        (record(State.PAUSED, allow_ports=frozenset({1})), 3000, errors.SandboxPaused),
        (record(allow_ports=frozenset({5173})), 3000, errors.PortNotAllowed),
        (record(), 5173, errors.PortNotExposed),
        (record(ports={}, allow_ports=frozenset({3000})), 3000, errors.PortNotExposed),
    ],
    ids=["not-found", "terminated", "paused", "not-allowed", "not-exposed", "allowed-not-exposed"],
)
def test_resolve_refusals_in_precedence(
    found: Sandbox | None, port: int, error: type[errors.EdgeError]
) -> None:
    """resolve() refuses in DESIGN.md section 5's order, naming the label and port."""
    with pytest.raises(error) as caught:
        model.resolve(found, port, label="abc123")
    assert (caught.value.label, caught.value.port) == ("abc123", port)


@pytest.mark.parametrize("host_rewrite", [False, True], ids=["plain", "host-rewrite"])
def test_resolve_ok(host_rewrite: bool) -> None:
    """resolve() of an exposed port gives address, port, incarnation and host_rewrite."""
    found = record(
        ports={3000: PortOptions(host_rewrite=host_rewrite)}, allow_ports=frozenset({3000})
    )
    upstream = model.resolve(found, 3000, label="abc123")
    assert upstream == model.Upstream("10.0.0.5", 3000, "inc0", host_rewrite)
