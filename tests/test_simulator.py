"""The discrete-event simulator: determinism, conservation, M/D/1 closed form, presets."""

from __future__ import annotations

import math
import random

import pytest
from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.policy.control_loop import InFlight
from nitsum_core.policy.goodput import RequestRecord, summarize
from nitsum_core.policy.plan import SHARED, Assignment, Plan, TierSet
from nitsum_core.sim import simulator
from nitsum_core.sim.simulator import Preset, Simulator
from nitsum_core.workload import TraceRequest, assign_tiers, synthetic_azure_conv

TIERS = {
    "interactive": Tier("interactive", 0.5, 0.03, 0),
    "agent": Tier("agent", 2.0, 0.05, 1),
    "background": Tier("background", 30.0, 0.2, 2),
}


def _perf() -> PerfModel:
    return PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"], Coefficients(overhead_s=2e-3))


def _workload(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    reqs = synthetic_azure_conv(n, seed=seed)
    from nitsum_core.workload import scale_rate

    return assign_tiers(
        scale_rate(reqs, rate), {"interactive": 0.5, "agent": 0.3, "background": 0.2}, seed=seed
    )


STATIC4 = Plan([Assignment(0, 2, "mixed", SHARED), Assignment(2, 2, "mixed", SHARED)])
ONE_GPU = Plan([Assignment(0, 1, "mixed", SHARED)])
SLO = Preset("nitsum-static", queue_order="slo")


def _on_one_gpu(wl: list[TraceRequest], preset: Preset = SLO, **sim_kwargs: int) -> list[RequestRecord]:
    """Each request's record after ``wl`` ran on one TP-1 instance with ``preset``'s scheduler."""
    return Simulator(_perf(), 1, TIERS, preset, ONE_GPU, **sim_kwargs).run(wl).records


@pytest.mark.parametrize("preset", [Preset("vanilla"), Preset("nitsum", queue_order="slo", dynamic=True)])
def test_deterministic_and_conserving(preset: Preset) -> None:
    wl = _workload(600, rate=20.0)
    plan = None if preset.dynamic else STATIC4
    a = Simulator(_perf(), 4, TIERS, preset, plan).run(wl)
    b = Simulator(_perf(), 4, TIERS, preset, plan).run(wl)
    assert a.records == b.records and a.switches == b.switches
    assert len(a.records) == len(wl)
    # Every arrival completes or carries the reason it did not.
    for rec in a.records:
        assert (rec.error is None) == (rec.ttft_s is not None)
        assert rec.error in (
            None,
            "no instance serves this tier",
            "prompt + output exceed the instance's KV capacity",
        )
    assert sum(r.error is None for r in a.records) >= 0.99 * len(wl)


def test_a_run_can_start_from_requests_already_in_flight() -> None:
    # What a replay's warm start relies on: decoding requests resume where they were, queued ones
    # keep their age (their TTFT counts from their real arrival), and both are accounted for.
    decoding = InFlight("interactive", 500, 50, age_s=1.0, ttft_s=0.1, generated=10)
    queued = InFlight("agent", 800, 20, age_s=0.3)
    wl = [TraceRequest(0.2, 300, 10, "interactive")]
    res = Simulator(_perf(), 4, TIERS, Preset("s", "slo"), STATIC4).run(wl, [decoding, queued])
    resumed, waited, fresh = res.records
    assert resumed.ttft_s == pytest.approx(0.1) and resumed.error is None
    # 40 more tokens at this plan's step time: the mean TPOT over all 49 stays about the same.
    assert resumed.tpot_s is not None and 0.0 < resumed.tpot_s < TIERS["interactive"].tpot_s
    assert waited.ttft_s is not None and waited.ttft_s > 0.3
    assert fresh.error is None and fresh.ttft_s is not None and fresh.ttft_s < 0.3
    # Stopped at a horizon: what is still running then is left unfinished.
    cut = Simulator(_perf(), 4, TIERS, Preset("s", "slo"), STATIC4).run(wl, [decoding, queued], until_s=0.05)
    assert [r.error for r in cut.records] == ["unfinished"] * 3


def test_foresight_hands_the_loop_the_real_next_arrivals() -> None:
    # For bounds only (benchmarks/dynamic_headroom.py --foresight): a clairvoyant loop's replays
    # score the workload's own arrivals of the next ``foresight_s`` seconds, timed from now.
    wl = _workload(600, rate=20.0)
    nitsum = Preset("nitsum", queue_order="slo", dynamic=True)
    sim = Simulator(_perf(), 4, TIERS, nitsum, foresight_s=2.0)
    sim.run(wl, until_s=10.0)
    assert sim.control is not None and sim.control.forecast is not None
    requests, span = sim.control.forecast()
    ahead = [r for r in wl if sim.now <= r.arrival_s < sim.now + 2.0]
    assert span == 2.0 and len(requests) == len(ahead) > 0
    for got, r in zip(requests, sorted(ahead, key=lambda r: r.arrival_s), strict=True):
        assert (got.tier, got.prompt, got.output) == (r.tier, r.prompt_tokens, r.output_tokens)
        assert got.at_s == pytest.approx(r.arrival_s - sim.now)
    # A clairvoyant run is still deterministic and accounts for every request.
    a = Simulator(_perf(), 4, TIERS, nitsum, foresight_s=2.0).run(wl)
    b = Simulator(_perf(), 4, TIERS, nitsum, foresight_s=2.0).run(wl)
    assert a.records == b.records and len(a.records) == len(wl)


def test_queueing_matches_md1_closed_form() -> None:
    """One TP-1 instance, one request at a time, fixed prompt, one output token, Poisson arrivals:
    an M/D/1 queue. Mean time in system = D + rho * D / (2 (1 - rho))."""
    perf = _perf()
    prompt = 1024
    service = perf.step_time(1, prompt, 0, 0)
    rho = 0.7
    lam = rho / service
    rng = random.Random(5)
    t, wl = 0.0, []
    for _ in range(20000):
        t += rng.expovariate(lam)
        wl.append(TraceRequest(t, prompt, 1, tier="interactive"))
    sim = Simulator(
        perf,
        1,
        {"interactive": TIERS["interactive"]},
        Preset("vanilla"),
        Plan([Assignment(0, 1, "mixed", SHARED)]),
        chunk_tokens=prompt,
        max_batch=1,
    )
    res = sim.run(wl)
    mean = sum(r.ttft_s for r in res.records) / len(res.records)
    expected = service + rho * service / (2 * (1 - rho))
    assert mean == pytest.approx(expected, rel=0.05)


def test_more_load_than_capacity_degrades_attainment_not_conservation() -> None:
    light = Simulator(_perf(), 4, TIERS, Preset("vanilla"), STATIC4).run(_workload(400, rate=5.0))
    heavy = Simulator(_perf(), 4, TIERS, Preset("vanilla"), STATIC4).run(_workload(400, rate=200.0))
    g_light = summarize(light.records, TIERS, light.duration_s, 4)
    g_heavy = summarize(heavy.records, TIERS, heavy.duration_s, 4)
    assert g_light.met_slo / g_light.requests > g_heavy.met_slo / g_heavy.requests
    assert len(heavy.records) == 400


def test_prefill_decode_handoff_and_dynamic_switching_run() -> None:
    pd = Plan(
        [
            Assignment(0, 1, "prefill", SHARED),
            Assignment(1, 1, "prefill", SHARED),
            Assignment(2, 2, "decode", SHARED),
        ]
    )
    res = Simulator(_perf(), 4, TIERS, Preset("static-pd"), pd).run(_workload(300, rate=10.0))
    assert all(r.error is None for r in res.records)
    dyn = Simulator(_perf(), 8, TIERS, Preset("nitsum", queue_order="slo", dynamic=True)).run(
        _workload(1500, rate=40.0)
    )
    assert dyn.timeline and all(r.error is None for r in dyn.records)


def test_a_decode_instance_takes_hand_offs_only_into_free_seats() -> None:
    # Four prefill GPUs feeding one decode GPU capped at 8 seats: the decode side is the
    # bottleneck. Hand-offs wait for a seat (their KV held on the prefill side) instead of
    # overfilling the batch, and every request still finishes.
    pd = Plan([*(Assignment(s, 1, "prefill", SHARED) for s in range(4)), Assignment(4, 1, "decode", SHARED)])
    wl = _workload(400, rate=40.0)
    sim = Simulator(_perf(), 5, TIERS, Preset("static-pd"), pd, max_batch=8)
    sim.run(wl, until_s=5.0)
    *prefill, decode = sim.instances
    assert decode.running + len(decode.in_transit) <= 8 and decode.kv_used <= decode.kv_cap
    waiting = list(decode.handoffs)
    assert len(waiting) > 10  # the overload the test is about
    # Each waiting one still holds its prompt's and output's KV where it was prefilled.
    for inst in prefill:
        held = sum(r.prompt + r.output for r in waiting if r.kv_home is inst)
        queued = sum(r.prompt + r.output for r in inst.prefilling)
        assert inst.kv_used == held + queued
    res = Simulator(_perf(), 5, TIERS, Preset("static-pd"), pd, max_batch=8).run(wl)
    assert all(r.error is None and r.tpot_s is not None for r in res.records)


def test_baseline_candidates_are_aligned_and_complete() -> None:
    from nitsum_core.sim.baselines import candidates, prefill_decode, split_clusters

    perf = _perf()
    for name in ("vanilla", "split", "static-pd"):
        for plan in candidates(name, 8, perf, ["interactive", "agent", "background"]):
            slots = sorted(s for a in plan.assignments for s in a.slots)
            assert slots == list(range(8)) and all(a.start % a.tp == 0 for a in plan.assignments)
    assert len(list(split_clusters(8, 2, ["a", "b", "c"]))) == 3  # 4 units into 3 non-empty clusters
    # Split clusters pick a degree each: 21 ways to size three clusters of 8 GPUs, each size with
    # every power-of-two degree dividing it (78 in all), the uniform TP 1 and TP 2 ones among them.
    split = [p.describe() for p in candidates("split", 8, perf, ["a", "b", "c"])]
    assert len(split) == len(set(split)) == 78
    assert {p.describe() for tp in (1, 2) for p in split_clusters(8, tp, ["a", "b", "c"])} <= set(split)
    assert [sum(a.role == "prefill" for a in p.assignments) for p in prefill_decode(8, [2])] == [1, 2, 3]
    # Static P/D picks each phase's degree (as DistServe does): 21 splits of 8 GPUs over TP 1-8,
    # among them 2 GPUs of TP 1 prefill feeding 3 TP 2 decode instances (laid out first: aligned).
    pd = [p.describe() for p in candidates("static-pd", 8, perf, ["a"])]
    assert len(pd) == len(set(pd)) == 21
    assert (
        "[0:2] TP2 decode *, [2:4] TP2 decode *, [4:6] TP2 decode *, [6:7] TP1 prefill *, [7:8] TP1 prefill *"
        in pd
    )
    assert candidates("nitsum", 8, perf, ["a"]) == [None]


def test_best_static_picks_the_best_configuration_it_tried() -> None:
    from nitsum_core.sim.baselines import PRESETS, best_static, candidates
    from nitsum_core.sim.simulator import Simulator

    perf = _perf()
    wl = _workload(400, rate=30.0)
    best = best_static("vanilla", 4, perf, TIERS, wl)
    each = [
        summarize(
            (r := Simulator(perf, 4, TIERS, PRESETS["vanilla"], p).run(wl)).records, TIERS, r.duration_s, 4
        ).goodput_rps
        for p in candidates("vanilla", 4, perf, list(TIERS))
    ]
    assert best.report.goodput_rps == pytest.approx(max(each)) and best.configs_tried == len(each)


def test_nitsum_sim_cli_writes_results(tmp_path) -> None:
    import json
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "nitsum_cli.main", "sim", "--gpus", "4", "--duration", "8", "--rates", "10,0.3x",
         "--presets", "vanilla,nitsum", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "sim-llama-3.1-8b-4xh100-sxm.json").read_text())
    rates = sorted({r["rate"] for r in data["rows"]})
    assert rates[0] == 10.0 and len(rates) == 2
    assert {(r["rate"], r["preset"]) for r in data["rows"]} == {
        (rate, preset) for rate in rates for preset in ("vanilla", "nitsum")
    }
    # "0.3x" is the rate whose window offers 0.3 x the pool's saturation, and the report says so.
    top = next(r for r in data["rows"] if r["rate"] == rates[1])
    assert top["offered_rps"] / top["saturation_rps"] == pytest.approx(0.3, rel=0.02)
    table = (tmp_path / "sim-llama-3.1-8b-4xh100-sxm.md").read_text()
    assert table.startswith("# Goodput study") and f"| {rates[1]:g} | 0.30x |" in table
    assert (tmp_path / "sim-llama-3.1-8b-4xh100-sxm.png").exists()

    # --update re-runs the named presets only and keeps the others' results (and the timeline).
    def update(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "nitsum_cli.main", "sim", "--gpus", "4", "--duration", "8", "--rates", "10,0.3x",
             "--presets", "vanilla", "--update", "--out", str(tmp_path), *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    res = update()
    assert res.returncode == 0, res.stderr
    merged = json.loads((tmp_path / "sim-llama-3.1-8b-4xh100-sxm.json").read_text())

    def results(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "sim_seconds"} for r in rows]

    assert results(merged["rows"]) == results(data["rows"]) and merged["timelines"] == data["timelines"]
    kept = [r for r in merged["rows"] if r["preset"] == "nitsum"]
    assert kept == [r for r in data["rows"] if r["preset"] == "nitsum"]  # not re-run: even its timing
    table = (tmp_path / "sim-llama-3.1-8b-4xh100-sxm.md").read_text()
    assert "vanilla re-run in" in table and "nitsum kept from the earlier run" in table
    # ... and refuses to merge results of another workload, naming what differs.
    res = update("--seed", "1")
    assert res.returncode != 0 and "--seed" in res.stderr and "without --update" in res.stderr
    assert json.loads((tmp_path / "sim-llama-3.1-8b-4xh100-sxm.json").read_text()) == merged


