"""Re-cuts in the simulator: what a reconfiguration costs and does to the requests in flight.

Only the slots that change hands pause, for the modelled switching cost (fast: KV migration over
the link; slow: weights reloaded and prompts re-prefilled); an instance that keeps its shape but
serves other tiers is relabelled without pausing. Requests on removed instances move: queued ones
are routed again, decoding ones resume where their tier is decoded (``_resume_decode``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.capacity import smallest_decode_step
from nitsum_core.policy.plan import SHARED, Plan, only_tiers_change, serves
from nitsum_core.sim.instance import SimInstance, SimRequest, decoded, enqueue

if TYPE_CHECKING:
    from nitsum_core.sim.simulator import Preset


class Recuts:
    """The re-cut half of ``Simulator`` (a mixin: the simulator holds the state)."""

    perf: PerfModel
    preset: Preset
    tiers: dict[str, Tier]
    pool: int
    now: float
    plan: Plan
    instances: list[SimInstance]
    switches: int
    fast_switch_s: float
    _push: Callable[[float, str, object], None]
    _serving: Callable[[str, tuple[str, ...]], list[SimInstance]]
    _kick: Callable[[SimInstance], None]
    _handoff: Callable[..., None]
    _owe_tpot: Callable[[SimInstance, SimRequest, int, int, float], None]

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
                    generated = 0 if r.first_token is None else max(0, decoded(r, inst))
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
            # every one of that tier's decodes from the low-TP ones onto it).
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

    def _route_requeue(self, r: SimRequest) -> None:
        cands = self._serving(r.tier, ("mixed", "prefill")) or self.instances
        inst = min(cands, key=lambda i: i.load)
        enqueue(inst, r)
