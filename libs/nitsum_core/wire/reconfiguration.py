"""Controller <-> workers, one switch of the cut (docs/architecture.md#switch-protocol): pause, migrate, commit or abort."""

from __future__ import annotations

import msgspec

from nitsum_core.wire.codec import ErrorInfo
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.kv import KvPlan, RequestState


class ReconfigPause(msgspec.Struct, kw_only=True):
    """Controller -> worker (worker_control(slot, "pause")): stop at a step boundary, report state."""

    plan_id: str
    target: Topology  # the topology being switched to, so the worker can refuse one it cannot run


class PauseAck(msgspec.Struct, kw_only=True):
    slot: int
    ok: bool
    error: ErrorInfo | None = None
    requests: list[RequestState] = msgspec.field(default_factory=list)  # leaders only
    kv_units: int = 0  # head-units in this slot's KV pool
    num_kv_heads: int = 0
    block_size: int = 0
    seconds: float = 0.0


class ReconfigMigrate(msgspec.Struct, kw_only=True):
    """Controller -> worker (worker_control(slot, "migrate")): move KV units into staging."""

    plan_id: str
    target: Topology
    plan: KvPlan
    requests: list[RequestState]


class ReconfigCommit(msgspec.Struct, kw_only=True):
    """Controller -> worker (worker_control(slot, "commit")): switch to ``target`` and resume."""

    plan_id: str
    target: Topology
    # Seconds the moved requests have been held since their leaders paused, on the controller's
    # clock: their new leaders count it against their TTFT and TPOT targets (no clock sync needed).
    held_s: float = 0.0


class ReconfigAbort(msgspec.Struct, kw_only=True):
    """Controller -> worker (worker_control(slot, "abort")): drop staging, resume the old epoch."""

    plan_id: str
    reason: str


class ControlAck(msgspec.Struct, kw_only=True):
    """Worker -> controller: the reply to migrate / commit / abort."""

    slot: int
    ok: bool
    error: ErrorInfo | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    weight_bytes_moved: int = 0
    seconds: float = 0.0
