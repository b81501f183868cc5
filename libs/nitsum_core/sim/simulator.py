"""Discrete-event simulator (docs/architecture.md#controller-policy): the same configurator and routing rules, against the
performance model instead of workers, at pool sizes no test machine has.

This module holds the run: events, routing, control windows and the results. An instance's steps
are ``steps.InstanceSteps`` (the engine scheduler's rules, ``policy.batching``), re-cuts are
``recut.Recuts``, the requests and instances themselves are in ``instance``. A dynamic preset's
control loop scores plans with the replay its caller hands in (``replay.PlanReplay.like``).
Reconfigurations pause the pool for the modelled switching cost; prefill->decode hand-offs cost
KV bytes over the link plus a setup time.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.control_loop import Arrival, ControlLoop, Forecast, InFlight, ReplayScorer
from nitsum_core.policy.cuts import boot_plan
from nitsum_core.policy.goodput import RequestRecord, mean_tpot
from nitsum_core.policy.plan import Plan, Role, serves
from nitsum_core.policy.routing import Candidate, Lane, LanePolicy, fallback_lane, route_targets
from nitsum_core.sim.instance import SimInstance, SimRequest, decoded, enqueue
from nitsum_core.sim.recut import Recuts
from nitsum_core.sim.steps import InstanceSteps
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


@dataclass
class SimResult:
    records: list[RequestRecord]
    duration_s: float
    switches: int
    timeline: list[tuple[float, str, float]]  # (time, plan description, arrivals in the window)
    rejected: int


# What a dynamic preset's control loop scores candidate plans with, built for the simulator that
# runs it (``replay.PlanReplay.like``).
ReplayFactory = Callable[["Simulator"], ReplayScorer]


class Simulator(InstanceSteps, Recuts):
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
        replay: ReplayFactory | None = None,
    ) -> None:
        """``replay`` builds the scorer a dynamic preset's control loop ranks plans with
        (``replay.PlanReplay.like``); a preset that scores by replay needs one. ``foresight_s`` > 0
        makes that loop clairvoyant, for bounds only: its replays score the next ``foresight_s``
        seconds of the workload's real arrivals instead of replaying the recent ones
        (``benchmarks/dynamic_headroom.py --foresight``)."""
        self.perf, self.pool, self.tiers, self.preset = perf, pool, tiers, preset
        self.foresight_s = foresight_s
        self.chunk_tokens, self.max_batch = chunk_tokens, max_batch
        self.handoff_setup_s, self.fast_switch_s = handoff_setup_s, fast_switch_s
        if plan is None and not preset.dynamic:
            raise ValueError("a static preset needs a plan")
        if preset.dynamic and preset.score == "replay" and replay is None:
            raise ValueError("a dynamic preset scored by replay needs a replay (replay=PlanReplay.like)")
        self.replay = replay
        self._initial_plan = plan
        self.events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self.instances: list[SimInstance] = []
        self.now = 0.0
        self.rejected = 0
        self.switches = 0
        self.late_checks_skipped = (
            0  # full ``InstanceSteps._mark_late`` checks proved unneeded (a speed statistic)
        )
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
            # with 0.3 s (``batching.prefill_rank``).
            r.due = r.arrival + tier.ttft_s
            # A request that can no longer meet its TTFT target must not hold up those that can.
            lane = Lane.BEST_EFFORT if r.late else self.lanes.classify(r.tier)
            r.lane = fallback_lane(int(lane), fallback)
            by_start = {i.a.start: i for i in cands}
            slot = self.lanes.pick([Candidate(i.a.start, i.load) for i in cands], lane)
            inst = by_start[slot]  # type: ignore[index]
        else:
            r.lane = tier.priority if self.preset.queue_order == "priority" else 0
            inst = min(cands, key=lambda i: i.load)
        if r.prompt + r.output > inst.kv_cap:
            self._reject(r, "prompt + output exceed the instance's KV capacity")
            return
        enqueue(inst, r)
        self._kick(inst)

    def _reject(self, r: SimRequest, why: str) -> None:
        r.error = why
        self.rejected += 1

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

    def decoding_on_pace(self) -> set[int]:
        """Ids of the requests decoding now that got their first token within their tier's TTFT
        target and have kept within its TPOT target so far: what a replay cut off mid-decode
        counts as meeting both (``PlanReplay``)."""
        on_pace = set()
        for inst in self.instances:
            for _, _, r in inst.finishing:
                assert r.first_token is not None
                tier = self.tiers[r.tier]
                intervals = max(1, decoded(r, inst) - 1)  # tokens after the first
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
                generated = max(1, decoded(r, inst))
                out.append(
                    InFlight(
                        r.tier, r.prompt, r.output, self.now - r.arrival, r.first_token - r.arrival, generated
                    )
                )
        return out

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
            replay=self.replay(self)
            if self.replay and self.preset.dynamic and self.preset.score == "replay"
            else None,
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
