"""The simulator's instance scheduling: SLO lanes, late prompts, TPOT-gated seats, re-cuts and
resumed decodes (the engine scheduler's rules, ``policy.batching``)."""

from __future__ import annotations

import math
import random

from nitsum_core.config import Tier
from nitsum_core.policy.control_loop import InFlight
from nitsum_core.policy.goodput import summarize
from nitsum_core.policy.plan import SHARED, Assignment, Plan, TierSet
from nitsum_core.sim import steps
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.sim.simulator import Preset, Simulator
from nitsum_core.workload import TraceRequest
from sim_cases import ONE_GPU, SLO, STUDY_TIERS, TIERS, on_one_gpu, perf_model, workload


def test_a_tier_the_plan_does_not_serve_is_queued_best_effort_not_rejected() -> None:
    only_interactive = Plan([Assignment(s, 1, "mixed", TierSet.of("interactive")) for s in range(4)])
    res = Simulator(perf_model(), 4, TIERS, Preset("nitsum-static", queue_order="slo"), only_interactive).run(
        workload(200, rate=5.0)
    )
    assert {r.tier for r in res.records} - {"interactive"}  # the workload has other tiers
    assert res.rejected == 0 and all(r.error is None for r in res.records)


def test_a_later_urgent_prompt_prefills_ahead_of_a_long_lower_priority_one() -> None:
    # A background prompt of 16k tokens is admitted first; an interactive one arrives 10 ms later.
    # Prefill chunks go by queue order, not admission order: the interactive request gets its
    # first token within its TTFT target instead of waiting out the whole long prompt.
    wl = [TraceRequest(0.0, 16000, 2, "background"), TraceRequest(0.01, 200, 2, "interactive")]
    background, interactive = on_one_gpu(wl, chunk_tokens=512)
    assert interactive.ttft_s is not None and background.ttft_s is not None
    assert interactive.ttft_s <= TIERS["interactive"].ttft_s
    assert interactive.arrival_s + interactive.ttft_s < background.ttft_s


def test_a_prompt_sure_to_miss_its_ttft_prefills_after_one_that_can_still_meet_its_own() -> None:
    # Two interactive requests (TTFT target 0.5 s): a 30k-token prompt, which needs 0.7 s of
    # prefill even alone, and 10 ms later a short one. The long one can no longer count, so the
    # short one prefills first and meets its target; the long one is still served, after it.
    wl = [TraceRequest(0.0, 30000, 2, "interactive"), TraceRequest(0.01, 200, 2, "interactive")]
    doomed, short = on_one_gpu(wl, chunk_tokens=512)
    assert doomed.ttft_s is not None and doomed.ttft_s > TIERS["interactive"].ttft_s  # served, late
    assert short.ttft_s is not None and short.ttft_s <= TIERS["interactive"].ttft_s
    # Arrival order (the priority baseline, same tier) makes both miss.
    fifo = Preset("priority", queue_order="priority")
    _, behind = on_one_gpu(wl, fifo, chunk_tokens=512)
    assert behind.ttft_s is not None and behind.ttft_s > TIERS["interactive"].ttft_s
    # A 16k-token prompt (0.31 s alone) can still make it: it keeps its place and meets its target.
    wl[0] = TraceRequest(0.0, 16000, 2, "interactive")
    first, second = on_one_gpu(wl, chunk_tokens=512)
    assert first.ttft_s is not None and first.ttft_s <= TIERS["interactive"].ttft_s
    assert second.ttft_s is not None and second.arrival_s + second.ttft_s >= first.ttft_s  # not ahead


def test_a_prompt_that_would_miss_behind_the_prompts_ahead_does_not_take_a_seat() -> None:
    # Two seats, three interactive requests (TTFT target 0.5 s): two 16k-token prompts (0.31 s of
    # prefill each, alone) and 2 ms later a short one. Alone, the second long prompt could make it;
    # behind the first it cannot (0.62 s). Seated anyway, it would hold the second seat while the
    # first decodes its 200 tokens, and the short one would wait for a seat past its own target.
    wl = [
        TraceRequest(0.0, 16000, 200, "interactive"),
        TraceRequest(0.001, 16000, 2, "interactive"),
        TraceRequest(0.002, 200, 2, "interactive"),
    ]
    first, second, short = on_one_gpu(wl, chunk_tokens=512, max_batch=2)
    target = TIERS["interactive"].ttft_s
    assert first.ttft_s is not None and first.ttft_s <= target
    assert short.ttft_s is not None and short.ttft_s <= target
    assert second.ttft_s is not None and second.ttft_s > target  # still served, after the others


