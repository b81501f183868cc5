"""Client <-> router (ROUTER_GENERATE, ROUTER_CANCEL): generate requests and the chunks streamed back."""

from __future__ import annotations

import msgspec

from nitsum_core.wire.codec import ErrorInfo


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
