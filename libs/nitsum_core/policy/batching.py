"""Continuous-batching rules, stated once: the engine's ``Scheduler`` and the simulator's instance
steps both decide with these functions.

Pure and clock-free (the caller passes ``now`` and the step-time predictor), no torch. What each
caller keeps to itself is its bookkeeping: the engine's KV blocks and waiting heap, the
simulator's event-driven decode, its skip bound for the late check and its memoised chunk sizes.

- ``prefill_rank``: the order prompts prefill in -- lane (the router's), then TTFT deadline,
  earliest first; a late prompt after every other, in arrival order.
- ``late_prompts``: which prompts go late (sure to miss their TTFT deadline), Moore-Hodgson's
  rule in token units at a per-token prefill rate.
- ``tpot_step_bound``, ``repay_bound``, ``TPOT_REPAY_TOKENS``: TPOT-sized steps, and the tighter
  bound a sequence behind its TPOT target is paid back with.
- ``largest_chunk``: the budget bisection, the most prompt tokens a step fits within a bound.
- ``seat_fits``, ``strictest_reachable``: TPOT-gated seats.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import TypeVar

from nitsum_core.policy.routing import Lane

T = TypeVar("T")

# Predicted seconds of a step that prefills ``prefill_tokens`` prompt tokens and decodes
# ``decodes`` sequences holding ``decode_ctx_tokens`` tokens of KV between them; None while the
# predictor does not know yet (the engine learns it from its own steps; the simulator's never is).
StepTimePredictor = Callable[[int, int, int], float | None]

LATE = int(Lane.LATE)  # a plain int: ranks and the late check compare it once per prompt

# Tokens over which a sequence that fell behind its TPOT target (a re-cut's pause, a long step)
# pays the time back: each of its next steps is bounded below the target by debt / this. Short
# enough that a request ending sooner than expected has mostly paid, long enough that the bound
# stays above a decode-only step (a 60 ms pause at a 12 ms target: 10.1 ms steps).
TPOT_REPAY_TOKENS = 32


def prefill_rank(lane: int, due: float, arrival: float, tiebreak: int) -> tuple[int, float, int]:
    """Where a prompt prefills: by ``lane`` (``routing.Lane``: the router's lane, or the tier's
    priority), then ``due`` (its TTFT deadline: a prompt with 1 s to spare waits for one with
    0.3 s; 8B at 400 req/s in the simulator: 269.6 -> 279.5 req/s), then ``tiebreak``. A late
    prompt (``Lane.LATE``) goes after every other, the late ones in ``arrival`` order whatever
    their deadlines: none of them can count any more, so the oldest is served first."""
    return lane, arrival if lane == LATE else due, tiebreak


def misses_ttft(now: float, deadline: float, prefill_left_s: float) -> bool:
    """True when a prompt cannot produce its first token by ``deadline``: ``prefill_left_s`` is
    what it still waits for from ``now`` (its own remaining prefill, plus the prompts that
    prefill before it where the caller counts them)."""
    return now + prefill_left_s > deadline


def late_prompts(
    prompts: Iterable[tuple[float | None, int, int, T]], now: float, per_token: float
) -> tuple[list[T], float, int]:
    """The on-time prompts that can no longer meet their TTFT deadline, to move late.

    ``prompts`` are the on-time prompts in prefill order (``prefill_rank``), each as
    ``(deadline, tokens left to prefill, tiebreak, item)``; a deadline of None: its TTFT is
    settled or it has none (it still holds up the prompts after it). A prompt's first token
    waits for its own remaining prefill and that of every on-time prompt before it, at
    ``per_token`` seconds a token (0: a plain deadline check). Counting only its own (the lower
    bound) let prompts take seats and prefill chunks they were bound to miss with (8B at
    400 req/s in the simulator: 258.5 -> 269.6 req/s). When one would miss, the longest prompt
    before it gives way if that one has more prefill left and it then fits (Moore-Hodgson's rule
    for the most jobs meeting their deadlines on one machine: one long prompt gives way to
    several short ones; ties go to the lowest ``tiebreak``), else it goes late itself.

    Returns the items to move late, in the order decided, and what the check proved for the
    prompts left on time: the earliest clock time one of them could start to miss (inf: none has
    a deadline) at this rate, and the prompt tokens the last of them waits for (its own and those
    before it). The simulator keeps both to skip checks that cannot move anything.
    """
    late: list[T] = []
    safe_until = float("inf")
    ahead = 0  # prompt tokens of the on-time prompts before this one
    # Those that could give way, as a heap (longest first). The heap is needed only from the
    # first miss on: the prompts before it wait in ``uncounted`` and are heaped then, in one
    # heapify, where a push per prompt was a quarter of the simulator's check.
    counted: list[tuple[int, int, T]] = []
    uncounted: list[tuple[int, int, T]] = []
    for deadline, left, tiebreak, item in prompts:
        # ``misses_ttft`` inlined (the same arithmetic): it runs once per prompt.
        if deadline is not None and now + (ahead + left) * per_token > deadline:
            if uncounted:
                counted += uncounted
                heapq.heapify(counted)
                uncounted.clear()
            longest = -counted[0][0] if counted else 0
            if longest <= left or misses_ttft(now, deadline, (ahead - longest + left) * per_token):
                late.append(item)
                continue
            late.append(heapq.heappop(counted)[2])  # the longest before it gives way
            ahead -= longest
        ahead += left
        if deadline is not None:
            uncounted.append((-left, tiebreak, item))
            # ``ahead`` may still count a prompt that gives way later: a lower bound, as it must be.
            slack_until = deadline - ahead * per_token  # a plain compare: min() cost 2 s a run here
            if slack_until < safe_until:
                safe_until = slack_until
    return late, safe_until, ahead


def tpot_step_bound(tpot_s: float, generated: int, since_first_s: float, horizon: int) -> float | None:
    """The longest step that keeps a sequence on course for its mean-TPOT target: one that has
    ``generated`` tokens out, the first ``since_first_s`` seconds before the next step starts,
    and pays back any time it is behind over its next ``horizon`` tokens. Never above
    ``tpot_s`` (time it is ahead is not spent); None when it has no tokens to go."""
    if horizon <= 0 or generated < 1:
        return None
    behind_s = since_first_s - tpot_s * (generated - 1)
    return tpot_s - max(0.0, behind_s) / horizon


def repay_bound(
    tpot_s: float, generated: int, since_first_s: float, left: int, decode_only_s: float
) -> float | None:
    """The step bound below ``tpot_s`` that pays back the time a sequence fell behind its TPOT
    target (``tpot_step_bound`` over ``TPOT_REPAY_TOKENS`` tokens, fewer when it has only
    ``left`` to go), or None: it is not behind, or it cannot get back on course even with
    decode-only steps (``decode_only_s``), and holding every step down for it would cost the
    others their TTFT; it is held to its target then, no tighter.

    SLO-sized steps take up to the whole TPOT target, so a sequence has no slack when a re-cut
    pauses it; without paying back, every pause tipped those decoding through it over their
    target by a hair (14B in the simulator: 12.0-12.9 ms against 12 ms)."""
    bound = tpot_step_bound(tpot_s, generated, since_first_s, min(TPOT_REPAY_TOKENS, left))
    if bound is None or bound >= tpot_s or bound < decode_only_s:
        return None
    return bound


def largest_chunk(step_s: Callable[[int], float | None], bound: float, most: int, least: int) -> int:
    """The most prompt tokens (up to ``most``) a step can prefill with its predicted time
    ``step_s(tokens)`` within ``bound``, found by bisection (the step time grows with its prompt
    tokens; an unknown time does not fit); never below ``least`` (nor ``most``), so prompts always
    progress, even beside a batch whose decode steps alone take the whole bound."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        t = step_s(mid)
        if t is not None and t <= bound:
            lo = mid
        else:
            hi = mid - 1
    return max(lo, min(least, most))