def test_prompts_prefill_in_deadline_order_within_a_lane() -> None:
    # Interactive (TTFT target 0.5 s) and agent (2 s) requests share the feasible lane. A 16k-token
    # agent prompt arrives 1 ms before a short interactive one, while a long interactive prompt
    # prefills: the short one is due first and prefills first, and all three meet their targets.
    # In arrival order the short one waits out the agent prompt's 0.31 s and misses.
    wl = [
        TraceRequest(0.0, 16000, 2, "interactive"),
        TraceRequest(0.001, 16000, 2, "agent"),
        TraceRequest(0.002, 200, 2, "interactive"),
    ]
    records = on_one_gpu(wl)
    assert all(r.ttft_s is not None and r.ttft_s <= TIERS[r.tier].ttft_s for r in records)
    agent, short = records[1:]
    assert short.ttft_s is not None and agent.ttft_s is not None
    assert short.arrival_s + short.ttft_s < agent.arrival_s + agent.ttft_s


def test_a_long_prompt_gives_way_to_the_short_ones_it_would_make_miss() -> None:
    # A 16k-token interactive prompt (0.31 s of prefill) and, just behind it, eight 2k-token ones
    # (0.03-0.04 s each), all due 0.5 s after they arrive. Behind the long one only four short
    # ones make it; without it, all eight do. The long one goes late (Moore-Hodgson: the most
    # requests on time) and is still served, after them.
    wl = [TraceRequest(0.0, 16000, 2, "interactive")]
    wl += [TraceRequest(0.001 * (i + 1), 2000, 2, "interactive") for i in range(8)]
    long, *short = on_one_gpu(wl)
    target = TIERS["interactive"].ttft_s
    assert all(r.ttft_s is not None and r.ttft_s <= target for r in short)
    assert long.ttft_s is not None and long.ttft_s > target


def test_each_instance_sizes_its_seats_from_its_own_batch() -> None:
    # A tight-TPOT tier of short prompts on one instance, a tier of 60k-token prompts on another.
    # Seats sized from the pool's mean context (inflated by the long prompts) would give the
    # interactive instance a tenth of the sequences it can decode within 10 ms, and its requests
    # would queue for seconds; sized from its own batch, it serves them all within both targets.
    tiers = {"interactive": Tier("interactive", 0.5, 0.010, 0), "agent": Tier("agent", 5.0, 0.1, 1)}
    per_tier = Plan(
        [Assignment(0, 1, "mixed", TierSet.of("interactive")), Assignment(1, 1, "mixed", TierSet.of("agent"))]
    )
    rng = random.Random(0)
    wl = sorted(
        [TraceRequest(rng.uniform(0, 20), 100, 500, "interactive") for _ in range(600)]
        + [TraceRequest(rng.uniform(0, 20), 60000, 20, "agent") for _ in range(40)],
        key=lambda r: r.arrival_s,
    )
    res = Simulator(perf_model(), 2, tiers, Preset("nitsum-static", queue_order="slo"), per_tier).run(wl)
    interactive = next(
        t for t in summarize(res.records, tiers, res.duration_s, 2).tiers if t.tier == "interactive"
    )
    assert interactive.completed == 600 and interactive.attainment >= 0.99


def test_seats_leave_room_for_the_prefill_chunk_every_step_carries() -> None:
    # One TP 2 instance, a 5.5 ms TPOT target, twice the requests it can decode at once. Steps
    # that prefill never cut a prompt's chunk below the simulator's min_chunk; seats that filled
    # a decode-only step to the target put every such step over it: 116 of 800 requests met
    # their TPOT, 4.5 req/s of goodput. Seated with room for that chunk, every decode keeps it.
    tiers = {"interactive": Tier("interactive", 2.0, 0.0055, 0)}
    rng = random.Random(0)
    wl = sorted(
        (TraceRequest(rng.uniform(0, 20), 1000, 200, "interactive") for _ in range(800)),
        key=lambda r: r.arrival_s,
    )
    plan = Plan([Assignment(0, 2, "mixed", TierSet.of("interactive"))])
    res = Simulator(perf_model(), 2, tiers, SLO, plan).run(wl)
    decoded = [r for r in res.records if r.tpot_s is not None]
    assert len(decoded) == 800
    assert all(r.tpot_s <= 0.0055 for r in decoded)
    assert summarize(res.records, tiers, res.duration_s, 2).goodput_rps > 20


