"""Admission: a generate request is checked and tokenised before it takes a place in flight."""

from __future__ import annotations

from nitsum_core.config import MAX_STOP_STRINGS, MAX_TOKENS_LIMIT, Tier, check_tier
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.errors import InvalidRequest, NoWorkers, Overloaded, PromptTooLong
from nitsum_core.wire.client import GenerateRequest


def admit(
    req: GenerateRequest,
    tiers: dict[str, Tier],
    tokenizer: Tokenizer,
    in_flight: int,
    max_in_flight: int,
    is_in_flight: bool,
    max_model_len: int | None,
) -> tuple[Tier, list[int]]:
    """The request's tier and prompt token ids; raise the typed error that says what to change.

    ``in_flight`` counts the router's requests, ``is_in_flight`` says whether this id is one of
    them, ``max_model_len`` is the smallest context of the live workers (None: no live worker).
    """
    tier = check_tier(tiers, req.tier)
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("send exactly one of 'prompt' (text) or 'messages' (chat)")
    if req.prompt is not None and not req.prompt.strip():
        raise InvalidRequest("the prompt is empty")
    if req.messages is not None and (
        not req.messages or not any(msg.content.strip() for msg in req.messages)
    ):
        raise InvalidRequest("the chat has no message with content")
    if not 0 < req.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidRequest(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {req.max_tokens}")
    if req.temperature < 0 or not 0 < req.top_p <= 1:
        raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s for s in req.stop):
        raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
    if req.timeout_s <= 0:
        raise InvalidRequest("timeout_s must be positive")
    if not req.request_id or is_in_flight:
        raise InvalidRequest(f"request_id {req.request_id!r} is empty or already in flight")
    if in_flight >= max_in_flight:
        raise Overloaded(f"router has {in_flight} requests in flight (limit {max_in_flight}); retry later")
    limit = max_model_len
    if limit is None:
        raise NoWorkers("no live worker; start workers (nitsum up) and retry")
    try:
        ids = (
            tokenizer.encode_prompt(req.prompt)
            if req.prompt is not None
            else tokenizer.encode_chat(req.messages or [])
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if len(ids) >= limit:
        raise PromptTooLong(f"prompt is {len(ids)} tokens; the context window is {limit} tokens; shorten it")
    if len(ids) + req.max_tokens > limit:
        raise InvalidRequest(
            f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the context window of "
            f"{limit}; use max_tokens <= {limit - len(ids)}"
        )
    return tier, ids
