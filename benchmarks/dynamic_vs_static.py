"""Full (dynamic) Nitsum against the Nitsum scheduler at its hindsight-best static TP, over seeds.

One seed of a trace window can flatter or sink a control policy (a version of the control loop
measured on seed 0 fell to 0.58x its static scheduler on seed 1 of the same window):
this runs both side by side at each load point for each seed of the tier assignment and reports
the ratio, its geometric mean and its worst case.

    python benchmarks/dynamic_vs_static.py --model llama-3.1-8b --rates 300 400 --seeds 0 1 2 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv:interactive=0.7,background=0.3 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_code.csv:agent=1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from nitsum_core.policy.goodput import summarize
from nitsum_core.sim.baselines import PRESETS, best_static
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.sim.simulator import Simulator
from study_setup import add_study_args, load_study, parse_rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, rate=400.0, out="bench_results/dynamic_vs_static.json")
    p.add_argument("--rates", type=parse_rate, nargs="+", default=None, help="load points (default: --rate)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="tier-assignment seeds")
    a = p.parse_args()
    rows = []
    for seed in a.seeds:
        for rate in a.rates or [a.rate]:
            a.seed, a.rate = seed, rate
            workload, tiers, perf = load_study(a)
            static = best_static("nitsum-static", a.gpus, perf, tiers, workload)
            res = Simulator(perf, a.gpus, tiers, PRESETS["nitsum"], replay=PlanReplay.like).run(workload)
            dynamic = summarize(res.records, tiers, res.duration_s, a.gpus).goodput_rps
            row = {
                "seed": seed,
                "rate": a.rate,  # in req/s, a multiple of saturation resolved by load_study
                "static_rps": static.report.goodput_rps,
                "static_config": static.config,
                "nitsum_rps": dynamic,
                "switches": res.switches,
                "ratio": dynamic / static.report.goodput_rps if static.report.goodput_rps > 0 else math.nan,
            }
            rows.append(row)
            print(
                f"seed {seed} rate {a.rate:>6.1f}: nitsum {dynamic:7.2f}  static {row['static_rps']:7.2f}"
                f"  ratio {row['ratio']:.3f}  ({res.switches} switches)",
                flush=True,
            )
    ratios = [r["ratio"] for r in rows if r["ratio"] > 0]
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else math.nan
    print(f"\n{a.model}: nitsum / best static, geometric mean {geo:.3f}, worst {min(ratios):.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "rows": rows, "geomean_ratio": geo}, indent=2))


if __name__ == "__main__":
    main()