def test_a_tier_only_recut_pauses_nothing_and_keeps_what_runs_where_it_runs() -> None:
    # As the controller does it (tp_controller.controller: a switch that moves no slot only
    # rewrites which tiers instances serve): no pause, no KV moves; queued requests of tiers an
    # instance no longer serves go where they are served, and what it decodes stays, its steps
    # still within those requests' TPOT targets until they finish.
    shared = Plan([Assignment(s, 1, "mixed", SHARED) for s in range(4)])
    sim = Simulator(perf_model(), 4, TIERS, SLO, shared)
    sim.run(workload(2000, rate=200.0), until_s=5.0)
    before = list(sim.instances)
    decoding = [sorted(r.rid for *_, r in inst.finishing) for inst in before]
    assert all(decoding) and any(inst.queue for inst in before)  # mid-overload: work everywhere
    per_tier = Plan(
        [
            Assignment(s, 1, "mixed", TierSet.of(t))
            for s, t in enumerate(["interactive", "interactive", "agent", "background"])
        ]
    )
    assert sim._switch_cost(per_tier) == 0.0
    sim._reconfigure(per_tier, 0.0)
    assert all(new is old for new, old in zip(sim.instances, before, strict=True))
    assert [sorted(r.rid for *_, r in inst.finishing) for inst in sim.instances] == decoding
    assert all(inst.paused_until <= sim.now for inst in sim.instances)
    for inst in sim.instances:
        assert {q[-1].tier for q in inst.queue + inst.late_queue} <= inst.a.tier.names
    background = sim.instances[3]
    assert "interactive" in {r.tier for *_, r in background.finishing}
    assert sim._tpot_target(background) == TIERS["interactive"].tpot_s
    # A re-cut that moves slots still pauses for the switch.
    assert sim._switch_cost(Plan([Assignment(0, 2, "mixed", SHARED), Assignment(2, 2, "mixed", SHARED)])) > 0


def test_an_on_time_prompt_takes_the_seat_of_a_late_one_that_has_not_started() -> None:
    # One seat-limited instance (two seats). A 6k-token interactive prompt and a 40k-token one
    # that cannot make its 0.5 s TTFT target (about 0.7 s of prefill) both take a seat at t=0;
    # the long one waits behind the first for its chunks. A short prompt 10 ms later finds the
    # seats full. Seated but not started, the late prompt gives its seat back (as in the
    # engine, which seats a prompt only with its first chunk): the short one meets its target
    # instead of waiting out the long one's whole prefill, and the late one is still served.
    wl = [
        TraceRequest(0.0, 6000, 200, "interactive"),
        TraceRequest(0.0, 40000, 2, "interactive"),
        TraceRequest(0.01, 200, 2, "interactive"),
    ]
    first, late, short = on_one_gpu(wl, chunk_tokens=512, max_batch=2)
    assert first.ttft_s is not None and first.ttft_s <= TIERS["interactive"].ttft_s
    assert short.ttft_s is not None and short.ttft_s <= TIERS["interactive"].ttft_s
    assert late.ttft_s is not None and late.ttft_s > TIERS["interactive"].ttft_s  # served, late


def test_a_request_resumed_behind_its_tpot_gets_the_time_back() -> None:
    # A decode paused by a re-cut (here: a warm start) is behind its TPOT target; prompts keep
    # arriving that would fill every step up to the target. The steps after it resumes are held
    # under the target until the time is paid back, so its mean TPOT still meets the target.
    tpot = TIERS["interactive"].tpot_s
    behind = InFlight("interactive", 500, 80, age_s=0.8, ttft_s=0.1, generated=20)  # 36.8 ms so far
    assert (behind.age_s - behind.ttft_s) / (behind.generated - 1) > tpot
    prompts = [TraceRequest(0.0, 4000, 2, "background") for _ in range(60)]
    res = Simulator(perf_model(), 1, TIERS, SLO, ONE_GPU).run(prompts, [behind])
    resumed = res.records[0]
    assert resumed.error is None and resumed.tpot_s is not None
    assert resumed.tpot_s <= tpot
    # The prompts still progressed beside it: every one finished.
    assert all(r.error is None for r in res.records[1:])