def ttft_settled_late(first_token: float | None, deadline: float | None) -> bool:
    """Whether a prompt re-prefilling after its first token (a preemption, a slow re-cut) got that
    token after its TTFT deadline: it can no longer count, so it ranks with the late prompts."""
    return first_token is not None and deadline is not None and first_token > deadline


def strictest_reachable(targets: Iterable[float], floor_s: float) -> float | None:
    """The strictest of the TPOT ``targets`` at or above ``floor_s`` (the smallest decode step:
    one sequence, no context), None if none. A target below it cannot be met at any batch size;
    bounding steps and seats by it would idle the instance, so such requests run best-effort and
    the steps are sized for the others (``capacity.reachable_tpot``, from the perf model)."""
    reachable = [t for t in targets if t >= floor_s]
    return min(reachable) if reachable else None


def seat_fits(
    step_s: StepTimePredictor,
    seats: int,
    ctx_tokens: int,
    target: float,
    min_chunk: int = 0,
    chunk_beside_one_s: float | None = None,
) -> bool:
    """Whether a batch of ``seats`` sequences (the newcomer included) holding ``ctx_tokens`` of KV
    keeps a step over all of them within the TPOT ``target`` (an unknown step time fits).

    A seat cap sized from a pool-wide mean context is wrong for per-tier instances and swings with
    every window's length mix (it cost 18 % of goodput on 8B at 400 req/s in the simulator), so
    the check is against the instance's own batch. A step that prefills never cuts a prompt's
    chunk below ``min_chunk`` tokens (prompts always progress; pass 0 where steps do not prefill
    beside decodes), so seats that fill a decode-only step to the target would leave every step
    that prefills over it, and the next prompt no room: the step checked carries that chunk too,
    unless the newcomer would be the only sequence, or that chunk beside one sequence
    (``chunk_beside_one_s``) is already over the target -- seats were never going to keep it
    there, and reserving room would leave the instance one sequence at a time.
    """
    reserve = 0
    if min_chunk and seats > 1 and chunk_beside_one_s is not None and chunk_beside_one_s <= target:
        reserve = min_chunk
    t = step_s(reserve, seats, ctx_tokens)
    return t is None or t <= target
