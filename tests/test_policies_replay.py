"""The control loop's replay scorer (``replay.PlanReplay``): candidate cuts scored by simulating
them on the recent requests, from the backlog in flight, and the loop following it where the
roofline misranks."""

from __future__ import annotations

import itertools
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor

import pytest
from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.policy.control_loop import (
    Arrival,
    ControlLoop,
    InFlight,
    ReplayMap,
)
from nitsum_core.policy.goodput import summarize
from nitsum_core.policy.plan import Plan
from nitsum_core.sim.baselines import Preset
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.sim.simulator import Simulator
from nitsum_core.workload import TraceRequest
from test_policies import shared_plan

# Llama-3.1-70B on 8 H200s with the study's 70B tiers, 30 req/s of a fixed length mix: the
# roofline capacity model ranks shared TP 4 above TP 2 (15.0 vs 11.1 req/s predicted), while the
# simulated plans serve the opposite order (a minute of it: about 30 vs 24 req/s).
TIERS_70B = {
    "interactive": Tier("interactive", 1.0, 0.025, 0),
    "agent": Tier("agent", 3.0, 0.06, 1),
    "background": Tier("background", 20.0, 0.2, 2),
}


MIX_70B = (
    [Arrival("interactive", 1000, 250)] * 5
    + [Arrival("agent", 2000, 30)] * 3
    + [Arrival("background", 1000, 250)] * 2
)


RATE_70B = 30  # requests/s


def test_replay_scores_plans_by_simulating_them_on_the_recent_requests() -> None:
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    replay = PlanReplay(perf, 8, TIERS_70B)
    requests = [MIX_70B[i % 10] for i in range(5 * RATE_70B)]
    tp2, tp4 = replay(shared_plan(2), requests, 5.0), replay(shared_plan(4), requests, 5.0)
    # What each plan serves over a whole minute of the same stream, simulated statically: 5 s of
    # it replayed must rank the plans the same way, and come within 15 % of each.
    rng = random.Random(1)
    times = itertools.accumulate(rng.expovariate(RATE_70B) for _ in range(60 * RATE_70B))
    minute = [TraceRequest(t, *MIX_70B[i % 10][1:3], MIX_70B[i % 10].tier) for i, t in enumerate(times)]
    served = {}
    for tp in (2, 4):
        res = Simulator(perf, 8, TIERS_70B, Preset("static", "slo"), shared_plan(tp)).run(minute)
        served[tp] = summarize(res.records, TIERS_70B, res.duration_s, 8).goodput_rps
    assert served[2] > served[4] and tp2 > tp4 > 0  # the simulated order, against the roofline's
    assert tp2 == pytest.approx(served[2], rel=0.15) and tp4 == pytest.approx(served[4], rel=0.15)
    assert replay(shared_plan(2), requests, 5.0) == tp2  # seeded: the same requests score the same
    assert replay(shared_plan(4), [], 5.0) == 0.0


def test_a_replay_starts_from_the_backlog_and_counts_what_finishes_in_its_span() -> None:
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    replay = PlanReplay(perf, 8, TIERS_70B, drain_s=0.0)  # the span alone: no drain after it
    short = [Arrival("agent", 2000, 30, at_s=0.1 * i) for i in range(5)]  # done within a second
    assert replay(shared_plan(2), short, 2.0) == pytest.approx(5 / 2.0)
    # Decoding requests near their end finish first thing, within targets; a queued one already
    # past its TTFT target cannot count, but it is served (and competes) all the same.
    ending = [InFlight("interactive", 1000, 250, 6.0, ttft_s=0.5, generated=249)] * 20
    late = [InFlight("agent", 2000, 30, 4.0)]
    for plan in (shared_plan(2), shared_plan(4)):
        assert replay(plan, short, 2.0, ending + late) == pytest.approx(25 / 2.0)
    # A backlog far beyond what a plan can serve in the span crowds out the new arrivals: the
    # plan that clears it faster scores higher, where from an empty pool both looked the same.
    queued = [InFlight("agent", 2000, 30, 0.1)] * 100
    cold = replay(shared_plan(2), short, 2.0), replay(shared_plan(8), short, 2.0)
    warm = replay(shared_plan(2), short, 2.0, queued), replay(shared_plan(8), short, 2.0, queued)
    assert cold[0] == cold[1] == pytest.approx(5 / 2.0)
    assert warm[0] > 1.5 * warm[1]


