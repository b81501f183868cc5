"""Workers and controller <-> kv_broker: KV block events, lookups, and the migration plan of a switch."""

from __future__ import annotations

from typing import Literal

import msgspec

from nitsum_core.wire.codec import ErrorInfo
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.worker import SamplingParams


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


class KvTransfer(msgspec.Struct, kw_only=True):
    """KV heads [head_start, head_end) of ``num_tokens`` tokens of one request: src -> dst slot."""

    request_id: str
    src_slot: int
    dst_slot: int
    head_start: int
    head_end: int
    num_tokens: int


class MovedRequest(msgspec.Struct, kw_only=True):
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
    assignments: list[MovedRequest] = msgspec.field(default_factory=list)
    transfers: list[KvTransfer] = msgspec.field(default_factory=list)
    recomputed: list[str] = msgspec.field(default_factory=list)  # no room for their KV: re-prefill
    error: ErrorInfo | None = None
