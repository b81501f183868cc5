"""The simulator's requests and instances: what each instance holds, and its queue helpers.

An instance keeps its on-time queue as a heap in prefill order (``batching.prefill_rank``), its
late prompts apart by arrival, the prompts it prefills in prefill order, and its decoding
sequences as a heap of the steps they finish at: decoding is not touched per step
(``steps.InstanceSteps``).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

from nitsum_core.policy.batching import LATE, prefill_rank, ttft_settled_late
from nitsum_core.policy.plan import Assignment


@dataclass(slots=True)
class SimRequest:
    rid: int
    tier: str
    arrival: float
    prompt: int
    output: int
    prefilled: int = 0
    first_token: float | None = None
    finish: float | None = None
    error: str | None = None
    done_step: int = 0  # the instance step at which decoding ends
    lane: int = 0  # routing.Lane (SLO order: 3 once sure to miss its TTFT); tier priority otherwise
    late: bool = False  # a warm start's queued request already past its TTFT target
    # Its place within its lane: the TTFT deadline in SLO order (earliest deadline first), the
    # arrival time for the baselines (vLLM's order). Set when it is routed.
    due: float = 0.0
    # The prefill instance holding its KV between its first token and its arrival on a decode
    # instance (a P/D hand-off): the decode side pulls the KV once it has a seat for it.
    kv_home: SimInstance | None = None


@dataclass
class SimInstance:
    a: Assignment
    kv_cap: int
    queue: list[tuple[int, float, int, SimRequest]] = field(default_factory=list)  # heap (prefill_order)
    # Queued requests in Lane.LATE, by arrival: admitted once ``queue`` is empty. Kept apart so
    # that each step's late check (``InstanceSteps._mark_late``) looks at the on-time requests only; in overload
    # most of what is queued is late.
    late_queue: list[tuple[float, int, SimRequest]] = field(default_factory=list)
    # Admitted requests still prefilling; each step's prefill chunk goes to them in this order.
    # The SLO scheduler keeps it in lane order (then deadline), so a feasible request admitted after a
    # best-effort one still prefills first (behind it, it missed its TTFT), and one sure to miss
    # its own TTFT goes behind every other (Lane.LATE, as the engine's scheduler). The baselines keep
    # admission order, as vLLM's scheduler continues running prefills; with it the priority
    # baseline does better on the study (8B, 300 req/s: 31.5 vs 26.2 in lane order).
    prefilling: list[SimRequest] = field(default_factory=list)
    prefilling_prompts: int = 0  # their prompt tokens: summing them every step was a tenth of a replay
    finishing: list[tuple[int, int, SimRequest]] = field(default_factory=list)  # heap (done_step, rid)
    running: int = 0
    ctx_tokens: int = 0  # KV tokens of the running sequences (grows by `running` per step)
    kv_used: int = 0
    steps: int = 0
    busy: bool = False
    paused_until: float = 0.0
    retired: bool = False  # replaced by a reconfiguration: its in-flight events are ignored
    # Requests it prefills or decodes of tiers it no longer serves (relabelled while they ran),
    # by tier: its steps keep within their TPOT targets too until they finish.
    guests: dict[str, int] = field(default_factory=dict)
    # Tighter step bounds owed to requests resumed here behind their TPOT (a re-cut's pause):
    # a heap of (last step it holds for, bound in seconds). See ``InstanceSteps._owe_tpot``.
    tpot_debts: list[tuple[int, float]] = field(default_factory=list)
    # What the last full ``InstanceSteps._mark_late`` check proved, kept up to date as prompts join:
    # no on-time prompt can miss its TTFT before ``late_safe_until`` (a clock time) while the
    # prefill rate stays at ``late_s_per_token``, and none waits for more than ``late_tokens``
    # prompt tokens (its own and those ahead of it). Lets a step skip the check when it can.
    late_safe_until: float = -math.inf
    late_s_per_token: float = 0.0
    late_tokens: int = 0
    # P/D hand-offs: prefilled requests waiting for a decode seat here, first come first served
    # (their KV stays on the prefill instance meanwhile), and those given a seat whose KV is on
    # its way (they hold the seat and the KV room from the moment they are admitted).
    handoffs: deque[SimRequest] = field(default_factory=deque)
    in_transit: list[SimRequest] = field(default_factory=list)
    in_transit_prompts: int = 0

    @property
    def seated_ctx(self) -> int:
        """KV tokens the batch will decode over once the prompts prefilling now and the hand-offs
        on their way join it."""
        return self.ctx_tokens + self.prefilling_prompts + self.in_transit_prompts

    @property
    def load(self) -> int:
        waiting = len(self.queue) + len(self.late_queue) + len(self.handoffs)
        return waiting + len(self.prefilling) + len(self.in_transit) + self.running


def leave(inst: SimInstance, tier: str) -> None:
    """One of ``inst``'s guests of ``tier`` finished there."""
    inst.guests[tier] -= 1
    if not inst.guests[tier]:
        del inst.guests[tier]


def enqueue(inst: SimInstance, r: SimRequest) -> None:
    """Queue ``r`` on ``inst``: late ones apart, by arrival; on-time ones in prefill order."""
    if r.lane == LATE:
        heapq.heappush(inst.late_queue, (r.arrival, r.rid, r))
        return
    heapq.heappush(inst.queue, (*prefill_order(r), r))
    # An on-time prompt joining can only add its own tokens to what each other one waits for,
    # and waits for at most all of theirs and its own: the skip bound stays a lower bound.
    left = r.prompt - r.prefilled
    if ttft_settled_late(r.first_token, r.due):
        inst.late_safe_until = -math.inf  # settled late already: the next check must move it
        return
    inst.late_safe_until -= left * inst.late_s_per_token
    if r.first_token is None:
        own = r.due - (inst.late_tokens + left) * inst.late_s_per_token
        inst.late_safe_until = min(inst.late_safe_until, own)
    inst.late_tokens += left


def prefill_order(r: SimRequest) -> tuple[int, float, int]:
    """``r``'s place in prefill order: ``batching.prefill_rank``, the engine scheduler's rule."""
    return prefill_rank(r.lane, r.due, r.arrival, r.rid)


def decoded(r: SimRequest, inst: SimInstance) -> int:
    """Tokens ``r``, decoding on ``inst``, has generated so far (its decode ends at ``done_step``)."""
    return r.output - (r.done_step - inst.steps)
