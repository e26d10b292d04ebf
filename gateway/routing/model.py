"""The sandbox record, its lifecycle table and route resolution. Pure.

Rule (after h11's ``_state.py``): everything that decides whether a lifecycle operation
is allowed lives in ``TRANSITIONS`` below, a literal copy of DESIGN.md section 2's table.
The writer (``store.RouteWriter``) and the tests read that table; no other module
contains ``if state == ...`` for lifecycle decisions. Effects (what a record becomes) are
the small pure functions after the table; ``resolve`` is the gateway's read-side rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway import errors


class State(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    TERMINATED = "terminated"  # a tombstone: answers 410 and holds the label


class Op(enum.StrEnum):
    CREATE = "create"
    SHOW = "show"
    EXPOSE = "expose"
    CLOSE = "close"
    LIST = "list"
    PAUSE = "pause"
    RESUME = "resume"
    TERMINATE = "terminate"


class Verdict(enum.Enum):
    APPLY = "apply"  # allowed; the effect decides whether anything changes
    READ = "read"  # allowed, reads only
    NOOP = "noop"  # allowed, changes nothing
    CONFLICT = "conflict"  # refused: 409
    NOT_FOUND = "not_found"  # refused: 404


# The column for an id with no record (or whose label holds another sandbox).
UNKNOWN = None

_A, _R, _N, _C, _F = Verdict.APPLY, Verdict.READ, Verdict.NOOP, Verdict.CONFLICT, Verdict.NOT_FOUND
_RUN, _PAU, _TER = State.RUNNING, State.PAUSED, State.TERMINATED

# Operation x state -> verdict. DESIGN.md section 2, cell by cell ("ok" on a state the
# operation doesn't change is NOOP; create on UNKNOWN still needs a free label).
TRANSITIONS: Mapping[tuple[Op, State | None], Verdict] = {
    (Op.CREATE, _RUN): _C, (Op.CREATE, _PAU): _C, (Op.CREATE, _TER): _C, (Op.CREATE, UNKNOWN): _A,
    (Op.SHOW, _RUN): _R, (Op.SHOW, _PAU): _R, (Op.SHOW, _TER): _R, (Op.SHOW, UNKNOWN): _F,
    (Op.EXPOSE, _RUN): _A, (Op.EXPOSE, _PAU): _C, (Op.EXPOSE, _TER): _C, (Op.EXPOSE, UNKNOWN): _F,
    (Op.CLOSE, _RUN): _A, (Op.CLOSE, _PAU): _A, (Op.CLOSE, _TER): _C, (Op.CLOSE, UNKNOWN): _F,
    (Op.LIST, _RUN): _R, (Op.LIST, _PAU): _R, (Op.LIST, _TER): _C, (Op.LIST, UNKNOWN): _F,
    (Op.PAUSE, _RUN): _A, (Op.PAUSE, _PAU): _N, (Op.PAUSE, _TER): _C, (Op.PAUSE, UNKNOWN): _F,
    (Op.RESUME, _RUN): _A, (Op.RESUME, _PAU): _A, (Op.RESUME, _TER): _C, (Op.RESUME, UNKNOWN): _F,
    (Op.TERMINATE, _RUN): _A, (Op.TERMINATE, _PAU): _A, (Op.TERMINATE, _TER): _N,
    (Op.TERMINATE, UNKNOWN): _F,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class PortOptions:
    """Per-port options: an extensible map. Unknown keys written by a newer writer are
    kept in ``extra`` and written back unchanged."""

    host_rewrite: bool = False
    extra: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """One sandbox's route record (a tombstone when ``state`` is TERMINATED).

    ``gen`` is the label's write counter (it orders cache fills and events);
    ``incarnation`` is minted at create, resume and every address change, and keys the
    upstream connection pool, so a recycled address never reuses a connection.
    """

    id: str
    label: str
    state: State
    address: str
    incarnation: str
    gen: int = 0
    allow_ports: frozenset[int] | None = None
    ports: Mapping[int, PortOptions] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where one routed request goes."""

    address: str
    port: int
    incarnation: str
    host_rewrite: bool


def verdict(op: Op, record: Sandbox | None, sandbox_id: str) -> Verdict:
    """The table's answer for ``op`` on ``sandbox_id``, given the record under its label."""
    if record is None:
        state = UNKNOWN
    elif record.id == sandbox_id or op is Op.CREATE:
        # A create is judged by whatever holds the label: another live sandbox or a
        # tombstone makes it a collision, never an overwrite.
        state = record.state
    else:
        state = UNKNOWN
    return TRANSITIONS[(op, state)]