def _attainment(plan: Plan, wl: list[TraceRequest]) -> dict[str, float]:
    res = Simulator(perf_model(), 4, STUDY_TIERS, SLO, plan).run(wl)
    return {t.tier: t.attainment for t in summarize(res.records, STUDY_TIERS, res.duration_s, 4).tiers}


def test_an_instance_serves_the_tiers_it_can_when_one_target_is_out_of_its_reach() -> None:
    # Sized for the 5.5 ms target it cannot reach, a TP 1 instance admitted no one and served
    # nothing at all. It now sizes its steps for the tiers it can serve; interactive requests
    # run there best-effort.
    tp1 = Plan([Assignment(s, 1, "mixed", SHARED) for s in range(4)])
    att = _attainment(tp1, workload(300, rate=10.0))
    assert att["agent"] == att["background"] == 1.0
    assert att["interactive"] == 0.0


def test_a_hybrid_cut_sends_the_tight_tier_to_its_high_tp_instances_only() -> None:
    # One TP 2 instance for every tier, two TP 1 instances for agent and background only: every
    # interactive request decodes on the TP 2 instance within 5.5 ms (on a TP 1 one it could not).
    hybrid = Plan(
        [
            Assignment(0, 2, "mixed", SHARED),
            Assignment(2, 1, "mixed", TierSet.of("agent", "background")),
            Assignment(3, 1, "mixed", TierSet.of("agent", "background")),
        ]
    )
    att = _attainment(hybrid, workload(300, rate=10.0))
    assert att == {"interactive": 1.0, "agent": 1.0, "background": 1.0}


def test_a_decode_that_can_no_longer_meet_its_tpot_resumes_off_the_tight_tiers_instances() -> None:
    # Two interactive decodes move onto a hybrid cut: one on pace for 5.5 ms, one that has spent
    # 10 s on 50 tokens and cannot get back under 5.5 ms at any speed. The first goes to the
    # TP 2 instance that serves interactive; the second to a TP 1 instance, where it does not
    # take a seat that a request which can still count needs (it still finishes).
    hybrid = Plan(
        [
            Assignment(0, 2, "mixed", SHARED),
            Assignment(2, 1, "mixed", TierSet.of("agent", "background")),
            Assignment(3, 1, "mixed", TierSet.of("agent", "background")),
        ]
    )
    on_pace = InFlight("interactive", 500, 200, age_s=0.35, ttft_s=0.1, generated=40)
    lost = InFlight("interactive", 500, 200, age_s=10.1, ttft_s=0.1, generated=50)
    sim = Simulator(perf_model(), 4, STUDY_TIERS, SLO, hybrid)
    sim.run([], [on_pace, lost], until_s=0.001)
    assert [(i.a.tp, i.running) for i in sim.instances] == [(2, 1), (1, 1), (1, 0)]
    done = Simulator(perf_model(), 4, STUDY_TIERS, SLO, hybrid).run([], [on_pace, lost]).records
    assert all(r.error is None for r in done)


def test_skipping_the_late_check_when_nothing_can_be_late_changes_no_outcome(monkeypatch) -> None:
    """``InstanceSteps._mark_late`` skips its full check while a kept bound proves no on-time prompt can miss;
    in overload, through re-cuts, every request's outcome is the same as checking every step."""
    wl = workload(800, rate=150.0, seed=3)
    nitsum = Preset("nitsum", queue_order="slo", dynamic=True)
    skipping = Simulator(perf_model(), 8, STUDY_TIERS, nitsum, replay=PlanReplay.like)
    fast = skipping.run(wl)
    monkeypatch.setattr(steps, "_SAFE_MARGIN_S", math.inf)  # never skip
    checking = Simulator(perf_model(), 8, STUDY_TIERS, nitsum, replay=PlanReplay.like)
    slow = checking.run(wl)
    assert skipping.late_checks_skipped > 0 and checking.late_checks_skipped == 0
    assert fast.switches > 0 and any(
        r.error is None and r.ttft_s > STUDY_TIERS[r.tier].ttft_s for r in slow.records
    )
    assert fast.records == slow.records and fast.switches == slow.switches
