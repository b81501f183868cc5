"""The discrete-event simulator: determinism, conservation, M/D/1 closed form, presets, P/D
hand-offs, baselines and the `nitsum sim` CLI."""

from __future__ import annotations

import random

import pytest
from nitsum_core.policy.control_loop import InFlight
from nitsum_core.policy.goodput import summarize
from nitsum_core.policy.plan import SHARED, Assignment, Plan
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.sim.simulator import Preset, Simulator
from nitsum_core.workload import TraceRequest
from sim_cases import STATIC4, TIERS, perf_model, workload


@pytest.mark.parametrize("preset", [Preset("vanilla"), Preset("nitsum", queue_order="slo", dynamic=True)])
def test_deterministic_and_conserving(preset: Preset) -> None:
    wl = workload(600, rate=20.0)
    plan = None if preset.dynamic else STATIC4
    a = Simulator(perf_model(), 4, TIERS, preset, plan, replay=PlanReplay.like).run(wl)
    b = Simulator(perf_model(), 4, TIERS, preset, plan, replay=PlanReplay.like).run(wl)
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
    res = Simulator(perf_model(), 4, TIERS, Preset("s", "slo"), STATIC4).run(wl, [decoding, queued])
    resumed, waited, fresh = res.records
    assert resumed.ttft_s == pytest.approx(0.1) and resumed.error is None
    # 40 more tokens at this plan's step time: the mean TPOT over all 49 stays about the same.
    assert resumed.tpot_s is not None and 0.0 < resumed.tpot_s < TIERS["interactive"].tpot_s
    assert waited.ttft_s is not None and waited.ttft_s > 0.3
    assert fresh.error is None and fresh.ttft_s is not None and fresh.ttft_s < 0.3
    # Stopped at a horizon: what is still running then is left unfinished.
    cut = Simulator(perf_model(), 4, TIERS, Preset("s", "slo"), STATIC4).run(
        wl, [decoding, queued], until_s=0.05
    )
    assert [r.error for r in cut.records] == ["unfinished"] * 3


def test_foresight_hands_the_loop_the_real_next_arrivals() -> None:
    # For bounds only (benchmarks/dynamic_headroom.py --foresight): a clairvoyant loop's replays
    # score the workload's own arrivals of the next ``foresight_s`` seconds, timed from now.
    wl = workload(600, rate=20.0)
    nitsum = Preset("nitsum", queue_order="slo", dynamic=True)
    sim = Simulator(perf_model(), 4, TIERS, nitsum, foresight_s=2.0, replay=PlanReplay.like)
    sim.run(wl, until_s=10.0)
    assert sim.control is not None and sim.control.forecast is not None
    requests, span = sim.control.forecast()
    ahead = [r for r in wl if sim.now <= r.arrival_s < sim.now + 2.0]
    assert span == 2.0 and len(requests) == len(ahead) > 0
    for got, r in zip(requests, sorted(ahead, key=lambda r: r.arrival_s), strict=True):
        assert (got.tier, got.prompt, got.output) == (r.tier, r.prompt_tokens, r.output_tokens)
        assert got.at_s == pytest.approx(r.arrival_s - sim.now)
    # A clairvoyant run is still deterministic and accounts for every request.
    a = Simulator(perf_model(), 4, TIERS, nitsum, foresight_s=2.0, replay=PlanReplay.like).run(wl)
    b = Simulator(perf_model(), 4, TIERS, nitsum, foresight_s=2.0, replay=PlanReplay.like).run(wl)
    assert a.records == b.records and len(a.records) == len(wl)


def test_queueing_matches_md1_closed_form() -> None:
    """One TP-1 instance, one request at a time, fixed prompt, one output token, Poisson arrivals:
    an M/D/1 queue. Mean time in system = D + rho * D / (2 (1 - rho))."""
    perf = perf_model()
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
    light = Simulator(perf_model(), 4, TIERS, Preset("vanilla"), STATIC4).run(workload(400, rate=5.0))
    heavy = Simulator(perf_model(), 4, TIERS, Preset("vanilla"), STATIC4).run(workload(400, rate=200.0))
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
    res = Simulator(perf_model(), 4, TIERS, Preset("static-pd"), pd).run(workload(300, rate=10.0))
    assert all(r.error is None for r in res.records)
    dyn = Simulator(
        perf_model(), 8, TIERS, Preset("nitsum", queue_order="slo", dynamic=True), replay=PlanReplay.like
    ).run(workload(1500, rate=40.0))
    assert dyn.timeline and all(r.error is None for r in dyn.records)


def test_a_decode_instance_takes_hand_offs_only_into_free_seats() -> None:
    # Four prefill GPUs feeding one decode GPU capped at 8 seats: the decode side is the
    # bottleneck. Hand-offs wait for a seat (their KV held on the prefill side) instead of
    # overfilling the batch, and every request still finishes.
    pd = Plan([*(Assignment(s, 1, "prefill", SHARED) for s in range(4)), Assignment(4, 1, "decode", SHARED)])
    wl = workload(400, rate=40.0)
    sim = Simulator(perf_model(), 5, TIERS, Preset("static-pd"), pd, max_batch=8)
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
    res = Simulator(perf_model(), 5, TIERS, Preset("static-pd"), pd, max_batch=8).run(wl)
    assert all(r.error is None and r.tpot_s is not None for r in res.records)


def test_baseline_candidates_are_aligned_and_complete() -> None:
    from nitsum_core.sim.baselines import candidates, prefill_decode, split_clusters

    perf = perf_model()
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

    perf = perf_model()
    wl = workload(400, rate=30.0)
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


def test_the_policy_side_runs_without_importing_torch() -> None:
    # The perf model, capacity model and searches, simulator and the controller's autopilot need a model's shape,
    # never its tensors: a replay worker process (`tp_controller --replay-workers`) or `nitsum sim`
    # must not pay torch's import (about 2 s and 200 MB per process on the development machine).
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import nitsum_core.sim.simulator, nitsum_core.policy.search, nitsum_core.policy.control_loop\n"
        "import nitsum_core.sim.replay, nitsum_core.sim.baselines, nitsum_core.policy.scheduler\n"
        "import nitsum_tp_controller.autopilot\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