def test_nitsum_sim_sweep_runs_the_study_load_axis(tmp_path) -> None:
    import json
    import subprocess
    import sys

    base = [
        sys.executable,
        "-m",
        "nitsum_cli.main",
        "sim",
        "--gpus",
        "4",
        "--duration",
        "4",
        "--presets",
        "vanilla",
    ]
    res = subprocess.run(
        [*base, "--sweep", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "sim-llama-3.1-8b-4xh100-sxm.json").read_text())
    assert data["args"]["rates"] == "0.1x,0.25x,0.5x,1x,1.5x,2x"
    loads = [r["offered_rps"] / r["saturation_rps"] for r in sorted(data["rows"], key=lambda r: r["rate"])]
    assert len(loads) == 6 and loads[0] < 0.15 and loads[-1] == pytest.approx(2.0, rel=0.05)
    # Both ways of naming the rates at once is a mistake: refused, saying why, nothing written.
    res = subprocess.run(
        [*base, "--sweep", "--rates", "10", "--out", str(tmp_path / "both")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "--sweep" in res.stderr and "not both" in res.stderr
    assert not (tmp_path / "both").exists()


def test_nitsum_sim_cli_says_what_is_wrong_with_a_rate(tmp_path) -> None:
    import subprocess
    import sys

    for bad, says in [("fast", "could not convert"), ("-2x", "multiple > 0"), ("0", "positive rates")]:
        res = subprocess.run(
            [sys.executable, "-m", "nitsum_cli.main", "sim", f"--rates={bad}", "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode != 0 and says in res.stderr and "--rates" in res.stderr
        assert not list(tmp_path.iterdir())  # nothing written


def test_a_tier_the_plan_does_not_serve_is_queued_best_effort_not_rejected() -> None:
    only_interactive = Plan([Assignment(s, 1, "mixed", TierSet.of("interactive")) for s in range(4)])
    res = Simulator(_perf(), 4, TIERS, Preset("nitsum-static", queue_order="slo"), only_interactive).run(
        _workload(200, rate=5.0)
    )
    assert {r.tier for r in res.records} - {"interactive"}  # the workload has other tiers
    assert res.rejected == 0 and all(r.error is None for r in res.records)


def test_a_later_urgent_prompt_prefills_ahead_of_a_long_lower_priority_one() -> None:
    # A background prompt of 16k tokens is admitted first; an interactive one arrives 10 ms later.
    # Prefill chunks go by queue order, not admission order: the interactive request gets its
    # first token within its TTFT target instead of waiting out the whole long prompt.
    wl = [TraceRequest(0.0, 16000, 2, "background"), TraceRequest(0.01, 200, 2, "interactive")]
    background, interactive = _on_one_gpu(wl, chunk_tokens=512)
    assert interactive.ttft_s is not None and background.ttft_s is not None
    assert interactive.ttft_s <= TIERS["interactive"].ttft_s
    assert interactive.arrival_s + interactive.ttft_s < background.ttft_s


def test_a_prompt_sure_to_miss_its_ttft_prefills_after_one_that_can_still_meet_its_own() -> None:
    # Two interactive requests (TTFT target 0.5 s): a 30k-token prompt, which needs 0.7 s of
    # prefill even alone, and 10 ms later a short one. The long one can no longer count, so the
    # short one prefills first and meets its target; the long one is still served, after it.
    wl = [TraceRequest(0.0, 30000, 2, "interactive"), TraceRequest(0.01, 200, 2, "interactive")]
    doomed, short = _on_one_gpu(wl, chunk_tokens=512)
    assert doomed.ttft_s is not None and doomed.ttft_s > TIERS["interactive"].ttft_s  # served, late
    assert short.ttft_s is not None and short.ttft_s <= TIERS["interactive"].ttft_s
    # Arrival order (the priority baseline, same tier) makes both miss.
    fifo = Preset("priority", queue_order="priority")
    _, behind = _on_one_gpu(wl, fifo, chunk_tokens=512)
    assert behind.ttft_s is not None and behind.ttft_s > TIERS["interactive"].ttft_s
    # A 16k-token prompt (0.31 s alone) can still make it: it keeps its place and meets its target.
    wl[0] = TraceRequest(0.0, 16000, 2, "interactive")
    first, second = _on_one_gpu(wl, chunk_tokens=512)
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
    first, second, short = _on_one_gpu(wl, chunk_tokens=512, max_batch=2)
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
    records = _on_one_gpu(wl)
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
    long, *short = _on_one_gpu(wl)
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
    res = Simulator(_perf(), 2, tiers, Preset("nitsum-static", queue_order="slo"), per_tier).run(wl)
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
    res = Simulator(_perf(), 2, tiers, SLO, plan).run(wl)
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
    sim = Simulator(_perf(), 4, TIERS, SLO, shared)
    sim.run(_workload(2000, rate=200.0), until_s=5.0)
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
    first, late, short = _on_one_gpu(wl, chunk_tokens=512, max_batch=2)
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
    res = Simulator(_perf(), 1, TIERS, SLO, ONE_GPU).run(prompts, [behind])
    resumed = res.records[0]
    assert resumed.error is None and resumed.tpot_s is not None
    assert resumed.tpot_s <= tpot
    # The prompts still progressed beside it: every one finished.
    assert all(r.error is None for r in res.records[1:])


STUDY_TIERS = {  # the 8B study's (gpu_tiers.toml): TP 1 cannot decode within interactive's 5.5 ms
    "interactive": Tier("interactive", 0.3, 0.0055, 0),
    "agent": Tier("agent", 1.0, 0.03, 1),
    "background": Tier("background", 10.0, 0.1, 2),
}


def _attainment(plan: Plan, wl: list[TraceRequest]) -> dict[str, float]:
    res = Simulator(_perf(), 4, STUDY_TIERS, SLO, plan).run(wl)
    return {t.tier: t.attainment for t in summarize(res.records, STUDY_TIERS, res.duration_s, 4).tiers}


def test_an_instance_serves_the_tiers_it_can_when_one_target_is_out_of_its_reach() -> None:
    # Sized for the 5.5 ms target it cannot reach, a TP 1 instance admitted no one and served
    # nothing at all. It now sizes its steps for the tiers it can serve; interactive requests
    # run there best-effort.
    tp1 = Plan([Assignment(s, 1, "mixed", SHARED) for s in range(4)])
    att = _attainment(tp1, _workload(300, rate=10.0))
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
    att = _attainment(hybrid, _workload(300, rate=10.0))
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
    sim = Simulator(_perf(), 4, STUDY_TIERS, SLO, hybrid)
    sim.run([], [on_pace, lost], until_s=0.001)
    assert [(i.a.tp, i.running) for i in sim.instances] == [(2, 1), (1, 1), (1, 0)]
    done = Simulator(_perf(), 4, STUDY_TIERS, SLO, hybrid).run([], [on_pace, lost]).records
    assert all(r.error is None for r in done)


def test_skipping_the_late_check_when_nothing_can_be_late_changes_no_outcome(monkeypatch) -> None:
    """``_mark_late`` skips its full check while a kept bound proves no on-time prompt can miss;
    in overload, through re-cuts, every request's outcome is the same as checking every step."""
    wl = _workload(800, rate=150.0, seed=3)
    nitsum = Preset("nitsum", queue_order="slo", dynamic=True)
    skipping = Simulator(_perf(), 8, STUDY_TIERS, nitsum)
    fast = skipping.run(wl)
    monkeypatch.setattr(simulator, "_SAFE_MARGIN_S", math.inf)  # never skip
    checking = Simulator(_perf(), 8, STUDY_TIERS, nitsum)
    slow = checking.run(wl)
    assert skipping.late_checks_skipped > 0 and checking.late_checks_skipped == 0
    assert fast.switches > 0 and any(
        r.error is None and r.ttft_s > STUDY_TIERS[r.tier].ttft_s for r in slow.records
    )
    assert fast.records == slow.records and fast.switches == slow.switches


def test_the_policy_side_runs_without_importing_torch() -> None:
    # The perf model, capacity model and searches, simulator and the controller's autopilot need a model's shape,
    # never its tensors: a replay worker process (`tp_controller --replay-workers`) or `nitsum sim`
    # must not pay torch's import (about 2 s and 200 MB per process on the development machine).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import nitsum_core.sim.simulator, nitsum_core.policy.search, nitsum_core.policy.control_loop\n"
        "import nitsum_tp_controller.autopilot\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
