"""How much of each measurement to run: the full suite, or the ``--quick`` smoke.

The full plan is sized to finish in well under 10 minutes on the 2-core machines, the
quick one in well under 90 s; ``phase_timeout_seconds`` bounds every phase so a hang
becomes a reported error instead of a stuck run.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    rounds: int  # each measurement alternates direct, nginx, gateway this many times
    # 1. small responses (wrk, closed loop)
    wrk_seconds: int
    wrk_warmup_seconds: int
    wrk_connections: int
    # 2. added latency (open loop)
    latency_rate: int  # requests per second
    latency_seconds: float
    latency_connections: int
    # 3. bulk streaming
    bulk_bytes: int
    # More rounds than the rest: a floating direct transfer moves by up to 3x from one to
    # the next (where the scheduler puts client and upstream), and a transfer is short.
    bulk_rounds: int
    # 4. WebSocket relay
    ws_message_bytes: int
    ws_window: int
    ws_seconds: float
    ws_rtt_messages: int
    # 5. route propagation
    propagation_changes: int
    # 6. 1M sandboxes
    scale_sandboxes: int
    scale_probes: int  # cache misses timed (and as many warm requests)
    scale_fill: int  # distinct labels looked up afterwards, to fill the cache
    # 7. idle WebSockets
    idle_websockets: int
    idle_batch: int
    # profile (only with --profile)
    profile_seconds: int
    native_profile_seconds: int  # perf with dwarf call graphs: ~30 MB of data a second
    phase_timeout_seconds: float


FULL = Plan(
    name="full",
    rounds=3,
    wrk_seconds=10,
    wrk_warmup_seconds=2,
    wrk_connections=64,
    latency_rate=1000,
    latency_seconds=5.0,
    latency_connections=32,
    bulk_bytes=256 * MIB,
    bulk_rounds=7,
    ws_message_bytes=64,
    ws_window=64,
    ws_seconds=3.0,
    ws_rtt_messages=2000,
    propagation_changes=200,
    scale_sandboxes=1_000_000,
    scale_probes=2000,
    scale_fill=120_000,
    idle_websockets=8000,
    idle_batch=250,
    profile_seconds=10,
    native_profile_seconds=3,
    phase_timeout_seconds=240.0,
)

QUICK = Plan(
    name="quick",
    rounds=1,
    wrk_seconds=3,
    wrk_warmup_seconds=1,
    wrk_connections=64,
    latency_rate=1000,
    latency_seconds=2.0,
    latency_connections=32,
    bulk_bytes=32 * MIB,
    bulk_rounds=1,
    ws_message_bytes=64,
    ws_window=64,
    ws_seconds=1.0,
    ws_rtt_messages=300,
    propagation_changes=30,
    scale_sandboxes=10_000,
    scale_probes=300,
    scale_fill=3000,
    idle_websockets=1000,
    idle_batch=250,
    profile_seconds=3,
    native_profile_seconds=1,
    phase_timeout_seconds=40.0,
)