def test_a_replay_scores_each_request_by_its_outcome_not_the_span_end() -> None:
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    replay = PlanReplay(perf, 8, TIERS_70B, drain_s=0.0)  # cut off right at the span's end
    short = [Arrival("agent", 2000, 30, at_s=0.1 * i) for i in range(5)]
    # 400 tokens at TP 2's ~18 ms: still decoding when the span ends, on pace for its 25 ms target.
    long = [Arrival("interactive", 1000, 400, at_s=0.0)]
    late = [InFlight("agent", 2000, 30, 4.0)]  # already past its TTFT target: never counts
    # 10 tokens in 5.5 s: far behind its TPOT target, it cannot count however it ends.
    behind = [InFlight("interactive", 1000, 400, 6.0, ttft_s=0.5, generated=10)]
    assert replay(shared_plan(2), short + long, 2.0, late + behind) == pytest.approx(6 / 2.0)
    # At TP 8 the one decode of a step takes longer than a 5 ms target: the long request runs off
    # pace from its second token, and is charged for it before it has finished.
    tight = {**TIERS_70B, "interactive": Tier("interactive", 1.0, 0.005, 0)}
    assert PlanReplay(perf, 8, tight, drain_s=0.0)(shared_plan(8), short + long, 2.0) == pytest.approx(
        5 / 2.0
    )


def test_a_plan_that_serves_everything_scores_the_arrival_rate_whatever_the_drain() -> None:
    # Each tier is scored over the arrivals whose TTFT deadline has passed by the replay's end,
    # the span's own and its repeats': per second of those, a plan keeping up scores each tier's
    # arrival rate, not more for a longer drain nor less for a shorter one.
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    chats = [Arrival("interactive", 1000, 30, at_s=0.2 * i) for i in range(10)]
    agents = [Arrival("agent", 2000, 30, at_s=0.5 * i) for i in range(4)]
    for drain in (0.0, None, 10.0, 25.0):
        replay = PlanReplay(perf, 8, TIERS_70B, drain_s=drain)
        assert replay(shared_plan(2), chats + agents, 2.0) == pytest.approx(14 / 2.0)


@pytest.mark.parametrize("scorer", ["replay", "roofline"])
def test_the_loop_follows_the_replay_where_the_roofline_misranks(scorer: str) -> None:
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    replay = PlanReplay(perf, 8, TIERS_70B) if scorer == "replay" else None
    loop = ControlLoop(8, perf, TIERS_70B, shared_plan(4), window_s=1.0, roles=("mixed",), replay=replay)
    switched = []
    for _ in range(8):
        for i in range(RATE_70B):
            a = MIX_70B[i % 10]
            loop.arrival(a.tier, a.prompt, a.output)
            loop.finished(a.tier, good=i < 22)  # about what TP 4 serves within target (replay: 21)
        d = loop.window(lambda _: 0.05)
        if d.switch_to is not None:
            switched.append({a.tp for a in d.switch_to.assignments})
            loop.plan = d.switch_to
    if scorer == "replay":
        # Once the replayed span is long enough to tell them apart (over the first few seconds
        # both plans serve every request within targets), TP 2 wins the replay twice running
        # (debounce), the loop re-cuts to it and holds there.
        assert switched == [{2}]
    else:
        assert {2} not in switched  # the roofline never goes to the plan it wrongly ranks low


def test_candidate_replays_in_a_process_pool_decide_as_one_after_another() -> None:
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))

    def run(replay_map: ReplayMap) -> list[tuple[float, Plan | None]]:
        loop = ControlLoop(
            8, perf, TIERS_70B, shared_plan(4), window_s=1.0, roles=("mixed",),
            replay=PlanReplay(perf, 8, TIERS_70B), replay_map=replay_map,
        )  # fmt: skip
        decisions = []
        for _ in range(8):
            for i in range(RATE_70B):
                a = MIX_70B[i % 10]
                loop.arrival(a.tier, a.prompt, a.output)
                loop.finished(a.tier, good=i < 22)
            d = loop.window(lambda _: 0.05)
            decisions.append((d.predicted_current_rps, d.switch_to))
            loop.plan = d.switch_to or loop.plan
        return decisions

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        parallel = run(pool.map)
    serial = run(map)
    assert parallel == serial and any(plan is not None for _, plan in serial)


