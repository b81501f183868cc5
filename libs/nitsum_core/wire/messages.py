"""The wire protocol: one msgspec Struct per subject, msgpack-encoded.

Structs are frozen-free but ``forbid_unknown_fields`` is off on purpose: a newer peer may add
optional fields without breaking an older one (subjects carry the major version).
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec

from nitsum_core.errors import NitsumError, ProtocolError, error_class


class ErrorInfo(msgspec.Struct):
    """An error on the wire: a stable machine code and a message that says what to do."""

    code: str
    message: str

    @classmethod
    def from_exc(cls, exc: NitsumError) -> ErrorInfo:
        return cls(code=exc.code, message=exc.message)

    def to_exc(self) -> NitsumError:
        return error_class(self.code)(self.message)


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class GenerateRequest(msgspec.Struct, kw_only=True):
    """Client -> router (ROUTER_GENERATE). Exactly one of ``prompt`` / ``messages`` is set."""

    request_id: str
    tier: str = "interactive"
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    timeout_s: float = 300.0


class Usage(msgspec.Struct, kw_only=True):
    """Per-request accounting, sent with the final chunk."""

    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float
    worker_slot: int
    reroutes: int = 0


class StreamChunk(msgspec.Struct, kw_only=True):
    """Router -> client (reply inbox): new text for one request; the last one has ``finished``."""

    request_id: str
    seq: int
    text: str = ""
    token_ids: list[int] = msgspec.field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = None


class CancelRequest(msgspec.Struct):
    """Client -> router (ROUTER_CANCEL)."""

    request_id: str


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False


class WorkerSubmit(msgspec.Struct, kw_only=True):
    """Router -> worker (worker_submit(slot)); answered with SubmitAck."""

    request_id: str
    router_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    epoch: int = 0
    # Seconds left to the request's TTFT target when sent (None: no target, or its first token is
    # already out). The worker turns it into a deadline on its own clock: no clock sync needed.
    ttft_left_s: float | None = None
    # The request's tier's mean time-per-output-token target (None: none): a worker started with
    # --tpot-sized-steps sizes the steps the request decodes in so that it is met.
    tpot_s: float | None = None


class SubmitAck(msgspec.Struct, kw_only=True):
    request_id: str
    accepted: bool
    error: ErrorInfo | None = None


class WorkerAbort(msgspec.Struct):
    """Router -> worker (worker_abort(slot)): stop generating and free the KV blocks."""

    request_id: str


class TokenItem(msgspec.Struct, kw_only=True):
    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: ErrorInfo | None = None


class TokenBatch(msgspec.Struct, kw_only=True):
    """Worker -> router (router_tokens(router_id)): every new token of one engine step."""

    slot: int
    step: int
    items: list[TokenItem]


class WorkerHeartbeat(msgspec.Struct, kw_only=True):
    """Worker -> all (WORKER_HEARTBEAT): liveness plus the load numbers the router routes on."""

    slot: int
    worker_id: str
    pid: int
    model: str
    max_model_len: int
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    block_size: int
    steps: int
    tokens_generated: int
    sent_at: float
    epoch: int = 0  # topology epoch this worker runs
    tp: int = 1
    rank: int = 0
    tokens_prefilled: int = 0
    weight_bytes_moved: int = 0  # by TP switches; stays 0 (weights are views)
    pool_joined: bool = False  # this slot has its TP communicators (always False with pool size 1)


class KvEvent(msgspec.Struct, kw_only=True):
    """Worker -> kv_broker (KV_EVENTS): a request's KV blocks were allocated, grown or freed."""

    slot: int
    request_id: str
    kind: Literal["alloc", "free"]
    block_ids: list[int] = msgspec.field(default_factory=list)
    head_start: int = 0
    head_end: int = 0
    num_tokens: int = 0


class KvLookup(msgspec.Struct):
    request_id: str


class KvLocation(msgspec.Struct, kw_only=True):
    request_id: str
    found: bool
    slot: int = -1
    block_ids: list[int] = msgspec.field(default_factory=list)
    head_start: int = 0
    head_end: int = 0
    num_tokens: int = 0


class KvListRequest(msgspec.Struct):
    slot: int | None = None


class KvListReply(msgspec.Struct):
    entries: list[KvLocation]


