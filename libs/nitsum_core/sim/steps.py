"""Instance steps of the simulator: admission into seats, the late check, step sizing, and what
a step's end does (first tokens, hand-offs, finishes).

Per instance, a step decodes one token for every running sequence and prefills up to
``chunk_tokens`` prompt tokens from its queues (chunked prefill); its duration is the
performance model's step time. Decoding sequences are not touched per step: each records the
step it will finish at, so a step costs O(1) plus the sequences that start or end in it.

The decisions -- who goes late, how big a chunk, whether a seat fits, what a resumed request is
owed -- are ``policy.batching``'s, the engine scheduler's rules; this module keeps the
simulator's speed-ups around them: the skip bound of the late check (``late_safe_until``), the
memoised chunk sizes and the event-driven decode.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.batching import (
    LATE,
    TPOT_REPAY_TOKENS,
    largest_chunk,
    late_prompts,
    repay_bound,
    seat_fits,
    ttft_settled_late,
)
from nitsum_core.policy.capacity import reachable_tpot
from nitsum_core.policy.control_loop import ControlLoop
from nitsum_core.policy.goodput import mean_tpot, meets_targets
from nitsum_core.policy.plan import serves
from nitsum_core.policy.routing import LanePolicy
from nitsum_core.sim.instance import SimInstance, SimRequest, leave, prefill_order

if TYPE_CHECKING:
    from nitsum_core.sim.simulator import Preset

# Seconds of slack ``InstanceSteps._mark_late`` keeps before skipping its check, against rounding:
# the skip must never change an outcome (tests compare runs with the skip off).
_SAFE_MARGIN_S = 1e-9


class InstanceSteps:
    """The instance-stepping half of ``Simulator`` (a mixin: the simulator holds the state)."""

    perf: PerfModel
    preset: Preset
    tiers: dict[str, Tier]
    now: float
    chunk_tokens: int
    max_batch: int
    min_chunk: int
    handoff_setup_s: float
    lanes: LanePolicy
    control: ControlLoop | None
    late_checks_skipped: int
    _chunk_cache: dict[tuple[int, int, int, float], int]
    _reachable: dict[tuple[int | str, ...], float | None]
    _min_mixed_step: dict[int, float]
    _push: Callable[[float, str, object], None]
    _serving: Callable[[str, tuple[str, ...]], list[SimInstance]]
    _reject: Callable[[SimRequest, str], None]

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
                bisect.insort(inst.prefilling, r, key=prefill_order)
            else:
                inst.prefilling.append(r)
        # SLO-safe steps (docs/architecture.md#request-scheduling): with sequences decoding, the prefill chunk is cut so the
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
        by ``batching.seat_fits`` at the TPOT ``target``, checked against this instance's own
        batch; on a mixed instance the step checked also prefills ``min_chunk`` tokens."""
        seats = inst.running + len(inst.prefilling) + len(inst.in_transit) + 1
        if seats > self.max_batch or inst.kv_used + r.prompt + r.output > inst.kv_cap:
            return False
        if not target:
            return True
        tp = inst.a.tp
        mixed = inst.a.role == "mixed"
        least = None  # a ``min_chunk`` step beside one sequence, memoised per degree
        if mixed and seats > 1:
            least = self._min_mixed_step.get(tp)
            if least is None:
                least = self._min_mixed_step[tp] = self.perf.step_time(tp, self.min_chunk, 1, 0)
        return seat_fits(
            lambda p, d, c: self.perf.step_time(tp, p, d, c),
            seats,
            inst.seated_ctx + r.prompt,
            target,
            self.min_chunk if mixed else 0,
            least,
        )

    def _unseat_late(self, inst: SimInstance) -> bool:
        """Give back the seat and KV of a late prompt that has not started prefilling, for an
        on-time one the seat check or the KV holds back; False if there is none.

        A seated prompt waits for its first chunk behind every on-time one (prefill order), so
        a late one can hold its seat for long. The engine's scheduler seats a prompt only with
        its first chunk, and so never keeps a seat idle like this.
        """
        for i in range(len(inst.prefilling) - 1, -1, -1):  # prefill order: the late ones last
            r = inst.prefilling[i]
            if r.lane != LATE:
                return False
            if r.prefilled == 0:
                if inst.guests and r.tier in inst.guests:
                    leave(inst, r.tier)
                del inst.prefilling[i]
                inst.prefilling_prompts -= r.prompt
                inst.kv_used -= r.prompt + r.output
                heapq.heappush(inst.late_queue, (r.arrival, r.rid, r))
                return True
        return False

    def _mark_late(self, inst: SimInstance, decode: int, target: float | None) -> None:
        """Move the prompts that would miss their TTFT target to ``Lane.LATE``: the engine
        ``Scheduler``'s rule (``batching.late_prompts``), run over the on-time prompts, prefilling
        and queued, in prefill order, at this instance's prefill rate as its steps are now (a full
        chunk next to its decodes). Late prompts are still served, after every on-time one;
        nothing is dropped.
        """
        chunk = self._chunk_within(inst, decode, target) if decode and target else self.chunk_tokens
        per_token = self.perf.step_time(inst.a.tp, chunk, decode, inst.ctx_tokens) / chunk
        now = self.now
        # Since the last full check, prompts only lost tokens (prefilled, gone late or left) and
        # those that joined are in the bound (``instance.enqueue``); a slower prefill rate can cost
        # each one at most its tokens times the difference. Still safe: nothing would move, so skip
        # (this check was half of an 8B simulation's time at 400 req/s; the skip saves ~14 %).
        slower = max(0.0, per_token - inst.late_s_per_token)
        if now < inst.late_safe_until - inst.late_tokens * slower - _SAFE_MARGIN_S:
            self.late_checks_skipped += 1
            return
        # Prefilling and queued on-time prompts as queue entries (``prefill_order``, then the request):
        # sorted as tuples, a large part of this check's cost at 400 req/s.
        on_time = [(*prefill_order(r), r) for r in inst.prefilling if r.lane != LATE]
        on_time += inst.queue
        on_time.sort()
        moved = False
        prompts: list[tuple[float | None, int, int, SimRequest]] = []
        for _, deadline, rid, r in on_time:  # ``due`` is the TTFT deadline in SLO order
            first = r.first_token
            if first is None:
                prompts.append((deadline, r.prompt - r.prefilled, rid, r))
            elif ttft_settled_late(first, deadline):  # re-prefilling after a slow switch
                r.lane, moved = LATE, True
            else:  # settled on time: it has no deadline left, but holds up those after it
                prompts.append((None, r.prompt - r.prefilled, rid, r))
        late, safe_until, ahead = late_prompts(prompts, now, per_token)
        for r in late:
            r.lane = LATE
        inst.late_safe_until, inst.late_s_per_token, inst.late_tokens = safe_until, per_token, ahead
        if moved or late:
            inst.prefilling.sort(key=prefill_order)
            queued, inst.queue = inst.queue, []
            for entry in queued:
                if entry[3].lane == LATE:
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
        tokens out and ``left`` to go, pays back the time it fell behind its TPOT target
        (``batching.repay_bound``: over ``TPOT_REPAY_TOKENS`` tokens, fewer if it finishes
        sooner; a request that cannot pay it back even with decode-only steps is not waited for).
        """
        if self.preset.queue_order != "slo" or r.first_token is None or generated < 1:
            return
        decode_only = self.perf.step_time(inst.a.tp, 0, inst.running, inst.ctx_tokens)
        bound = repay_bound(self.tiers[r.tier].tpot_s, generated, resume - r.first_token, left, decode_only)
        if bound is not None:
            heapq.heappush(inst.tpot_debts, (inst.steps + min(TPOT_REPAY_TOKENS, left), bound))

    def _chunk_within(self, inst: SimInstance, decode: int, tpot: float) -> int:
        """The prompt tokens a step beside ``decode`` decodes fits within ``tpot``
        (``batching.largest_chunk``), at least ``min_chunk``."""
        # Memoised on the context rounded *up* to 256 tokens (a slightly conservative chunk):
        # this binary search runs every step and was most of the simulator's time.
        ctx = -(-inst.ctx_tokens // 256) * 256
        key = (inst.a.tp, decode, ctx, tpot)
        chunk = self._chunk_cache.get(key)
        if chunk is None:
            tp, step_time = inst.a.tp, self.perf.step_time
            chunk = largest_chunk(
                lambda n: step_time(tp, n, decode, ctx), tpot, self.chunk_tokens, self.min_chunk
            )
            self._chunk_cache[key] = chunk
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
                    leave(inst, r.tier)
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
            leave(inst, r.tier)
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