def test_a_forecast_replaces_the_replayed_windows() -> None:
    # The same stream that makes the replay-scored loop leave TP 4 (above), with a forecast of a
    # light next span: the replays score the forecast, every cut serves all of it, and the loop
    # stays where it is.
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    real = PlanReplay(perf, 8, TIERS_70B)
    future = [Arrival("agent", 2000, 30, at_s=0.1 * i) for i in range(5)]
    seen: list[tuple[list[Arrival], float]] = []

    def replay(plan: Plan, requests: list[Arrival], span: float, backlog: list[InFlight]) -> float:
        seen.append((requests, span))
        return real(plan, requests, span, backlog)

    loop = ControlLoop(
        8, perf, TIERS_70B, shared_plan(4), window_s=1.0, roles=("mixed",), replay=replay,
        forecast=lambda: (future, 2.0),
    )  # fmt: skip
    for _ in range(4):
        for i in range(RATE_70B):
            a = MIX_70B[i % 10]
            loop.arrival(a.tier, a.prompt, a.output)
            loop.finished(a.tier, good=i < 22)
        assert loop.window(lambda _: 0.05).switch_to is None
    assert seen and all(requests == future and span == 2.0 for requests, span in seen)


def test_replay_keeps_the_reported_arrival_times() -> None:
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    replay = PlanReplay(perf, 8, TIERS_70B)
    # Short requests over the first 4 s of a 5 s span: nearly all finish within it, on time.
    spread = [Arrival("agent", 2000, 30, at_s=i * 0.04) for i in range(100)]
    burst = [r._replace(at_s=0.0) for r in spread]  # the same requests, all in the first instant
    assert replay(shared_plan(2), spread, 5.0) >= 0.95 * 100 / 5.0
    assert replay(shared_plan(2), burst, 5.0) < 0.8 * replay(shared_plan(2), spread, 5.0)  # past TTFT
    # The loop moves each arrival's offset into its window onto the replayed span.
    loop = ControlLoop(8, perf, TIERS_70B, shared_plan(2), window_s=1.0, roles=("mixed",), replay=replay)
    loop.arrival("interactive", 1000, 250, offset_s=0.25)
    loop.arrival("agent", 2000, 30, offset_s=7.0)  # a late report: clamped to the window
    assert [a.at_s for a in loop.arrivals] == [0.25, 1.0]


def test_a_plan_falling_behind_is_left_once_its_backlog_is_replayed() -> None:
    # From an empty pool a plan building a backlog replays as if it kept up. The loop's replay
    # starts from the requests the routers report in flight, so the backlog of one big TP 8
    # instance shows, and the loop moves to a cut that clears it.
    perf = PerfModel(model_spec("llama-3.1-70b"), HARDWARE["h200"], Coefficients(overhead_s=2e-3))
    backlog = [InFlight("agent", 2000, 30, 0.5)] * 100

    def run(report_backlog: bool) -> list[set[int]]:
        loop = ControlLoop(
            8,
            perf,
            TIERS_70B,
            shared_plan(8),
            window_s=1.0,
            roles=("mixed",),
            replay=PlanReplay(perf, 8, TIERS_70B),
        )
        switched = []
        for _ in range(4):
            for i in range(2):
                loop.arrival("agent", 2000, 30, offset_s=0.5 * i)
            if report_backlog:
                for f in backlog:
                    loop.in_flight(f)
            # Of the few that arrive, few finish: the pool is behind.
            loop.finished("agent", good=False)
            d = loop.window(lambda _: 0.05)
            if d.switch_to is not None:
                switched.append({a.tp for a in d.switch_to.assignments})
                loop.plan = d.switch_to
        return switched

    assert run(report_backlog=False) == []  # two requests a second: any cut keeps up from empty
    left = run(report_backlog=True)
    assert len(left) == 1 and 8 not in left[0]
