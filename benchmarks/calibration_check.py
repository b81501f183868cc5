"""Configurator predictions vs the simulator, plan by plan (why the dynamic policy picks what it picks).

For one load point of a workload, every plan the configurator considers (shared uniform cuts of
each TP, the per-tier greedy cut) and the per-tier TP-2 clusters is scored twice: the predicted
goodput the configurator ranks it by, and the goodput the simulator gives it run statically with
the Nitsum scheduler. A ratio far from 1 is a miscalibrated capacity model.

    python benchmarks/calibration_check.py --rate 200 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv:interactive=0.7,background=0.3 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_code.csv:agent=1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nitsum_core.policy.capacity import predicted_goodput
from nitsum_core.policy.cuts import shared_plans
from nitsum_core.policy.goodput import summarize
from nitsum_core.policy.plan import Plan, TierDemand
from nitsum_core.policy.search import greedy
from nitsum_core.sim.baselines import PRESETS, split_clusters
from nitsum_core.sim.simulator import Simulator
from study_setup import add_study_args, load_study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, rate=200.0, out="bench_results/calibration_check.json")
    a = p.parse_args()
    workload, tiers, perf = load_study(a)
    demands = {}
    for name, tier in tiers.items():
        rs = [r for r in workload if r.tier == name]
        if rs:
            demands[name] = TierDemand(
                tier,
                len(rs) / a.duration,
                sum(r.prompt_tokens for r in rs) / len(rs),
                sum(r.output_tokens for r in rs) / len(rs),
            )

    def simulate(plan: Plan) -> float:
        res = Simulator(perf, a.gpus, tiers, PRESETS["nitsum-static"], plan).run(workload)
        return summarize(res.records, tiers, res.duration_s, a.gpus).goodput_rps

    plans = [(f"shared TP{pl.assignments[0].tp}", pl) for pl in shared_plans(a.gpus, perf, demands)]
    plans.append(("per-tier greedy", greedy(a.gpus, perf, demands)))
    plans += [
        (f"split TP2 #{i}", pl)
        for i, pl in enumerate(split_clusters(a.gpus, 2, sorted(tiers, key=lambda t: tiers[t].priority)))
    ]
    rows = []
    print(f"{a.model} on {a.gpus}x {a.hardware}, {a.rate:.0f} req/s")
    print(f"{'plan':<18}{'predicted':>10}{'simulated':>10}{'ratio':>7}  cut")
    for label, plan in plans:
        pred = predicted_goodput(perf, plan.assignments, demands)
        sim = simulate(plan)
        rows.append({"plan": label, "cut": plan.describe(), "predicted": pred, "simulated": sim})
        print(f"{label:<18}{pred:10.1f}{sim:10.1f}{pred / max(sim, 1e-9):7.2f}  {plan.describe()[:70]}")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
