"""What the asyncio side of a worker asks its engine thread to do, through one queue."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from nitsum_core.engine.engine import RequestParams


@dataclass
class Submit:
    """Start generating a request (its tokens go back to ``router_id``)."""

    request_id: str
    router_id: str
    prompt_ids: list[int]
    params: RequestParams
    priority: int
    ttft_deadline: float | None = None  # time.monotonic() time its first token is due by
    tpot_s: float | None = None  # its TPOT target


@dataclass
class Abort:
    """Stop a request and free its KV blocks."""

    request_id: str


@dataclass
class Control:
    """A reconfiguration step (or ``adopt``: apply a topology without migration) and its reply."""

    phase: str
    msg: Any
    reply: Future = field(default_factory=Future)
