"""Routers <-> controller: window reports, admission budgets, holds during a switch, status, manual switches."""

from __future__ import annotations

import msgspec

from nitsum_core.wire.codec import ErrorInfo
from nitsum_core.wire.cut import TopologyInstance


class WorkerView(msgspec.Struct, kw_only=True):
    slot: int
    alive: bool
    running: int
    waiting: int
    in_flight: int
    free_blocks: int
    total_blocks: int
    last_seen_s: float
    epoch: int = 0
    tp: int = 1
    rank: int = 0
    pool_joined: bool = False
    tokens_prefilled: int = 0
    weight_bytes_moved: int = 0


class RouterStatus(msgspec.Struct, kw_only=True):
    router_id: str
    epoch: int
    workers: list[WorkerView]
    in_flight_by_tier: dict[str, int]
    completed: int
    failed: int
    rerouted: int
    tiers: list[str]
    # Admission budgets in force (feasible req/s per tier, from `tp_controller --auto`) and the
    # AIMD scale already applied to them; empty: no controller budgets, nothing limited.
    budgets: dict[str, float] = msgspec.field(default_factory=dict)
    budget_scale: float = 1.0


# Most in-flight requests a router reports per tier and window (the youngest): enough for the
# replay's backlog on any pool here, and ~100 KiB at most, well under the bus's payload limit.
MAX_IN_FLIGHT_REPORTED = 2048


class InFlightRequest(msgspec.Struct, kw_only=True):
    """A request still in flight at a router when its window closed (queued or decoding)."""

    prompt_tokens: int
    output_tokens: int  # the router's estimate (the tier's recent mean), at least generated + 1
    age_s: float  # seconds since it arrived
    ttft_s: float | None = None  # its time to first token; None while it waits for one
    generated: int = 0  # output tokens streamed so far


class TierWindowStats(msgspec.Struct, kw_only=True):
    """One tier's traffic at one router over one control window."""

    prompt_tokens: list[int] = msgspec.field(default_factory=list)  # one entry per arrival
    output_tokens: list[int] = msgspec.field(default_factory=list)  # estimate per arrival
    # Seconds from the start of the router's window to each arrival: the controller's replay
    # keeps the window's bursts instead of smoothing them into a Poisson stream. Empty from a
    # router that does not report them (the replay then re-spaces that window's arrivals).
    arrival_offsets_s: list[float] = msgspec.field(default_factory=list)
    finished: int = 0
    good: int = 0  # finished within both the TTFT and the TPOT target
    # What was still in flight when the window closed: the controller's replay starts from it.
    # Empty from a router that does not report it (the replay then starts from an empty pool).
    in_flight: list[InFlightRequest] = msgspec.field(default_factory=list)


class RouterWindowStats(msgspec.Struct, kw_only=True):
    """Router -> controller (ROUTER_STATS): what the configurator needs to estimate demand."""

    router_id: str
    window_s: float
    tiers: dict[str, TierWindowStats] = msgspec.field(default_factory=dict)


class AdmissionBudgets(msgspec.Struct, kw_only=True):
    """Controller -> routers (CONTROLLER_BUDGETS): per-tier feasible rate (requests/s) for the
    next window, split evenly over the routers that reported; tiers absent are not limited."""

    epoch: int
    budgets: dict[str, float] = msgspec.field(default_factory=dict)


class RouterHold(msgspec.Struct, kw_only=True):
    """Controller -> every router (ROUTER_HOLD): hold new dispatches, or release them.

    On release, ``moved`` maps each migrated request to its new leader slot.
    """

    plan_id: str
    hold: bool
    moved: dict[str, int] = msgspec.field(default_factory=dict)


class RouterHoldAck(msgspec.Struct, kw_only=True):
    router_id: str
    held: int  # requests waiting for the release


class ReconfigureRequest(msgspec.Struct, kw_only=True):
    """Anyone -> controller (CONTROLLER_RECONFIGURE): switch the pool to this cut by hand.

    ``tp`` lists instance degrees in slot order (``[2, 2]``: slots 0-1 and 2-3); or give
    ``instances`` in full.
    """

    tp: list[int] | None = None
    instances: list[TopologyInstance] | None = None
    reason: str = "manual"
    timeout_s: float = 30.0


class ReconfigureResult(msgspec.Struct, kw_only=True):
    ok: bool
    epoch: int
    error: ErrorInfo | None = None
    phases: dict[str, float] = msgspec.field(default_factory=dict)  # seconds per phase
    requests_moved: int = 0
    requests_recomputed: int = 0
    transfers: int = 0
    kv_bytes_moved: int = 0
    weight_bytes_moved: int = 0
