"""Router <-> worker: submits and aborts, the token batches of each engine step, heartbeats."""

from __future__ import annotations

import msgspec

from nitsum_core.wire.codec import ErrorInfo


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