class Instance(msgspec.Struct, kw_only=True):
    """One serving instance: an aligned block of slots running at TP ``len(slots)``."""

    instance_id: int
    slots: list[int]
    role: Literal["prefill", "decode", "mixed"] = "mixed"
    tiers: list[str] = msgspec.field(default_factory=list)  # empty: every tier

    @property
    def tp(self) -> int:
        return len(self.slots)

    @property
    def leader(self) -> int:
        return self.slots[0]


class Topology(msgspec.Struct, kw_only=True):
    """Epoch ``epoch`` of the pool cut; stored in the TOPOLOGY_BUCKET KV bucket."""

    epoch: int
    instances: list[Instance]
    written_at: float
    reason: str = ""

    @property
    def slots(self) -> list[int]:
        """Every slot the cut uses, in order."""
        return sorted(s for i in self.instances for s in i.slots)


class TopologyRequest(msgspec.Struct):
    pass


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


class StatusRequest(msgspec.Struct):
    pass


# ---- reconfiguration (DESIGN §6): controller <-> workers / kv_broker / routers ----------------


class RequestState(msgspec.Struct, kw_only=True):
    """A paused request's whole state: everything its next leader needs to continue it."""

    request_id: str
    router_id: str
    slot: int  # the leader it was paused on
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int  # tokens whose KV is in block_table
    priority: int
    sampling: SamplingParams
    rng_state: bytes | None = None
    block_table: list[int] = msgspec.field(default_factory=list)
    ttft_left_s: float | None = None  # seconds to its TTFT deadline when paused (WorkerSubmit's)
    tpot_s: float | None = None  # its TPOT target (WorkerSubmit's)
    since_first_s: float | None = None  # seconds since its first output token when paused (None: not out)


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


class KvTransfer(msgspec.Struct, kw_only=True):
    """KV heads [head_start, head_end) of ``num_tokens`` tokens of one request: src -> dst slot."""

    request_id: str
    src_slot: int
    dst_slot: int
    head_start: int
    head_end: int
    num_tokens: int


class Assignment(msgspec.Struct, kw_only=True):
    """Where a moved request continues: its new leader and its block table there (empty: recompute)."""

    request_id: str
    leader: int
    block_table: list[int]


class KvPlanRequest(msgspec.Struct, kw_only=True):
    """Controller -> kv_broker (KV_PLAN): compute the migration for ``old`` -> ``new``."""

    old: Topology
    new: Topology
    requests: list[RequestState]
    kv_units: dict[int, int]
    num_kv_heads: int
    block_size: int


class KvPlan(msgspec.Struct, kw_only=True):
    assignments: list[Assignment] = msgspec.field(default_factory=list)
    transfers: list[KvTransfer] = msgspec.field(default_factory=list)
    recomputed: list[str] = msgspec.field(default_factory=list)  # no room for their KV: re-prefill
    error: ErrorInfo | None = None


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
    instances: list[Instance] | None = None
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


_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}

T = TypeVar("T", bound=msgspec.Struct)


def encode(msg: msgspec.Struct) -> bytes:
    """Encode any protocol message to msgpack bytes."""
    return _encoder.encode(msg)


def decode(cls: type[T], data: bytes) -> T:
    """Decode ``data`` as ``cls``; raise ProtocolError saying what was wrong on any bad input."""
    dec = _decoders.get(cls)
    if dec is None:
        dec = _decoders[cls] = msgspec.msgpack.Decoder(cls)
    try:
        return dec.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {cls.__name__}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed {cls.__name__} (not msgpack of the expected shape): {exc}") from None


ALL_MESSAGE_TYPES: tuple[type[msgspec.Struct], ...] = (
    ErrorInfo,
    ChatMessage,
    GenerateRequest,
    Usage,
    StreamChunk,
    CancelRequest,
    SamplingParams,
    WorkerSubmit,
    SubmitAck,
    WorkerAbort,
    TokenItem,
    TokenBatch,
    WorkerHeartbeat,
    KvEvent,
    KvLookup,
    KvLocation,
    KvListRequest,
    KvListReply,
    Instance,
    Topology,
    TopologyRequest,
    WorkerView,
    RouterStatus,
    StatusRequest,
    RequestState,
    ReconfigPause,
    PauseAck,
    KvTransfer,
    Assignment,
    KvPlanRequest,
    KvPlan,
    ReconfigMigrate,
    ReconfigCommit,
    ReconfigAbort,
    ControlAck,
    RouterHold,
    RouterHoldAck,
    TierWindowStats,
    RouterWindowStats,
    AdmissionBudgets,
    ReconfigureRequest,
    ReconfigureResult,
)
