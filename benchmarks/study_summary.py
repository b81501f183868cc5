"""Summarise `nitsum sim` results JSONs against the goodput-study targets (a markdown table).

    python benchmarks/study_summary.py docs/results/*/sim-*.json

For each run, at its highest load: full Nitsum vs the best of vanilla / priority / split /
static P/D (target >= 3x), vs the Nitsum scheduler at its best static TP (target >= 1.2x), and
that static scheduler vs the best baseline. Prints the table; writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINES = ("vanilla", "priority", "split", "static-pd")


def summarise(path: Path) -> str:
    data = json.loads(path.read_text())
    args = data["args"]
    top = max(r["rate"] for r in data["rows"])
    at = {r["preset"]: r for r in data["rows"] if r["rate"] == top}
    best = max((p for p in BASELINES if p in at), key=lambda p: at[p]["goodput_rps"])
    dyn, static, base = (
        at["nitsum"]["goodput_rps"],
        at["nitsum-static"]["goodput_rps"],
        at[best]["goodput_rps"],
    )

    def ratio(x: float, y: float, target: float) -> str:
        r = x / max(y, 1e-9)
        return f"**{r:.2f}×** {'✔' if r >= target else '✘'}"

    pool = f"{args['gpus']}×{args['hardware']}"
    return (
        f"| {args['model']}, {pool}, {top:g} req/s | {dyn:.1f} | {base:.1f} ({best}) | {ratio(dyn, base, 3.0)} "
        f"| {static:.1f} | {ratio(dyn, static, 1.2)} | {static / max(base, 1e-9):.2f}× |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="results JSONs written by `nitsum sim --out`")
    a = p.parse_args()
    print(
        "| model, pool, load | full Nitsum | best baseline | ratio (≥ 3×) | Nitsum scheduler, best static TP "
        "| ratio (≥ 1.2×) | static scheduler vs best baseline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path in a.results:
        print(summarise(path))


if __name__ == "__main__":
    main()
