"""The pool's saturation point: the highest arrival rate it can sustain at all, SLOs aside.

Load sweeps are stated against it ("light to 2x saturation"), so that a sweep means the same
thing for an 8B model on H100s and a 70B model on H200s. The bound is the perf model's: every
step carries a full chunk of tokens (continuous batching with chunked prefill keeps steps full
under overload, and a decoding sequence costs one token of that chunk), on the shared cut whose
TP degree serves the most tokens per second. Above it, queues grow without limit whatever the
scheduler does; goodput can still rise there only by choosing which requests to serve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.workload import TraceRequest


class Saturation(NamedTuple):
    """Where the pool saturates for a request mix."""

    rps: float  # requests per second the pool completes, every step full
    tp: int  # TP degree of the shared cut that gets there
    tokens_per_request: float  # mean prompt + output tokens of the mix


def saturation_tokens_per_s(perf: PerfModel, gpus: int, chunk_tokens: int = 2048) -> tuple[float, int]:
    """Tokens per second ``gpus`` GPUs compute with every step a full chunk, on the TP degree
    that computes the most, and that degree (a power of two dividing ``gpus`` whose instances
    hold the weights and a chunk of KV cache)."""
    if gpus < 1 or chunk_tokens < 1:
        raise ValueError(f"gpus ({gpus}) and chunk_tokens ({chunk_tokens}) must be >= 1")
    best: tuple[float, int] | None = None
    tp = 1
    while tp <= gpus:
        if gpus % tp == 0 and perf.kv_capacity_tokens(tp) >= chunk_tokens:
            tokens_per_s = (gpus // tp) * chunk_tokens / perf.step_time(tp, chunk_tokens)
            if best is None or tokens_per_s > best[0]:
                best = (tokens_per_s, tp)
        tp *= 2
    if best is None:
        raise ValueError(
            f"the model's weights leave no room for a {chunk_tokens}-token chunk of KV cache on "
            f"any TP cut of {gpus} x {perf.hw.name}; use more or larger GPUs"
        )
    return best


def saturation(
    perf: PerfModel, gpus: int, requests: Sequence[TraceRequest], chunk_tokens: int = 2048
) -> Saturation:
    """Saturation throughput of ``gpus`` GPUs for the mix of ``requests`` (their lengths, not times).

    Every prompt and output token is computed in a step of ``chunk_tokens`` tokens; the pool is
    cut into instances of one TP degree (a power of two dividing ``gpus`` whose instances hold
    the weights), the degree with the highest throughput.
    """
    if not requests:
        raise ValueError("saturation needs at least one request to take the length mix from")
    tokens = sum(r.prompt_tokens + r.output_tokens for r in requests) / len(requests)
    tokens_per_s, tp = saturation_tokens_per_s(perf, gpus, chunk_tokens)
    return Saturation(tokens_per_s / tokens, tp, tokens)


def offered_load(perf: PerfModel, gpus: int, requests: Sequence[TraceRequest], duration_s: float) -> float:
    """Offered arrival rate of ``requests`` over ``duration_s`` as a multiple of saturation."""
    return len(requests) / duration_s / saturation(perf, gpus, requests).rps


def rate_for_load(
    make_workload: Callable[[float], Sequence[TraceRequest]],
    perf: PerfModel,
    gpus: int,
    multiple: float,
    duration_s: float,
) -> float:
    """The ``--rate`` at which ``make_workload(rate)`` offers ``multiple`` x saturation.

    A trace's mean rate is not its rate in every window (the Azure code trace is bursty), so the
    rate is found by bisection on the offered load of the very window simulated.
    """
    if multiple <= 0:
        raise ValueError(f"a load of {multiple:g}x saturation is not a load; give a multiple > 0")

    def load(rate: float) -> float:
        requests = make_workload(rate)
        return offered_load(perf, gpus, requests, duration_s) if requests else 0.0

    lo, hi = 0.0, 1.0
    sizes = [0]
    while True:
        requests = make_workload(hi)
        if requests and offered_load(perf, gpus, requests, duration_s) >= multiple:
            break
        if len(requests) == sizes[-1] and len(sizes) > 2:
            raise ValueError(
                f"the workload cannot offer {multiple:g}x saturation in a {duration_s:g} s window: "
                f"its traces run out at {len(requests)} requests; use a shorter --duration or a "
                "lower multiple"
            )
        sizes.append(len(requests))
        lo, hi = hi, hi * 2
    # 20 halvings: a millionth of the last doubling, far finer than the trace's own burstiness.
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if load(mid) < multiple else (lo, mid)
    return hi
