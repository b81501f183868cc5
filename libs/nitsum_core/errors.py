"""Typed errors shared by services and the client SDK.

Every error that crosses the wire is an ``ErrorInfo(code, message)``; ``error_from_info`` turns it
back into the matching exception class so that callers can ``except UnknownTier``.
"""

from __future__ import annotations


class NitsumError(Exception):
    """Base class of every error Nitsum raises on purpose."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(NitsumError):
    """A message could not be decoded (malformed bytes, wrong type, missing field)."""

    code = "malformed"


class InvalidRequest(NitsumError):
    """A well-formed request with values that cannot be served (empty prompt, bad max_tokens...)."""

    code = "invalid_request"


class UnknownTier(InvalidRequest):
    code = "unknown_tier"


class PromptTooLong(InvalidRequest):
    code = "prompt_too_long"


class NoWorkers(NitsumError):
    """No live worker can take the request right now."""

    code = "no_workers"


class WorkerLost(NitsumError):
    """The worker serving a request died and the request could not be re-run elsewhere."""

    code = "worker_lost"


class Overloaded(NitsumError):
    code = "overloaded"


class RequestTimeout(NitsumError):
    code = "timeout"


class Cancelled(NitsumError):
    code = "cancelled"


class Reconfiguring(NitsumError):
    """The worker is switching topology; the router retries the submission after the switch."""

    code = "reconfiguring"


class ReconfigFailed(NitsumError):
    """A topology switch did not complete; the pool resumed its previous epoch."""

    code = "reconfig_failed"


class NotRunning(NitsumError):
    """The client could not reach a Nitsum router (bus down or stack not started)."""

    code = "not_running"


_BY_CODE: dict[str, type[NitsumError]] = {
    cls.code: cls
    for cls in (
        NitsumError,
        ProtocolError,
        InvalidRequest,
        UnknownTier,
        PromptTooLong,
        NoWorkers,
        Reconfiguring,
        ReconfigFailed,
        WorkerLost,
        Overloaded,
        RequestTimeout,
        Cancelled,
        NotRunning,
    )
}


def error_class(code: str) -> type[NitsumError]:
    """The exception class for a wire error code (NitsumError for codes this version doesn't know)."""
    return _BY_CODE.get(code, NitsumError)