def check(op: Op, record: Sandbox | None, sandbox_id: str) -> Verdict:
    """Like ``verdict``, but refusals raise.

    Raises:
        errors.UnknownSandbox: the table says NOT_FOUND.
        errors.LifecycleConflict: the table says CONFLICT; ``code`` names the state.
    """
    result = verdict(op, record, sandbox_id)
    if result is Verdict.NOT_FOUND:
        raise errors.UnknownSandbox(f"no sandbox with id {sandbox_id!r}")
    if result is Verdict.CONFLICT:
        raise _conflict(op, record, sandbox_id)
    return result


def _conflict(op: Op, record: Sandbox | None, sandbox_id: str) -> errors.LifecycleConflict:
    assert record is not None  # CONFLICT cells all have a record
    if op is Op.CREATE and record.state is State.TERMINATED:
        return errors.LifecycleConflict(
            f"label {record.label!r} is quarantined: sandbox {record.id!r} was terminated "
            "there and its URLs must not reach a new tenant yet",
            code="label_quarantined",
        )
    if op is Op.CREATE and record.id != sandbox_id:
        return errors.LifecycleConflict(
            f"label {record.label!r} of sandbox {sandbox_id!r} is held by live sandbox "
            f"{record.id!r}",
            code="label_taken",
        )
    if op is Op.CREATE:
        return errors.LifecycleConflict(
            f"sandbox {sandbox_id!r} already exists ({record.state})", code="sandbox_exists"
        )
    return errors.LifecycleConflict(
        f"cannot {op} sandbox {sandbox_id!r}: it is {record.state}",
        code=f"sandbox_{record.state}",
    )


# ---------------------------------------------------------------------------------------
# Effects: what a record becomes. Each returns the new record (or the same object when
# nothing changes, so the writer can skip the write and the event).
# ---------------------------------------------------------------------------------------


def created(
    sandbox_id: str,
    *,
    label: str,
    address: str,
    incarnation: str,
    now: float,
    allow_ports: frozenset[int] | None = None,
    limits: Mapping[str, int] | None = None,
) -> Sandbox:
    return Sandbox(
        id=sandbox_id,
        label=label,
        state=State.RUNNING,
        address=address,
        incarnation=incarnation,
        allow_ports=allow_ports,
        limits=dict(limits or {}),
        created_at=now,
        updated_at=now,
    )


def exposed(record: Sandbox, port: int, options: PortOptions, *, now: float) -> Sandbox:
    if record.ports.get(port) == options:
        return record
    return dataclasses.replace(record, ports={**record.ports, port: options}, updated_at=now)


def closed(record: Sandbox, port: int, *, now: float) -> Sandbox:
    if port not in record.ports:
        return record
    ports = {p: o for p, o in record.ports.items() if p != port}
    return dataclasses.replace(record, ports=ports, updated_at=now)


def paused(record: Sandbox, *, now: float) -> Sandbox:
    if record.state is State.PAUSED:
        return record
    return dataclasses.replace(record, state=State.PAUSED, updated_at=now)


def resumed(record: Sandbox, *, address: str | None, incarnation: str, now: float) -> Sandbox:
    """Running again, same ports; a new incarnation when it was paused or moved."""
    new_address = address or record.address
    if record.state is State.RUNNING and new_address == record.address:
        return record
    return dataclasses.replace(
        record, state=State.RUNNING, address=new_address, incarnation=incarnation, updated_at=now
    )


def terminated(record: Sandbox, *, now: float) -> Sandbox:
    """The tombstone: keeps id and label (to answer 410 and hold the label), nothing else."""
    if record.state is State.TERMINATED:
        return record
    return Sandbox(
        id=record.id,
        label=record.label,
        state=State.TERMINATED,
        address="",
        incarnation="",
        created_at=record.created_at,
        updated_at=now,
    )


# ---------------------------------------------------------------------------------------
# The read side
# ---------------------------------------------------------------------------------------


def resolve(record: Sandbox | None, port: int, *, label: str) -> Upstream:
    """Where a request for ``{port}-{label}`` goes, in DESIGN.md section 5's precedence.

    Raises:
        errors.SandboxNotFound, errors.SandboxTerminated, errors.SandboxPaused,
        errors.PortNotAllowed, errors.PortNotExposed.
    """
    if record is None:
        raise errors.SandboxNotFound(f"no sandbox has the label {label!r}", label=label, port=port)
    if record.state is State.TERMINATED:
        raise errors.SandboxTerminated(f"sandbox {label} was terminated", label=label, port=port)
    if record.state is State.PAUSED:
        raise errors.SandboxPaused(f"sandbox {label} is paused", label=label, port=port)
    if record.allow_ports is not None and port not in record.allow_ports:
        raise errors.PortNotAllowed(
            f"port {port} is not in the network policy of sandbox {label}", label=label, port=port
        )
    options = record.ports.get(port)
    if options is None:
        raise errors.PortNotExposed(
            f"port {port} of sandbox {label} is not exposed", label=label, port=port
        )
    return Upstream(record.address, port, record.incarnation, options.host_rewrite)
