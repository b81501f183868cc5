"""Where does Nitsum's gain hold? Every preset at one load point, over a sweep of one tier's TPOT target.

The study's headline ratios depend on how tight the interactive TPOT target is: at a target the
lowest TP degree cannot reach, TP must be cut per tier (full Nitsum over its static scheduler is
large) but the tight tier is costly to serve at all (the gain over split is smaller); at a loose
target one degree serves every tier. This runs the same workload and pool at each target value
and reports, side by side, full Nitsum over the best of vanilla / priority / split / static P/D
(the issue's >= 3x) and over the Nitsum scheduler at its best uniform static TP (>= 1.2x), each
baseline at its own best static configuration for that target. Every target is reported: the
table is the map of where the claim holds, not a search for a flattering target.

    python benchmarks/target_sweep.py --model llama-3.1-8b --duration 40 --rate 2x \\
        --tpot-ms 5.5 6 7 8 10 12 --tiers docs/results/llama-3.1-8b-8xh100/tiers.toml \\
        --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv:interactive=0.7,background=0.3 \\
        --trace ../shared/traces/AzureLLMInferenceTrace_code.csv:agent=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from nitsum_cli.sim import differing_args
from nitsum_core.policy.capacity import reachable_tpot, smallest_decode_step, valid_tp_choices
from nitsum_core.sim.baselines import best_static
from study_setup import add_study_args, load_study

BASELINES = ("vanilla", "priority", "split", "static-pd")
NAMES = (*BASELINES, "nitsum-static", "nitsum")  # every preset, each at its best configuration


def _ratio(num: float, den: float) -> float | None:
    """num / den, None where the baseline served nothing (JSON has no infinity)."""
    return num / den if den > 0 else None


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}×"


# The arguments that must match for ``--update`` to keep an earlier run's results.
_SAME_RUN = ("model", "hardware", "gpus", "rate", "duration", "tiers", "trace", "seed", "tier", "tpot_ms")


def _earlier_rows(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[float, dict]:
    """The rows of the earlier run at ``a.out`` by target, for ``--update``; exits with the reason
    if there is none or it came from other arguments."""
    path = Path(a.out)
    if not path.exists():
        p.error(f"--update: no earlier results at {path}; run without --update first")
    earlier = json.loads(path.read_text())
    differ = differing_args(earlier["args"], a, _SAME_RUN)
    if differ:
        p.error(
            f"--update: {path} comes from other arguments ({', '.join(differ)}); "
            "give the same ones, or run without --update"
        )
    return {row["tpot_ms"]: row for row in earlier["rows"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_args(p, rate=400.0, out="bench_results/target_sweep.json")
    p.add_argument("--tier", default="interactive", help="the tier whose TPOT target is swept")
    p.add_argument("--tpot-ms", type=float, nargs="+", required=True, help="TPOT targets to run, in ms")
    p.add_argument(
        "--update",
        nargs="+",
        choices=NAMES,
        metavar="PRESET",
        help="re-run only these presets and keep the others' results from the JSON at --out (which "
        "must come from the same arguments)",
    )
    a = p.parse_args()
    workload, tiers, perf = load_study(a)
    earlier = _earlier_rows(p, a) if a.update else {}
    if a.tier not in tiers:
        p.error(f"--tier {a.tier!r} is not in the tier file; it has {sorted(tiers)}")
    if any(ms <= 0 for ms in a.tpot_ms):
        p.error(f"--tpot-ms takes targets above 0 ms, got {a.tpot_ms}")
    steps = {tp: smallest_decode_step(perf, tp) * 1e3 for tp in valid_tp_choices(a.gpus, perf)}
    print(
        f"{a.model} on {a.gpus}x {a.hardware}, {a.rate:.1f} req/s, {len(workload)} requests; smallest decode "
        "step by TP: " + ", ".join(f"TP {tp} {ms:.2f} ms" for tp, ms in steps.items()),
        flush=True,
    )
    rows = []
    for tpot_ms in a.tpot_ms:
        t0 = time.perf_counter()
        swept = {**tiers, a.tier: dataclasses.replace(tiers[a.tier], tpot_s=tpot_ms / 1e3)}
        names = a.update or NAMES
        runs = {name: best_static(name, a.gpus, perf, swept, workload) for name in names}
        kept = earlier.get(tpot_ms, {})
        goodput = {
            name: runs[name].report.goodput_rps if name in runs else kept["goodput_rps"][name]
            for name in NAMES
        }
        configs = {name: runs[name].config if name in runs else kept["configs"][name] for name in NAMES[:-1]}
        best = max(BASELINES, key=lambda n: goodput[n])
        row = {
            "tpot_ms": tpot_ms,
            "lowest_tp_reaches_target": reachable_tpot(perf, min(steps), [tpot_ms / 1e3]) is not None,
            "goodput_rps": goodput,
            "configs": configs,
            "nitsum_attainment": (
                {t.tier: t.attainment for t in runs["nitsum"].report.tiers}
                if "nitsum" in runs
                else kept["nitsum_attainment"]
            ),
            "nitsum_switches": runs["nitsum"].result.switches
            if "nitsum" in runs
            else kept["nitsum_switches"],
            "best_baseline": best,
            "vs_best_baseline": _ratio(goodput["nitsum"], goodput[best]),
            "vs_nitsum_static": _ratio(goodput["nitsum"], goodput["nitsum-static"]),
            "seconds": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"{a.tier} TPOT {tpot_ms:5.1f} ms: nitsum {goodput['nitsum']:7.1f}  best baseline {goodput[best]:7.1f} "
            f"({best})  {_times(row['vs_best_baseline'])}  nitsum-static {goodput['nitsum-static']:7.1f} "
            f"{_times(row['vs_nitsum_static'])}  [{row['seconds']:.0f} s]",
            flush=True,
        )
    print(
        f"\n| {a.tier} TPOT | TP {min(steps)} reaches it | "
        + " | ".join(NAMES)
        + " | over best baseline | over static |"
    )
    print("| ---: | :-: | " + " | ".join("---:" for _ in NAMES) + " | ---: | ---: |")
    for r in rows:
        g = r["goodput_rps"]
        cells = " | ".join(f"{g[n]:.1f}" for n in NAMES)
        print(
            f"| {r['tpot_ms']:g} ms | {'yes' if r['lowest_tp_reaches_target'] else 'no'} | {cells} | "
            f"{_times(r['vs_best_baseline'])} | {_times(r['vs_nitsum_static'])} |"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "decode_step_ms": steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
