"""Plan replays: score a candidate plan by simulating it on the recent requests.

``control_loop``'s replay scorer. A replay builds the ``Simulator`` it replays with; a simulator
running a dynamic preset is handed its scorer by its caller (``PlanReplay.like``), never builds
one itself.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import replace

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.control_loop import Arrival, InFlight
from nitsum_core.policy.goodput import meets_slo
from nitsum_core.policy.plan import Plan
from nitsum_core.sim.simulator import Preset, Simulator
from nitsum_core.workload import TraceRequest


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
    grew. A drain shorter than a tier's TTFT target charges a cut
    for serving that tier within its target but after the drain: with 5 s against 70B's 20 s
    background target the loop left the better cuts. A drain with no arrivals lets a
    cut clear a queue that in fact keeps growing (20 s idle drains cost relaxed 14B 3.5 %). And
    scoring only the span's own requests in overload charges every cut alike for a tight tier:
    its requests queued behind the backlog miss their TTFT while the repeats, on time, are served
    (no interactive request of the span counted on any cut, 8B at 2x).
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

    @classmethod
    def like(cls, sim: Simulator) -> PlanReplay:
        """The replay scorer for ``sim``'s control loop: the same pool, tiers and window, stepping
        instances as ``sim`` does (its chunk, seat and smallest-chunk sizes). Pass it as
        ``Simulator(..., replay=PlanReplay.like)``."""
        return cls(
            sim.perf,
            sim.pool,
            sim.tiers,
            sim.preset.window_s,
            chunk_tokens=sim.chunk_tokens,
            max_batch=sim.max_batch,
            min_chunk=sim.min_chunk,
        )

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
