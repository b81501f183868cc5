"""How much could *any* dynamic policy gain over the best static cut on this workload?

Runs every static plan the baselines sweep (shared uniform TP cuts, per-tier clusters with a
degree each, P/D splits) and every static hybrid cut (``hybrid_cuts`` below) with the Nitsum
scheduler, buckets each request's outcome by its arrival window, and compares the best single
plan of any shape (stricter than `nitsum-static`, which sweeps uniform cuts) with an oracle that picks
the best plan for every window separately (no switching cost, no transient). The oracle/static
ratio bounds the gain of re-cutting at that window length; full Nitsum's number is shown beside it.
``--foresight 5 10`` adds full Nitsum with a clairvoyant control loop (its replays score the next
5 / 10 s of real arrivals): how much a perfect forecast would gain over replaying the last 5 s.

    python benchmarks/dynamic_headroom.py --rate 400 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv:interactive=0.7,background=0.3 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_code.csv:agent=1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from nitsum_core.config import Tier
from nitsum_core.policy.capacity import valid_tp_choices
from nitsum_core.policy.cuts import hybrid_cut, tight_and_rest
from nitsum_core.policy.goodput import meets_slo, summarize
from nitsum_core.policy.plan import Plan
from nitsum_core.sim.baselines import PRESETS, candidates
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.sim.simulator import Simulator
from study_setup import add_study_args, load_study


def hybrid_cuts(pool: int, tps: list[int], tiers: dict[str, Tier]) -> Iterator[Plan]:
    """Every static hybrid cut (``cuts.hybrid_cut``): some instances at a higher degree
    serving every tier, the rest at the lowest degree serving all but the strictest-TPOT tier.
    Not a baseline preset: this study runs them as static plans of any shape."""
    _, rest = tight_and_rest({name: t.tpot_s for name, t in tiers.items()})
    for tp in tps[1:]:
        for n in range(1, pool // tp):
            yield Plan(hybrid_cut(pool, tp, n, tps[0], rest))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, rate=400.0, out="bench_results/dynamic_headroom.json")
    p.add_argument("--window", type=float, default=10.0, help="oracle re-cut period in seconds")
    p.add_argument(
        "--foresight",
        type=float,
        nargs="*",
        default=[],
        metavar="S",
        help="also run full Nitsum with a clairvoyant loop whose replays score the next S seconds of "
        "real arrivals instead of the last five (one run per value): what a perfect forecast could gain",
    )
    a = p.parse_args()
    workload, tiers, perf = load_study(a)
    order = sorted(tiers, key=lambda t: tiers[t].priority)
    plans = {}
    for preset in ("nitsum-static", "split", "static-pd"):
        for plan in candidates(preset, a.gpus, perf, order):
            if plan is not None:
                plans[plan.describe()] = plan
    for plan in hybrid_cuts(a.gpus, valid_tp_choices(a.gpus, perf), tiers):
        plans[plan.describe()] = plan
    t0 = workload[0].arrival_s
    n_windows = int(a.duration // a.window) + 1
    per_plan: dict[str, list[int]] = {}
    for label, plan in plans.items():
        res = Simulator(perf, a.gpus, tiers, PRESETS["nitsum-static"], plan).run(workload)
        good = [0] * n_windows
        for rec in res.records:
            if rec.error is None and meets_slo(rec, tiers[rec.tier]):
                good[min(n_windows - 1, int((rec.arrival_s - t0) // a.window))] += 1
        per_plan[label] = good
    dyn = Simulator(perf, a.gpus, tiers, PRESETS["nitsum"], replay=PlanReplay.like).run(workload)
    nitsum = summarize(dyn.records, tiers, dyn.duration_s, a.gpus).goodput_rps
    best_label = max(per_plan, key=lambda k: sum(per_plan[k]))
    static = sum(per_plan[best_label]) / a.duration
    oracle_picks = [max(per_plan, key=lambda k, w=w: per_plan[k][w]) for w in range(n_windows)]
    oracle = sum(per_plan[k][w] for w, k in enumerate(oracle_picks)) / a.duration
    print(
        f"{a.model} on {a.gpus}x {a.hardware}, {a.rate:.0f} req/s, {len(plans)} static plans, {a.window:.0f} s windows"
    )
    print(f"  best static plan      {static:8.2f} req/s  ({best_label[:70]})")
    print(
        f"  per-window oracle     {oracle:8.2f} req/s  ({oracle / max(static, 1e-9):.2f}x; {len(set(oracle_picks))} distinct plans)"
    )
    print(f"  full Nitsum (dynamic) {nitsum:8.2f} req/s  ({nitsum / max(static, 1e-9):.2f}x)")
    foresight = {}
    for s in a.foresight:
        res = Simulator(perf, a.gpus, tiers, PRESETS["nitsum"], foresight_s=s, replay=PlanReplay.like).run(
            workload
        )
        foresight[s] = summarize(res.records, tiers, res.duration_s, a.gpus).goodput_rps
        print(
            f"  ... foresight {s:4.0f} s   {foresight[s]:8.2f} req/s  ({foresight[s] / max(static, 1e-9):.2f}x; "
            f"replays score the next {s:.0f} s of real arrivals)"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(a),
                "static": static,
                "static_plan": best_label,
                "oracle": oracle,
                "oracle_picks": oracle_picks,
                "nitsum": nitsum,
                "nitsum_foresight": {str(s): g for s, g in foresight.items()},
                "per_plan_window_good": per_plan,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
