"""Configurator decision time (greedy search, pure Python) at 8, 32 and 128 GPUs, and the
time a control window takes when it scores the candidates by replay.

    python benchmarks/configurator_time.py [--gpus 8 32 128] [--repeats 50] [--replay-rates 50 200 400]
        [--replay-workers 2]

Three tiers with mixed demands, Llama-3.1-8B on H100; min and median of --repeats decisions.
The replay table times ``ControlLoop.window`` on 8 GPUs with ``replay.PlanReplay`` scoring
every candidate (and the current plan) on the last 5 windows of requests at each rate, starting
from a reported backlog of two seconds' arrivals (half queued, half half-way through decoding).
With ``--replay-workers N`` the same windows also run with the candidates replayed side by side
in N processes (``tp_controller --replay-workers``), and the table shows both. The "confirm"
column is what a window adds when a small gain is confirmed (``control_loop.CONFIRM_WINDOWS``):
the current cut and one other replayed on 15 windows of the same requests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.policy.control_loop import (
    CONFIRM_WINDOWS,
    REPLAY_WINDOWS,
    Arrival,
    ControlLoop,
    InFlight,
    ReplayMap,
)
from nitsum_core.policy.plan import SHARED, Assignment, Plan, TierDemand
from nitsum_core.policy.search import greedy
from nitsum_core.sim.replay import PlanReplay

DEMANDS = {
    "interactive": TierDemand(Tier("interactive", 0.3, 0.012, 0), 120.0, 1000, 200, 110.0),
    "agent": TierDemand(Tier("agent", 1.0, 0.03, 1), 60.0, 2000, 30, 40.0),
    "background": TierDemand(Tier("background", 10.0, 0.1, 2), 30.0, 1200, 400, 30.0),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--replay-rates", type=float, nargs="*", default=[50.0, 200.0, 400.0])
    p.add_argument(
        "--replay-workers", type=int, default=0, help="also time the replay window with this many processes"
    )
    p.add_argument("--out", default="bench_results/configurator_time.json")
    a = p.parse_args()
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"], Coefficients(overhead_s=2e-3))
    rows = []
    for n in a.gpus:
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            plan = greedy(n, perf, DEMANDS)
            times.append(time.perf_counter() - t0)
        rows.append(
            {
                "gpus": n,
                "min_ms": min(times) * 1e3,
                "median_ms": statistics.median(times) * 1e3,
                "instances": len(plan.assignments),
            }
        )
    print(f"{'GPUs':>5} | {'min ms':>7} | {'median ms':>9} | target")
    for r in rows:
        print(f"{r['gpus']:>5} | {r['min_ms']:>7.2f} | {r['median_ms']:>9.2f} | <= 2.5 ms at 128")
    replay_rows = [replay_window_time(perf, rate) for rate in a.replay_rates]
    for r in replay_rows:
        r["confirm_ms"] = confirm_replay_time(perf, r["rate"])
    if a.replay_workers > 0 and replay_rows:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(a.replay_workers, mp_context=context) as workers:
            for r in replay_rows:
                r["parallel_ms"] = replay_window_time(perf, r["rate"], workers.map)["window_ms"]
                r["replay_workers"] = a.replay_workers
    if replay_rows:
        extra = f" | {a.replay_workers} processes ms | speed-up" if a.replay_workers > 0 else ""
        print(f"\n{'req/s':>6} | {'window ms (8 GPUs, replay)':>27} | {'confirm ms':>10}{extra}")
        for r in replay_rows:
            par = (
                f" | {r['parallel_ms']:>14.1f} | {r['window_ms'] / r['parallel_ms']:>7.2f}x"
                if "parallel_ms" in r
                else ""
            )
            print(f"{r['rate']:>6.0f} | {r['window_ms']:>27.1f} | {r['confirm_ms']:>10.1f}{par}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"greedy": rows, "replay_window": replay_rows}, indent=2))


def replay_window_time(
    perf: PerfModel, rate: float, replay_map: ReplayMap = map, pool: int = 8
) -> dict[str, float]:
    """Time one control window that replays every candidate on REPLAY_WINDOWS windows of requests
    (the earlier windows also warm a process pool's workers)."""
    tiers = {name: d.tier for name, d in DEMANDS.items()}
    total = sum(d.arrival_rps for d in DEMANDS.values())
    plan = Plan([Assignment(s, 1, "mixed", SHARED) for s in range(pool)])
    loop = ControlLoop(
        pool, perf, tiers, plan, replay=PlanReplay(perf, pool, tiers), roles=("mixed",), replay_map=replay_map
    )
    took = 0.0
    for _ in range(REPLAY_WINDOWS):
        for name, d in DEMANDS.items():
            prompt, output = int(d.mean_prompt), int(d.mean_output)
            n = round(rate * d.arrival_rps / total)
            for i in range(n):
                loop.arrival(name, prompt, output, offset_s=i / n)
            for i in range(2 * n):  # Little's law at ~2 s in the system
                decoding = i % 2 == 1
                loop.in_flight(
                    InFlight(
                        name,
                        prompt,
                        output,
                        1.0 if decoding else 0.2,
                        0.2 if decoding else None,
                        output // 2 if decoding else 0,
                    )
                )
        t0 = time.perf_counter()
        loop.window(lambda _: 0.05)
        took = time.perf_counter() - t0  # the last window: a full history to replay
    return {"rate": rate, "window_ms": took * 1e3}


def confirm_replay_time(perf: PerfModel, rate: float, pool: int = 8) -> float:
    """Milliseconds to replay the current cut (TP 1 x 8) and one other (TP 2 x 4) on
    CONFIRM_WINDOWS windows of requests from the same backlog: a window's confirmation cost."""
    tiers = {name: d.tier for name, d in DEMANDS.items()}
    total = sum(d.arrival_rps for d in DEMANDS.values())
    requests: list[Arrival] = []
    backlog: list[InFlight] = []
    for name, d in DEMANDS.items():
        prompt, output = int(d.mean_prompt), int(d.mean_output)
        n = round(rate * d.arrival_rps / total)
        requests += [
            Arrival(name, prompt, output, w + i / n) for w in range(CONFIRM_WINDOWS) for i in range(n)
        ]
        backlog += [
            InFlight(name, prompt, output, 1.0, 0.2, output // 2)
            if i % 2
            else InFlight(name, prompt, output, 0.2)
            for i in range(2 * n)
        ]
    requests.sort(key=lambda r: r.at_s or 0.0)
    replay = PlanReplay(perf, pool, tiers)
    t0 = time.perf_counter()
    for tp in (1, 2):
        replay(
            Plan([Assignment(s, tp, "mixed", SHARED) for s in range(0, pool, tp)]),
            requests,
            float(CONFIRM_WINDOWS),
            backlog,
        )
    return (time.perf_counter() - t0) * 1e3


if __name__ == "__main__":
    main()
