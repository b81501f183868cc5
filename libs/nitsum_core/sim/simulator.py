"""Discrete-event simulator (DESIGN §7): the same configurator and routing rules, against the
performance model instead of workers, at pool sizes no test machine has.

Per instance, a step decodes one token for every running sequence and prefills up to
``chunk_tokens`` prompt tokens from its queues (chunked prefill); its duration is the
performance model's step time. Decoding sequences are not touched per step: each records the
step it will finish at, so a step costs O(1) plus the sequences that start or end in it.
Reconfigurations pause the pool for the modelled switching cost; prefill->decode hand-offs cost
KV bytes over the link plus a setup time.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.capacity import reachable_tpot, smallest_decode_step
from nitsum_core.policy.control_loop import Arrival, ControlLoop, Forecast, InFlight
from nitsum_core.policy.cuts import boot_plan
from nitsum_core.policy.goodput import RequestRecord, mean_tpot, meets_slo, meets_targets
from nitsum_core.policy.plan import SHARED, Assignment, Plan, Role, only_tiers_change, serves
from nitsum_core.policy.routing import Candidate, Lane, LanePolicy, route_targets
from nitsum_core.policy.scheduler import TPOT_REPAY_TOKENS, misses_ttft, tpot_step_bound
from nitsum_core.workload import TraceRequest

QueueOrder = Literal["fcfs", "priority", "slo"]


@dataclass(frozen=True)
class Preset:
    """A serving policy: how the pool is cut (static plan or dynamic) and how requests queue."""

    name: str
    queue_order: QueueOrder = (
        "fcfs"  # fcfs: tier-blind; priority: by tier; slo: feasible/best-effort/background
    )
    dynamic: bool = False
    switch: Literal["fast", "slow"] = "fast"
    window_s: float = 1.0
    # Instance roles a dynamic preset may cut: the presets of Nitsum use what the serving path
    # runs (mixed instances; prefill->decode hand-off between workers is not built yet).
    roles: tuple[Role, ...] = ("mixed", "prefill", "decode")
    # How the dynamic presets score candidate plans: "replay" runs each through this simulator on
    # the recent requests (``PlanReplay``); "roofline" uses the calibrated capacity model.
    score: Literal["replay", "roofline"] = "replay"


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
    queue: list[tuple[int, float, int, SimRequest]] = field(default_factory=list)  # heap (_prefill_order)
    # Queued requests in Lane.LATE, by arrival: admitted once ``queue`` is empty. Kept apart so
    # that each step's late check (``_mark_late``) looks at the on-time requests only; in overload
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
    # a heap of (last step it holds for, bound in seconds). See ``Simulator._owe_tpot``.
    tpot_debts: list[tuple[int, float]] = field(default_factory=list)
    # What the last full ``Simulator._mark_late`` check proved, kept up to date as prompts join:
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


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    switches: int
    timeline: list[tuple[float, str, float]]  # (time, plan description, arrivals in the window)
    rejected: int


def _leave(inst: SimInstance, tier: str) -> None:
    """One of ``inst``'s guests of ``tier`` finished there."""
    inst.guests[tier] -= 1
    if not inst.guests[tier]:
        del inst.guests[tier]


_LATE = int(Lane.LATE)  # a plain int: the late check compares it once per prompt
# Seconds of slack ``Simulator._mark_late`` keeps before skipping its check, against rounding:
# the skip must never change an outcome (tests compare runs with the skip off).
_SAFE_MARGIN_S = 1e-9


def _enqueue(inst: SimInstance, r: SimRequest) -> None:
    if r.lane == _LATE:
        heapq.heappush(inst.late_queue, (r.arrival, r.rid, r))
        return
    heapq.heappush(inst.queue, (*_prefill_order(r), r))
    # An on-time prompt joining can only add its own tokens to what each other one waits for,
    # and waits for at most all of theirs and its own: the skip bound stays a lower bound.
    left = r.prompt - r.prefilled
    if r.first_token is not None and r.first_token > r.due:
        inst.late_safe_until = -math.inf  # settled late already: the next check must move it
        return
    inst.late_safe_until -= left * inst.late_s_per_token
    if r.first_token is None:
        own = r.due - (inst.late_tokens + left) * inst.late_s_per_token
        inst.late_safe_until = min(inst.late_safe_until, own)
    inst.late_tokens += left


def _prefill_order(r: SimRequest) -> tuple[int, float, int]:
    # Late requests keep arrival order among themselves, as in the engine's scheduler.
    return r.lane, r.arrival if r.lane == _LATE else r.due, r.rid


class Simulator:
    def __init__(
        self,
        perf: PerfModel,
        pool: int,
        tiers: dict[str, Tier],
        preset: Preset,
        plan: Plan | None = None,
        chunk_tokens: int = 2048,
        max_batch: int = 256,
        handoff_setup_s: float = 1e-3,
        fast_switch_s: float = 0.05,
        min_chunk: int = 128,
        foresight_s: float = 0.0,
    ) -> None:
        """``foresight_s`` > 0 makes a dynamic preset's control loop clairvoyant, for bounds only:
        its replays score the next ``foresight_s`` seconds of the workload's real arrivals instead of
        replaying the recent ones (``benchmarks/dynamic_headroom.py --foresight``)."""
        self.perf, self.pool, self.tiers, self.preset = perf, pool, tiers, preset
        self.foresight_s = foresight_s
        self.chunk_tokens, self.max_batch = chunk_tokens, max_batch
        self.handoff_setup_s, self.fast_switch_s = handoff_setup_s, fast_switch_s
        if plan is None and not preset.dynamic:
            raise ValueError("a static preset needs a plan")
        self._initial_plan = plan
        self.events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self.instances: list[SimInstance] = []
        self.now = 0.0
        self.rejected = 0
        self.switches = 0
        self.late_checks_skipped = 0  # full ``_mark_late`` checks proved unneeded (a speed statistic)
        self.timeline: list[tuple[float, str, float]] = []
        self._chunk_cache: dict[tuple[int, int, int, float], int] = {}
        self._reachable: dict[tuple[int | str, ...], float | None] = {}  # see _tpot_target
        # The router's lane policy and the controller's window loop: the same objects the services
        # run (routing.LanePolicy, control_loop.ControlLoop), driven by simulated time.
        self.lanes = LanePolicy(tiers, preset.window_s)
        self.control: ControlLoop | None = None  # built with the initial plan in run()
        self.min_chunk = min_chunk
        # Seconds of a step that prefills ``min_chunk`` tokens beside one empty sequence, by TP
        # degree: the least a mixed step with a decode can take (see ``_seat_free``).
        self._min_mixed_step: dict[int, float] = {}

    # ---- plumbing -------------------------------------------------------------------------------
    def _push(self, t: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, payload))

    def _build(self, plan: Plan) -> None:
        self.instances = [SimInstance(a, self.perf.kv_capacity_tokens(a.tp)) for a in plan.assignments]
        self.plan = plan

    def _serving(self, tier: str, roles: tuple[str, ...]) -> list[SimInstance]:
        return [i for i in self.instances if i.a.role in roles and serves(i.a.tier, tier)]

    # ---- routing ---------------------------------------------------------------------------------
    def _route(self, r: SimRequest) -> None:
        cands, fallback = route_targets(
            self.instances, lambda i: i.a.role in ("mixed", "prefill"), lambda i: serves(i.a.tier, r.tier)
        )
        if not cands:
            self._reject(r, "no instance serves this tier")
            return
        tier = self.tiers[r.tier]
        r.due = r.arrival
        if self.preset.queue_order == "slo":
            # Earliest TTFT deadline first within a lane: a prompt with 1 s to spare waits for one
            # with 0.3 s (8B at 400 req/s: 269.6 -> 279.5 req/s, docs/simulator.md round 12).
            r.due = r.arrival + tier.ttft_s
            # A request that can no longer meet its TTFT target must not hold up those that can.
            lane = Lane.BEST_EFFORT if r.late else self.lanes.classify(r.tier)
            if fallback and lane == Lane.FEASIBLE:
                lane = Lane.BEST_EFFORT
            r.lane = int(lane)
            by_start = {i.a.start: i for i in cands}
            slot = self.lanes.pick([Candidate(i.a.start, i.load) for i in cands], lane)
            inst = by_start[slot]  # type: ignore[index]
        else:
            r.lane = tier.priority if self.preset.queue_order == "priority" else 0
            inst = min(cands, key=lambda i: i.load)
        if r.prompt + r.output > inst.kv_cap:
            self._reject(r, "prompt + output exceed the instance's KV capacity")
            return
        _enqueue(inst, r)
        self._kick(inst)

    def _reject(self, r: SimRequest, why: str) -> None:
        r.error = why
        self.rejected += 1

    # ---- instance steps --------------------------------------------------------------------------
    def _kick(self, inst: SimInstance) -> None:
        if inst.handoffs:  # the KV transfers run beside the steps: admit even while one runs
            self._admit_handoffs(inst)
        if inst.busy or not (inst.queue or inst.late_queue or inst.prefilling or inst.running):
            return
        start = max(self.now, inst.paused_until)
        slo = self.preset.queue_order == "slo"
        target = self._tpot_target(inst) if slo else None  # None under SLO order: no reachable TPOT
        decode = inst.running if inst.a.role != "prefill" else 0
        if slo and (inst.queue or inst.prefilling):  # most steps at light load: decodes only
            self._mark_late(inst, decode, target)
        # Admit queued requests into prefill while seats and KV allow (their whole KV is reserved);
        # late ones only when no on-time one waits, and an on-time one held back takes the seat
        # of a late one that has not started (``_unseat_late``).
        while inst.queue or inst.late_queue:
            queue: list = inst.queue or inst.late_queue
            r = queue[0][-1]
            if not self._seat_free(inst, r, target):
                if slo and queue is inst.queue and self._unseat_late(inst):
                    continue
                break
            need = r.prompt + r.output
            heapq.heappop(queue)
            inst.kv_used += need
            inst.prefilling_prompts += r.prompt
            if slo:
                bisect.insort(inst.prefilling, r, key=_prefill_order)
            else:
                inst.prefilling.append(r)
        # SLO-safe steps (DESIGN §1): with sequences decoding, the prefill chunk is cut so the
        # step stays within the strictest TPOT target it serves (always some progress).
        budget = self._chunk_within(inst, decode, target) if target and decode else self.chunk_tokens
        chunk_cap = budget
        chunk: list[tuple[SimRequest, int]] = []
        for r in inst.prefilling:
            if budget <= 0:
                break
            n = min(budget, r.prompt - r.prefilled)
            chunk.append((r, n))
            budget -= n
        prefill_tokens = chunk_cap - budget
        if not prefill_tokens and not decode:
            return
        dt = self.perf.step_time(inst.a.tp, prefill_tokens, decode, inst.ctx_tokens)
        inst.busy = True
        self._push(start + dt, "step", (inst, chunk))

    def _seat_free(self, inst: SimInstance, r: SimRequest, target: float | None) -> bool:
        """Whether ``r`` can take a seat now: under ``max_batch``, within the KV, and (SLO order)
        with a step over the batch, ``r`` included, still within the TPOT ``target``. On a mixed
        instance that step also prefills the smallest chunk a step carries (``min_chunk``), unless
        ``r`` would be its only sequence or that chunk beside one sequence is already over."""
        seats = inst.running + len(inst.prefilling) + len(inst.in_transit) + 1
        if seats > self.max_batch or inst.kv_used + r.prompt + r.output > inst.kv_cap:
            return False
        if not target:
            return True
        # SLO-safe seats (DESIGN §1), checked against this instance's own batch: a seat cap sized
        # from a pool-wide mean context is wrong for per-tier instances and swings with every
        # window's length mix (it cost 18 % of goodput on 8B at 400 req/s: docs/simulator.md,
        # round 10). A mixed instance's steps never cut a prompt's chunk below ``min_chunk``
        # (prompts always progress), so seats that fill a decode-only step to the target leave
        # every step that prefills over it, and the next prompt no room (round 21).
        # Where that chunk beside a single sequence is already over the target, seats were never
        # going to keep it; reserving room there would leave the instance one sequence at a time.
        tp = inst.a.tp
        reserve = 0
        if inst.a.role == "mixed" and seats > 1:
            least = self._min_mixed_step.get(tp)
            if least is None:
                least = self._min_mixed_step[tp] = self.perf.step_time(tp, self.min_chunk, 1, 0)
            reserve = self.min_chunk if least <= target else 0
        return self.perf.step_time(tp, reserve, seats, inst.seated_ctx + r.prompt) <= target

    def _unseat_late(self, inst: SimInstance) -> bool:
        """Give back the seat and KV of a late prompt that has not started prefilling, for an
        on-time one the seat check or the KV holds back; False if there is none.

        A seated prompt waits for its first chunk behind every on-time one (prefill order), so
        a late one can hold its seat for long. The engine's scheduler seats a prompt only with
        its first chunk, and never kept a seat idle like this (docs/simulator.md round 13).
        """
        for i in range(len(inst.prefilling) - 1, -1, -1):  # prefill order: the late ones last
            r = inst.prefilling[i]
            if r.lane != _LATE:
                return False
            if r.prefilled == 0:
                if inst.guests and r.tier in inst.guests:
                    _leave(inst, r.tier)
                del inst.prefilling[i]
                inst.prefilling_prompts -= r.prompt
                inst.kv_used -= r.prompt + r.output
                heapq.heappush(inst.late_queue, (r.arrival, r.rid, r))
                return True
        return False

    def _mark_late(self, inst: SimInstance, decode: int, target: float | None) -> None:
        """Move the prompts that would miss their TTFT target to ``Lane.LATE``, as the engine's
        ``Scheduler`` does each step (``scheduler.misses_ttft``; docs/simulator.md rounds 11-12).

        The on-time prompts, prefilling and queued, are taken in prefill order (lane, then TTFT
        deadline). Each one's first token waits for its own remaining prefill and that of the
        on-time prompts before it, at this instance's prefill rate as its steps are now (a full
        chunk next to its decodes). When one would miss, the longest prompt before it gives way
        if that one has more prefill left and it then fits (Moore-Hodgson: the most prompts on
        time), else it goes late itself. Late prompts are still served, after every on-time one;
        nothing is dropped.
        """
        chunk = self._chunk_within(inst, decode, target) if decode and target else self.chunk_tokens
        per_token = self.perf.step_time(inst.a.tp, chunk, decode, inst.ctx_tokens) / chunk
        now = self.now
        # Since the last full check, prompts only lost tokens (prefilled, gone late or left) and
        # those that joined are in the bound (``_enqueue``); a slower prefill rate can cost each
        # one at most its tokens times the difference. Still safe: nothing would move, so skip
        # (this check was half of an 8B simulation's time at 400 req/s; the skip saves ~14 %).
        slower = max(0.0, per_token - inst.late_s_per_token)
        if now < inst.late_safe_until - inst.late_tokens * slower - _SAFE_MARGIN_S:
            self.late_checks_skipped += 1
            return
        # Prefilling and queued on-time prompts as queue entries (lane, deadline, rid, request):
        # sorted as tuples, a large part of this check's cost at 400 req/s.
        on_time = [(r.lane, r.due, r.rid, r) for r in inst.prefilling if r.lane != _LATE]
        on_time += inst.queue
        on_time.sort()
        safe_until = math.inf
        ahead = 0  # prompt tokens of the on-time prompts before this one
        # Those that could give way, as a heap (longest first; ``rid`` breaks ties, so the one
        # popped does not depend on the heap's layout). The heap is needed only from the first
        # miss on: the prompts before it wait in ``uncounted`` and are heaped then, in one
        # heapify, where a push per prompt was a quarter of this check's cost.
        counted: list[tuple[int, int, SimRequest]] = []
        uncounted: list[tuple[int, int, SimRequest]] = []
        moved = False
        for _, deadline, rid, r in on_time:  # ``due`` is the TTFT deadline in SLO order
            left = r.prompt - r.prefilled
            first = r.first_token
            if first is not None:  # re-prefilling after a slow switch: its TTFT is settled
                if first > deadline:
                    r.lane, moved = _LATE, True
                    continue
            # ``scheduler.misses_ttft`` inlined (the same arithmetic): it runs once per prompt.
            elif now + (ahead + left) * per_token > deadline:
                moved = True
                if uncounted:
                    counted += uncounted
                    heapq.heapify(counted)
                    uncounted.clear()
                longest = -counted[0][0] if counted else 0
                if longest <= left or misses_ttft(now, deadline, (ahead - longest + left) * per_token):
                    r.lane = _LATE
                    continue
                heapq.heappop(counted)[2].lane = _LATE  # the longest before it gives way
                ahead -= longest
            ahead += left
            if first is None:
                uncounted.append((-left, rid, r))
                # ``ahead`` may still count a prompt that gives way later: a lower bound, as it must be.
                slack_until = deadline - ahead * per_token  # a plain compare: min() cost 2 s a run here
                if slack_until < safe_until:
                    safe_until = slack_until
        inst.late_safe_until, inst.late_s_per_token, inst.late_tokens = safe_until, per_token, ahead
        if moved:
            inst.prefilling.sort(key=_prefill_order)
            queued, inst.queue = inst.queue, []
            for entry in queued:
                if entry[3].lane == _LATE:
                    heapq.heappush(inst.late_queue, (entry[3].arrival, entry[3].rid, entry[3]))
                else:
                    inst.queue.append(entry)
            heapq.heapify(inst.queue)

    def _tpot_target(self, inst: SimInstance) -> float | None:
        """The TPOT target ``inst``'s steps are sized for: the strictest it can reach among the
        tiers it serves and its guests' (None: it can reach none, so its steps are not bounded),
        lowered while a request resumed there pays back a re-cut's pause."""
        key = inst.a.tp, inst.a.tier, *sorted(inst.guests)
        if key not in self._reachable:
            names = [t for t in self.tiers if serves(inst.a.tier, t) or t in inst.guests]
            self._reachable[key] = reachable_tpot(self.perf, inst.a.tp, (self.tiers[t].tpot_s for t in names))
        tpot = self._reachable[key]
        if tpot is None:
            return None
        debts = inst.tpot_debts
        while debts and debts[0][0] < inst.steps:
            heapq.heappop(debts)
        return min(tpot, *(bound for _, bound in debts)) if debts else tpot

    def _owe_tpot(self, inst: SimInstance, r: SimRequest, generated: int, left: int, resume: float) -> None:
        """Bound ``inst``'s next steps so that ``r``, resuming there at ``resume`` with ``generated``
        tokens out and ``left`` to go, pays back the time it fell behind its TPOT target.

        SLO-sized steps take up to the whole TPOT target, so a request has no slack when a re-cut
        pauses it; without this, every pause tipped the requests decoding through it over their
        target by a hair (14B: 12.0-12.9 ms against 12 ms; docs/simulator.md round 15). The debt
        is spread over ``scheduler.TPOT_REPAY_TOKENS`` tokens (fewer if it finishes sooner); a
        request that cannot pay it back even with decode-only steps is not waited for.
        """
        if self.preset.queue_order != "slo" or r.first_token is None or generated < 1:
            return
        horizon = min(TPOT_REPAY_TOKENS, left)
        bound = tpot_step_bound(self.tiers[r.tier].tpot_s, generated, resume - r.first_token, horizon)
        if bound is None or bound >= self.tiers[r.tier].tpot_s:
            return
        if bound < self.perf.step_time(inst.a.tp, 0, inst.running, inst.ctx_tokens):
            return  # a lost cause: holding every step down for it would cost the others
        heapq.heappush(inst.tpot_debts, (inst.steps + horizon, bound))

    def _chunk_within(self, inst: SimInstance, decode: int, tpot: float) -> int:
        # Memoised on the context rounded *up* to 256 tokens (a slightly conservative chunk):
        # this binary search runs every step and was most of the simulator's time.
        ctx = -(-inst.ctx_tokens // 256) * 256
        key = (inst.a.tp, decode, ctx, tpot)
        chunk = self._chunk_cache.get(key)
        if chunk is None:
            lo, hi = 0, self.chunk_tokens
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.perf.step_time(inst.a.tp, mid, decode, ctx) <= tpot:
                    lo = mid
                else:
                    hi = mid - 1
            chunk = self._chunk_cache[key] = max(lo, self.min_chunk)
        return chunk

    def _step_done(self, inst: SimInstance, chunk: list[tuple[SimRequest, int]]) -> None:
        if inst.retired:  # a step of an instance replaced by a reconfiguration
            return
        inst.busy = False
        inst.steps += 1
        inst.ctx_tokens += inst.running
        while inst.finishing and inst.finishing[0][0] <= inst.steps:
            _, _, r = heapq.heappop(inst.finishing)
            self._finish(inst, r)
        for r, n in chunk:
            r.prefilled += n
            if r.prefilled < r.prompt:
                continue
            inst.prefilling.remove(r)
            inst.prefilling_prompts -= r.prompt
            if r.first_token is None:
                r.first_token = self.now
                self.lanes.first_token(r.lane, self.now - r.arrival <= self.tiers[r.tier].ttft_s)
            if r.output <= 1 or inst.a.role == "prefill":
                if r.output <= 1:  # a hand-off's KV stays here until a decode instance pulls it
                    inst.kv_used -= r.prompt + r.output
                if inst.guests and r.tier in inst.guests:
                    _leave(inst, r.tier)
            if r.output <= 1:
                r.finish = self.now
                self._done(r)
            elif inst.a.role == "prefill":
                r.kv_home = inst
                self._handoff(r, kick_home=False)  # this step's end kicks it
            else:
                self._start_decode(inst, r)
        self._kick(inst)

    def _start_decode(self, inst: SimInstance, r: SimRequest) -> None:
        inst.running += 1
        inst.ctx_tokens += r.prompt
        r.done_step = inst.steps + r.output - 1
        heapq.heappush(inst.finishing, (r.done_step, r.rid, r))

    def _finish(self, inst: SimInstance, r: SimRequest) -> None:
        if inst.guests and r.tier in inst.guests:
            _leave(inst, r.tier)
        inst.running -= 1
        inst.ctx_tokens -= r.prompt + r.output - 1
        inst.kv_used -= r.prompt + r.output
        r.finish = self.now
        self._done(r)

    def _done(self, r: SimRequest) -> None:
        good = False
        if r.first_token is not None and r.finish is not None:
            tier = self.tiers[r.tier]
            tpot = mean_tpot(r.first_token, r.finish, r.output)
            good = meets_targets(r.first_token - r.arrival, tpot, tier)
        assert self.control is not None
        self.control.finished(r.tier, good)

    def _handoff(self, r: SimRequest, kick_home: bool = True) -> None:
        """Queue prefilled ``r`` for a decode seat on the least-loaded decode instance of its tier
        (mixed ones if its tier has none) whose KV can hold it; if there is none, reject it and
        free its KV on the prefill side (kicking that instance unless ``kick_home`` is False)."""
        need = r.prompt + r.output
        targets = self._serving(r.tier, ("decode",)) or self._serving(r.tier, ("mixed",))
        fits = [i for i in targets if need <= i.kv_cap]
        if not fits:
            self._release_home(r, kick_home)
            why = (
                "no decode instance for the hand-off"
                if not targets
                else "prompt + output exceed the instance's KV capacity"
            )
            self._reject(r, why)
            return
        inst = min(fits, key=lambda i: i.load)
        inst.handoffs.append(r)
        self._kick(inst)

    def _admit_handoffs(self, inst: SimInstance) -> None:
        """Give waiting hand-offs decode seats, in arrival order, while ``max_batch``, the KV and
        (SLO order) the TPOT target allow -- the checks a prompt's seat passes (``_seat_free``);
        each admitted one's KV then crosses the link (bytes / bandwidth + setup).

        A decode instance that took every hand-off at once ran batches past its KV capacity and
        its seat cap, and the static P/D baseline missed its TPOT targets for it."""
        slo = self.preset.queue_order == "slo"
        target = self._tpot_target(inst) if slo else None
        link = self.perf.hw.link_bw
        while inst.handoffs:
            r = inst.handoffs[0]
            if not self._seat_free(inst, r, target):
                break
            inst.handoffs.popleft()
            inst.kv_used += r.prompt + r.output
            inst.in_transit.append(r)
            inst.in_transit_prompts += r.prompt
            dt = self.handoff_setup_s + r.prompt * self.perf.kv_bytes_per_token / link
            self._push(self.now + dt, "arrive_decode", (inst, r))

    def _release_home(self, r: SimRequest, kick: bool = True) -> None:
        """Free the KV ``r`` held on the prefill instance it was prefilled on, which may then
        admit more prompts (``kick``)."""
        home, r.kv_home = r.kv_home, None
        if home is not None:
            home.kv_used -= r.prompt + r.output
            if kick and not home.retired:
                self._kick(home)

    def _arrive_decode(self, inst: SimInstance, r: SimRequest) -> None:
        if inst.retired:  # re-cut while its KV was on the way: it waits for a seat elsewhere
            self._handoff(r)
            return
        inst.in_transit.remove(r)
        inst.in_transit_prompts -= r.prompt
        self._release_home(r)
        self._start_decode(inst, r)
        self._kick(inst)

    # ---- control windows -------------------------------------------------------------------------
    def _window(self, _: object) -> None:
        control = self.control
        assert control is not None
        window = control.arrivals
        if control.replay is not None:
            for request in self.in_flight():
                control.in_flight(request)
        decision = control.window(self._switch_cost)
        self._window_start = self.now
        if self.preset.queue_order == "slo":
            self.lanes.new_window(decision.budgets)
        if decision.switch_to is not None:
            self._reconfigure(decision.switch_to, decision.pause_s)
            control.plan = decision.switch_to
        self.timeline.append((self.now, self.plan.describe(), len(window) / self.preset.window_s))
        if self.events:
            self._push(self.now + self.preset.window_s, "window", None)

    def _switch_cost(self, plan: Plan) -> float:
        if not self._reshaped(plan):
            return 0.0  # only which tiers instances serve changes: nothing pauses (see _reconfigure)
        if self.preset.switch == "fast":
            kv = sum(i.ctx_tokens for i in self.instances) * self.perf.kv_bytes_per_token
            return self.fast_switch_s + kv / self.perf.hw.link_bw / max(1, self.pool)
        # Slow switching: reload each slot's weight shard at ~2 GB/s (re-prefill is added per request).
        smallest = min(a.tp for a in plan.assignments)
        return self.perf.weight_bytes / smallest / 2e9

    def _reshaped(self, plan: Plan) -> bool:
        """Whether ``plan`` changes any instance's slots, degree or role (not just its tiers)."""
        return not only_tiers_change((i.a for i in self.instances), plan.assignments)

    def _reconfigure(self, plan: Plan, pause: float) -> None:
        # Instances whose assignment is unchanged keep running untouched; only the slots that
        # change hands pause, and only the requests on removed instances move.
        wanted = set(plan.assignments)
        kept = {inst.a: inst for inst in self.instances if inst.a in wanted}
        # An instance that keeps its slots, degree and role but serves other tiers is relabelled,
        # as the controller does it: nothing pauses, routers send it the new tiers from now on,
        # and what it already runs stays there (tp_controller.controller, a tier-only switch).
        # Its queued requests of tiers it no longer serves go where they are served.
        reshaped = {(a.start, a.tp, a.role): a for a in plan.assignments if a not in kept}
        relabelled = []
        for inst in self.instances:
            new = reshaped.pop((inst.a.start, inst.a.tp, inst.a.role), None) if inst.a not in kept else None
            if new is not None:
                inst.a = new
                kept[new] = inst
                relabelled.append(inst)
        removed = [inst for inst in self.instances if kept.get(inst.a) is not inst]
        for inst in removed:
            inst.retired = True
        self.switches += 1
        self.instances = [
            kept.get(a) or SimInstance(a, self.perf.kv_capacity_tokens(a.tp)) for a in plan.assignments
        ]
        self.plan = plan
        fresh = [inst for inst in self.instances if inst.a not in kept]
        resume = self.now + pause
        for inst in fresh:
            inst.paused_until = resume
        for inst in removed:
            queued = [q[-1] for q in inst.queue + inst.late_queue]
            moved = queued + list(inst.prefilling) + [f[2] for f in inst.finishing]
            for r in moved:
                if self.preset.switch == "slow" or r.first_token is None or inst.a.role == "prefill":
                    # Re-run from the prompt (the slow path loses KV; unstarted ones just move).
                    generated = 0 if r.first_token is None else max(0, _decoded(r, inst))
                    r.prompt, r.output, r.prefilled = r.prompt + generated, max(1, r.output - generated), 0
                    self._route_requeue(r)
                else:
                    # Fast path: the KV migrates; decoding continues on the new instance.
                    self._resume_decode(r, max(1, r.done_step - inst.steps + 1), resume)
            # Hand-offs still waiting for a seat here wait on another decode instance; their KV
            # (on the prefill side, or moved with it if that was re-cut too) is pulled from there.
            # Those in transit re-queue as they land (``_arrive_decode``).
            for r in inst.handoffs:
                self._handoff(r)
        for inst in relabelled:
            inst.guests = {}
            if inst.a.tier == SHARED:
                continue
            for r in [*inst.prefilling, *(f[2] for f in inst.finishing)]:
                if not serves(inst.a.tier, r.tier):
                    inst.guests[r.tier] = inst.guests.get(r.tier, 0) + 1
            stay = [q for q in inst.queue if serves(inst.a.tier, q[-1].tier)]
            stay_late = [q for q in inst.late_queue if serves(inst.a.tier, q[-1].tier)]
            leave = [q[-1] for q in inst.queue + inst.late_queue if not serves(inst.a.tier, q[-1].tier)]
            if leave:
                heapq.heapify(stay)
                heapq.heapify(stay_late)
                inst.queue, inst.late_queue = stay, stay_late
                for r in leave:
                    self._route_requeue(r)
        for inst in fresh:
            self._push(resume, "kick", inst)
        for inst in kept.values():
            self._kick(inst)

    def _resume_decode(self, r: SimRequest, left: int, resume: float) -> None:
        """Continue decoding ``r`` (its KV moved here) from ``resume``, ``left`` steps from done, on
        the least-loaded instance that decodes its tier; one that can no longer meet its TPOT
        target goes to the least-loaded instance of any tier."""
        targets = self._serving(r.tier, ("decode", "mixed"))
        if not targets or self._tpot_lost(r, r.output - left, left, resume, targets):
            # It still finishes, but cannot count: on its tier's instances it would take the seats
            # of requests that can (a cut giving a tight tier its first high-TP instance moved
            # every one of that tier's decodes from the low-TP ones onto it; round 16).
            targets = [i for i in self.instances if i.a.role != "prefill"] or self.instances
        new = min(targets, key=lambda i: i.load)
        new.kv_used += r.prompt + r.output
        new.running += 1
        new.ctx_tokens += r.prompt + (r.output - left)
        r.done_step = new.steps + left
        heapq.heappush(new.finishing, (r.done_step, r.rid, r))
        self._owe_tpot(new, r, r.output - left, left, resume)

    def _tpot_lost(
        self, r: SimRequest, generated: int, left: int, resume: float, targets: list[SimInstance]
    ) -> bool:
        """Whether ``r``, ``generated`` tokens out and ``left`` to go from ``resume``, misses its
        mean-TPOT target even at the fastest decode step (one sequence) of any of ``targets``."""
        if self.preset.queue_order != "slo" or r.first_token is None or generated < 1:
            return False
        fastest = min(smallest_decode_step(self.perf, i.a.tp) for i in targets)
        tpot = self.tiers[r.tier].tpot_s
        return resume - r.first_token + left * fastest > tpot * (generated + left - 1)

    def decoding_on_pace(self) -> set[int]:
        """Ids of the requests decoding now that got their first token within their tier's TTFT
        target and have kept within its TPOT target so far: what a replay cut off mid-decode
        counts as meeting both (``PlanReplay``)."""
        on_pace = set()
        for inst in self.instances:
            for _, _, r in inst.finishing:
                assert r.first_token is not None
                tier = self.tiers[r.tier]
                intervals = max(1, _decoded(r, inst) - 1)  # tokens after the first
                on_ttft = r.first_token - r.arrival <= tier.ttft_s
                if on_ttft and self.now - r.first_token <= tier.tpot_s * intervals:
                    on_pace.add(r.rid)
        return on_pace

    def in_flight(self) -> list[InFlight]:
        """Every request queued, prefilling or decoding now: what the control loop's replay starts from."""
        out = []
        for inst in self.instances:
            waiting = [q[-1] for q in inst.queue + inst.late_queue] + list(inst.prefilling)
            for r in waiting:
                ttft = None if r.first_token is None else r.first_token - r.arrival
                out.append(InFlight(r.tier, r.prompt, r.output, self.now - r.arrival, ttft))
            for r in [*inst.handoffs, *inst.in_transit]:  # prefilled, one token out, not yet decoding
                assert r.first_token is not None
                out.append(
                    InFlight(r.tier, r.prompt, r.output, self.now - r.arrival, r.first_token - r.arrival, 1)
                )
            for _, _, r in inst.finishing:
                assert r.first_token is not None
                generated = max(1, _decoded(r, inst))
                out.append(
                    InFlight(
                        r.tier, r.prompt, r.output, self.now - r.arrival, r.first_token - r.arrival, generated
                    )
                )
        return out

    def _route_requeue(self, r: SimRequest) -> None:
        cands = self._serving(r.tier, ("mixed", "prefill")) or self.instances
        inst = min(cands, key=lambda i: i.load)
        _enqueue(inst, r)

    def _plan_replay(self) -> PlanReplay:
        """The replay scorer for this run's control loop, stepping instances as this simulator does."""
        return PlanReplay(
            self.perf,
            self.pool,
            self.tiers,
            self.preset.window_s,
            chunk_tokens=self.chunk_tokens,
            max_batch=self.max_batch,
            min_chunk=self.min_chunk,
        )

    def _foresight(self, workload: list[TraceRequest]) -> Forecast:
        """The real arrivals of the next ``foresight_s`` seconds, timed from now: a perfect forecast."""
        upcoming = sorted(workload, key=lambda r: r.arrival_s)
        times = [r.arrival_s for r in upcoming]

        def forecast() -> tuple[list[Arrival], float]:
            lo = bisect.bisect_left(times, self.now)
            hi = bisect.bisect_left(times, self.now + self.foresight_s)
            return [
                Arrival(r.tier, r.prompt_tokens, r.output_tokens, r.arrival_s - self.now)
                for r in upcoming[lo:hi]
            ], self.foresight_s

        return forecast

    # ---- run -----------------------------------------------------------------------------------------
    def run(
        self, workload: list[TraceRequest], in_flight: Sequence[InFlight] = (), until_s: float | None = None
    ) -> SimResult:
        """Simulate ``workload`` to the last request's end (or to ``until_s``: later ones are left
        unfinished), starting from a pool that already holds ``in_flight`` (a replay's warm start:
        queued ones are routed at time 0, decoding ones resume on an instance that decodes their
        tier); records cover both, in_flight first."""
        # Dynamic presets boot on the cut the tier targets alone suggest (``boot_plan``); the
        # control loop re-cuts it from the first window on.
        self._build(self._initial_plan or boot_plan(self.pool, self.perf, self.tiers))
        self.control = ControlLoop(
            self.pool,
            self.perf,
            self.tiers,
            self.plan,
            self.preset.window_s,
            self.preset.dynamic,
            roles=self.preset.roles,
            replay=self._plan_replay() if self.preset.dynamic and self.preset.score == "replay" else None,
            forecast=self._foresight(workload) if self.foresight_s > 0 else None,
            placeholder=self._initial_plan is None,
        )
        resumed = [SimRequest(i, f.tier, -f.age_s, f.prompt, f.output) for i, f in enumerate(in_flight)]
        reqs = resumed + [
            SimRequest(len(resumed) + i, r.tier, r.arrival_s, r.prompt_tokens, r.output_tokens)
            for i, r in enumerate(workload)
        ]
        for r in reqs:
            if r.tier not in self.tiers:
                raise ValueError(f"request {r.rid} has unknown tier {r.tier!r}")
        for r, f in zip(resumed, in_flight, strict=True):
            if f.ttft_s is not None:
                r.first_token = r.arrival + f.ttft_s
            if f.generated > 0:
                r.prefilled = r.prompt
                self._resume_decode(r, max(1, r.output - f.generated), 0.0)
            else:
                r.late = f.ttft_s is not None or f.age_s > self.tiers[f.tier].ttft_s
                self._push(0.0, "arrival", r)
        for inst in self.instances:
            self._kick(inst)
        for r in reqs[len(resumed) :]:
            self._push(r.arrival, "arrival", r)
        self._push(self.preset.window_s, "window", None)
        self._window_start = 0.0  # arrivals are reported to the control loop as offsets into it
        originals = {r.rid: (r.prompt, r.output) for r in reqs}
        while self.events:
            if until_s is not None and self.events[0][0] > until_s:
                break
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrival":
                offset = self.now - self._window_start
                self.control.arrival(payload.tier, payload.prompt, payload.output, offset)
                self._route(payload)
            elif kind == "step":
                self._step_done(*payload)
            elif kind == "arrive_decode":
                self._arrive_decode(*payload)
            elif kind == "kick":
                if not payload.retired:
                    self._kick(payload)
            elif kind == "window":
                self._window(payload)
        records = []
        for r in reqs:
            prompt, output = originals[r.rid]
            if r.error is not None or r.finish is None:
                records.append(
                    RequestRecord(r.tier, r.arrival, prompt, 0, None, None, error=r.error or "unfinished")
                )
                continue
            ttft = r.first_token - r.arrival
            tpot = mean_tpot(r.first_token, r.finish, output)
            records.append(RequestRecord(r.tier, r.arrival, prompt, output, ttft, tpot))
        # Goodput is counted over the arrival span, the same for every preset on the same trace.
        arrived = reqs[len(resumed) :]
        duration = (arrived[-1].arrival - arrived[0].arrival) if len(arrived) > 1 else 1.0
        return SimResult(records, duration, self.switches, self.timeline, self.rejected)


def _decoded(r: SimRequest, inst: SimInstance) -> int:
    """Tokens ``r``, decoding on ``inst``, has generated so far (its decode ends at ``done_step``)."""
    return r.output - (r.done_step - inst.steps)


class PlanReplay:
    """Score a plan by simulating it on recent requests: ``control_loop``'s replay scorer.

    The roofline capacity formulas rank plans badly (they over-predict by 1.1-5x, and by
    different factors for different plans: docs/simulator.md); the simulator models what they
    approximate -- prefill chunks inside TPOT-sized steps, seat caps, the SLO lanes, bursts
    queueing. The requests (tier, lengths, and the arrival times the routers reported) are replayed
    where they arrived, so the recent bursts are kept; requests without a time (a driver that does
    not know them) are re-spaced as a Poisson stream at their observed rate with a fixed seed.
    Within a window every candidate sees the very same arrivals: the comparison is paired. Each
    replay starts from the ``backlog`` (the requests in flight when the window closed: queued ones
    keep their age, in the best-effort lane once past their TTFT target; decoding ones resume on an
    instance that decodes their tier, as a fast switch would move them), runs the plan statically
    with the Nitsum scheduler for the span, and scores the requests that finished within both
    targets per second of it -- what the routers report as a window's goodput.

    A request is scored by its outcome, not by whether it happened to end inside the span. The
    replay runs on for ``drain_s`` past the span (by default the longest TTFT target among the
    tiers replayed) with the span's arrivals repeating, one span later each time, so that the pool
    stays as loaded as the recent past had it. Each tier is then scored on the requests whose TTFT
    deadline has passed by the end (arrivals up to the end less its TTFT target, and at least the
    span's), per second of those arrivals; the backlog counts too. One that finished counts if it
    met both targets; one still decoding counts if its first token came within its TTFT target and
    its tokens have kept within its TPOT target so far (``Simulator.decoding_on_pace``). A plan
    that keeps up thus scores the arrival rate whatever the drain.

    Why each part: without a drain, a cut that pushes a tier's work past the span's end (every
    instance given to the other tiers, that tier queued best-effort behind them) is never charged
    for it, and the loop picked such cuts window after window while the starved tier's backlog
    grew (docs/simulator.md, round 10). A drain shorter than a tier's TTFT target charges a cut
    for serving that tier within its target but after the drain: with 5 s against 70B's 20 s
    background target the loop left the better cuts (round 16). A drain with no arrivals lets a
    cut clear a queue that in fact keeps growing (20 s idle drains cost relaxed 14B 3.5 %). And
    scoring only the span's own requests in overload charges every cut alike for a tight tier:
    its requests queued behind the backlog miss their TTFT while the repeats, on time, are served
    (round 17: no interactive request of the span counted on any cut, 8B at 2x).
    """

    def __init__(
        self,
        perf: PerfModel,
        pool: int,
        tiers: dict[str, Tier],
        window_s: float = 1.0,
        seed: int = 0,
        drain_s: float | None = None,
        **sim_kwargs: int,
    ) -> None:
        self.perf, self.pool, self.tiers, self.window_s, self.seed = perf, pool, tiers, window_s, seed
        self.drain_s = drain_s
        self.sim_kwargs = sim_kwargs
        self.preset = Preset("replay", "slo", window_s=window_s)

    def __call__(
        self, plan: Plan, requests: list[Arrival], span_s: float, backlog: Sequence[InFlight] = ()
    ) -> float:
        if not requests or span_s <= 0:
            return 0.0
        times = [r.at_s for r in requests]
        if any(t is None for t in times):
            rng = random.Random(self.seed)
            rate = len(requests) / span_s
            times = list(itertools.accumulate(rng.expovariate(rate) for _ in requests))
        workload = sorted(
            (
                TraceRequest(t, r.prompt, max(1, r.output), r.tier)
                for t, r in zip(times, requests, strict=True)
            ),
            key=lambda w: w.arrival_s,
        )
        if self.drain_s is not None:
            drain = self.drain_s
        else:
            present = {r.tier for r in requests} | {f.tier for f in backlog}
            # An unknown tier is left to ``Simulator.run``, which names it.
            drain = max((t.ttft_s for name, t in self.tiers.items() if name in present), default=0.0)
        # The span's arrivals again, one span later each time, until the drain ends.
        repeats = [
            replace(w, arrival_s=w.arrival_s + k * span_s)
            for k in range(1, math.ceil(drain / span_s) + 1)
            for w in workload
            if w.arrival_s + k * span_s < span_s + drain
        ]
        sim = Simulator(self.perf, self.pool, self.tiers, self.preset, plan, **self.sim_kwargs)  # type: ignore[arg-type]
        result = sim.run(workload + repeats, backlog, until_s=span_s + drain)
        on_pace = sim.decoding_on_pace()
        # Each tier is scored on the requests whose TTFT deadline has passed when the replay ends,
        # per second of the arrivals they span (at least the span's own).
        end = span_s + drain
        scored_until = {name: max(span_s, end - tier.ttft_s) for name, tier in self.tiers.items()}
        good: dict[str, int] = dict.fromkeys(self.tiers, 0)
        for rid, rec in enumerate(result.records):
            counts = rid in on_pace or meets_slo(rec, self.tiers[rec.tier])
            if counts and rec.arrival_s < scored_until[rec.tier]:
                good[rec.tier] += 1
        return sum(good[name] / scored_until[name] for name in self.tiers)
