"""``nitsum sim``: the goodput study -- every preset, each at its best static configuration, on
the same trace and pool, across a sweep of arrival rates. Writes JSON, markdown and plots."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nitsum_core import workload as wl
from nitsum_core.config import load_tiers
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.perf.saturation import rate_for_load, saturation
from nitsum_core.sim.baselines import PRESETS, best_static

DEFAULT_RATES = "10,20,40,80"  # req/s: a quick look, well below an 8-GPU pool's saturation
STUDY_LOADS = "0.1x,0.25x,0.5x,1x,1.5x,2x"  # docs/results: light load to 2x saturation


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim",
        help="simulate presets (vanilla, priority, split, static-pd, nitsum-static, nitsum-slow, nitsum) on a GPU pool",
        description="Discrete-event simulation of the serving policies on a modelled GPU pool. Each baseline "
        "runs at its own best static configuration (swept with hindsight per load point).",
    )
    p.add_argument(
        "--model",
        default="llama-3.1-8b",
        help="llama-3.1-8b, qwen2.5-14b, llama-3.1-70b, smollm2-135m or a config.json",
    )
    p.add_argument("--hardware", default="h100-sxm", choices=sorted(HARDWARE))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument(
        "--coefficients", default=None, help="perf-model coefficients JSON (from `nitsum profile`)"
    )
    p.add_argument("--tiers", default=None, help="tier TOML (default: the packaged gpu_tiers.toml)")
    p.add_argument(
        "--trace",
        action="append",
        default=[],
        help="PATH[:tier=frac,...] (repeatable); e.g. conv.csv:interactive=0.7,background=0.3 code.csv:agent=1. "
        "Default: the synthetic Azure-conversation workload split over the tiers",
    )
    p.add_argument("--start", type=float, default=0.0, help="seconds into the traces to start")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of trace to simulate per run")
    p.add_argument(
        "--rates",
        default=None,
        help="comma-separated total arrival rates to sweep: req/s (40), or multiples of the pool's "
        f"saturation (2x: the rate at which the simulated window offers twice the work the pool "
        f"computes with every step a full chunk). Default: {DEFAULT_RATES}",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help=f"sweep the study's load axis, light load to 2x saturation: the same as --rates {STUDY_LOADS}",
    )
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results", help="directory for results JSON, markdown and plots")
    p.add_argument(
        "--update",
        action="store_true",
        help="re-run only --presets and keep every other preset's results from the JSON already in "
        "--out (which must come from the same model, hardware, pool, tiers, traces, window, rates "
        "and seed); the markdown and plots are rewritten from the merged rows",
    )


@functools.lru_cache(maxsize=16)
def _tiered_trace(spec: str, seed: int) -> list[wl.TraceRequest]:
    """One ``PATH[:tier=frac,...]`` trace, read and tier-assigned once (a sweep rescales it per rate)."""
    path, _, mix = spec.partition(":")
    return wl.assign_tiers(
        wl.read_trace(path), wl.parse_tier_mix(mix) if mix else {"interactive": 1.0}, seed=seed
    )


def sim_workload(a: argparse.Namespace, rate: float) -> list[wl.TraceRequest]:
    """The requests ``nitsum sim`` offers at ``rate`` req/s over ``--duration`` (trace or synthetic)."""
    streams = []
    if not a.trace:
        base = wl.synthetic_azure_conv(int(rate * a.duration * 1.2) + 10, seed=a.seed)
        base = wl.assign_tiers(base, {"interactive": 0.5, "agent": 0.3, "background": 0.2}, seed=a.seed)
        return wl.window(wl.scale_rate(base, rate), 0.0, a.duration)
    total_native = 0.0
    for spec in a.trace:
        reqs = _tiered_trace(spec, a.seed)
        streams.append(reqs)
        total_native += (len(reqs) - 1) / max(1e-9, reqs[-1].arrival_s)
    # Scale every trace by the same factor so the merged stream has the requested mean rate.
    factor = rate / total_native
    scaled = [wl.scale_rate(s, (len(s) - 1) / max(1e-9, s[-1].arrival_s) * factor) for s in streams]
    return wl.window(wl.merge(*scaled), a.start, a.duration)


def run(a: argparse.Namespace) -> int:
    tiers = (
        load_tiers(a.tiers)
        if a.tiers
        else load_tiers(Path(__file__).resolve().parent.parent / "nitsum_core" / "gpu_tiers.toml")
    )
    coef = Coefficients.load(a.coefficients) if a.coefficients else Coefficients(overhead_s=2e-3)
    perf = PerfModel(model_spec(a.model), HARDWARE[a.hardware], coef)
    presets = [p.strip() for p in a.presets.split(",") if p.strip()]
    unknown = set(presets) - set(PRESETS)
    if unknown:
        raise ValueError(f"unknown presets {sorted(unknown)}; choose from {list(PRESETS)}")
    if a.sweep and a.rates is not None:
        raise ValueError(f"give --sweep (the rates {STUDY_LOADS}) or --rates, not both")
    # Resolved before anything reads it: the results JSON and --update's check record the rates.
    a.rates = STUDY_LOADS if a.sweep else a.rates or DEFAULT_RATES
    rates = _rates(a, perf)
    out = Path(a.out)
    model_name = Path(a.model).parent.name if a.model.endswith(".json") else Path(a.model).name
    stem = f"sim-{model_name}-{a.gpus}x{a.hardware}"
    kept: list[dict] = []
    timelines: dict = {}
    if a.update:
        kept, timelines = _kept_rows(out / f"{stem}.json", a, presets, rates)
    rows = []
    loads = {}
    t_start = time.perf_counter()
    for rate in rates:
        workload = sim_workload(a, rate)
        if not workload:
            raise ValueError(
                f"no request arrives in the {a.duration:g} s window at {rate:g} req/s; raise the rate or --duration"
            )
        sat = saturation(perf, a.gpus, workload)
        loads[rate] = len(workload) / a.duration / sat.rps
        stale = [r["preset"] for r in kept if r["rate"] == rate and r["requests"] != len(workload)]
        if stale:
            raise ValueError(
                f"--update: the kept {', '.join(stale)} results at {rate:g} req/s ran on another workload "
                f"(not {len(workload)} requests); re-run every preset without --update"
            )
        print(f"rate {rate:g} req/s: {len(workload)} requests, {len(workload) / a.duration:.1f} req/s offered = "
              f"{loads[rate]:.2f}x saturation ({sat.rps:.1f} req/s, TP {sat.tp} shared cut)", file=sys.stderr, flush=True)  # fmt: skip
        for name in presets:
            t0 = time.perf_counter()
            run_ = best_static(name, a.gpus, perf, tiers, workload)
            rep = run_.report
            rows.append(
                {
                    "rate": rate,
                    "preset": name,
                    "config": run_.config,
                    "configs_tried": run_.configs_tried,
                    "goodput_rps": rep.goodput_rps,
                    "goodput_per_gpu": rep.goodput_per_gpu_rps,
                    "attainment": {t.tier: t.attainment for t in rep.tiers},
                    "switches": run_.result.switches,
                    "requests": rep.requests,
                    "offered_rps": len(workload) / a.duration,
                    "saturation_rps": sat.rps,
                    "sim_seconds": time.perf_counter() - t0,
                }
            )
            if name == "nitsum":
                timelines[rate] = run_.result.timeline
            print(f"  rate {rate:>6.1f} req/s  {name:<14} goodput {rep.goodput_rps:7.2f} req/s  "
                  f"({run_.configs_tried} configs, best: {run_.config[:70]})", file=sys.stderr, flush=True)  # fmt: skip
    seconds = time.perf_counter() - t_start
    if a.update:
        ran = presets
        presets = [p for p in PRESETS if p in presets or any(r["preset"] == p for r in kept)]
        rows = sorted(kept + rows, key=lambda r: (r["rate"], presets.index(r["preset"])))
        a.presets = ",".join(presets)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {"args": vars(a), "rows": rows, "timelines": {str(k): v for k, v in timelines.items()}}, indent=2
        )
    )
    table = _markdown(a, rows, presets, rates, loads, seconds)
    if a.update:
        others = [p for p in presets if p not in ran]
        table = table.replace(
            f"simulated in {seconds:.0f} s.",
            f"{', '.join(ran)} re-run in {seconds:.0f} s, {', '.join(others)} kept from the earlier run.",
        )
    (out / f"{stem}.md").write_text(table)
    print(table)
    _plots(out / stem, rows, presets, rates, timelines)
    print(f"results in {out}/{stem}.{{json,md,png}}")
    return 0


# What must match for ``--update`` to merge new rows into an earlier run's.
_SAME_RUN = ("model", "hardware", "gpus", "coefficients", "tiers", "trace", "start", "duration", "seed")


def differing_args(before: dict, a: argparse.Namespace, keys: Sequence[str]) -> list[str]:
    """``--key value`` for each of ``keys`` whose value in an earlier run's stored arguments
    (``before``) differs from ``a``'s; tier and trace files compare as resolved paths."""

    def same(key: str) -> bool:
        old, new = before.get(key), getattr(a, key)
        if key == "tiers" and old and new:
            return Path(old).resolve() == Path(new).resolve()
        if key == "trace":
            return [Path(t).resolve() for t in old or []] == [Path(t).resolve() for t in new]
        return old == new

    return [f"--{k} {before.get(k)!r}" for k in keys if not same(k)]


def _kept_rows(
    path: Path, a: argparse.Namespace, presets: list[str], rates: list[float]
) -> tuple[list[dict], dict]:
    """The rows (and the nitsum timelines, unless nitsum is re-run) of the earlier run in ``path``
    that ``--update`` keeps: every preset not in ``presets``. Raises if that run differs from ``a``."""
    if not path.exists():
        raise ValueError(f"--update: no earlier results at {path}; run without --update first")
    earlier = json.loads(path.read_text())
    differ = differing_args(earlier["args"], a, _SAME_RUN)
    if differ:
        raise ValueError(
            f"--update: {path} comes from another run ({', '.join(differ)}); "
            "give the same arguments, or re-run every preset without --update"
        )
    kept = [r for r in earlier["rows"] if r["preset"] not in presets]
    for name in {r["preset"] for r in kept}:
        differing = sorted({r["rate"] for r in kept if r["preset"] == name} ^ set(rates))
        if differing:
            raise ValueError(
                f"--update: {path} has {name} at other rates than --rates (differing: {differing}); "
                "give the same --rates, or re-run every preset without --update"
            )
    timelines = {} if "nitsum" in presets else {float(k): v for k, v in earlier["timelines"].items()}
    return kept, timelines


def resolve_rate(a: argparse.Namespace, perf: PerfModel, spec: str) -> float:
    """One rate as req/s: ``40``, or ``<m>x``, the rate (to 0.1 req/s) whose window of ``a``'s
    workload offers m x the pool's saturation."""
    spec = spec.strip()
    if not spec.lower().endswith("x"):
        return float(spec)
    rate = rate_for_load(lambda r: sim_workload(a, r), perf, a.gpus, float(spec[:-1]), a.duration)
    return round(rate, 1)


def _rates(a: argparse.Namespace, perf: PerfModel) -> list[float]:
    """``--rates`` as req/s; an entry ``<m>x`` is the rate whose window offers m x saturation."""
    rates = []
    for spec in (s.strip() for s in a.rates.split(",") if s.strip()):
        try:
            rates.append(resolve_rate(a, perf, spec))
            if spec.lower().endswith("x"):
                print(f"{spec} saturation: --rate {rates[-1]:g}", file=sys.stderr, flush=True)
        except ValueError as e:
            raise ValueError(
                f"--rates entry {spec!r}: {e} (give req/s like 40, or a multiple of saturation like 2x)"
            ) from e
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(
            f"--rates {a.rates!r}: give positive rates in req/s (e.g. 40,100) or multiples of saturation (e.g. 0.5x,1x,2x)"
        )
    return sorted(set(rates))


def goodput_row(rate: float, load: float, goodputs: Sequence[float]) -> str:
    """One row of a sweep's goodput table: the rate, its load and each preset's goodput."""
    return f"| {rate:g} | {load:.2f}x | " + " | ".join(f"{g:.2f}" for g in goodputs) + " |"


def _markdown(
    a: argparse.Namespace,
    rows: list[dict],
    presets: list[str],
    rates: list[float],
    loads: dict[float, float],
    seconds: float,
) -> str:
    lines = [
        f"# Goodput study: {a.model} on {a.gpus}x {a.hardware}",
        "",
        f"Workload: {', '.join(a.trace) or 'synthetic Azure conversation'}; {a.duration:.0f} s per run from t={a.start:.0f} s; "
        f"simulated in {seconds:.0f} s. Goodput in req/s (requests meeting both TTFT and TPOT targets).",
        "",
        "Load is the window's offered rate as a multiple of saturation: the rate at which the mix's "
        "prompt and output tokens fill every step of the pool's highest-throughput TP cut with a "
        "full chunk (`nitsum_core.perf.saturation`).",
        "",
        "| rate (req/s) | load | " + " | ".join(presets) + " |",
        "|---:|---:|" + "---:|" * len(presets),
    ]
    for rate in rates:
        cells = [
            next(r for r in rows if r["rate"] == rate and r["preset"] == p)["goodput_rps"] for p in presets
        ]
        lines.append(goodput_row(rate, loads[rate], cells))
    lines += ["", "Best static configuration of each preset at the highest load:", ""]
    for p in presets:
        r = next(r for r in rows if r["rate"] == rates[-1] and r["preset"] == p)
        lines.append(f"- **{p}**: {r['config']} ({r['configs_tried']} tried; attainment {r['attainment']})")
    return "\n".join(lines) + "\n"


def _plots(stem: Path, rows: list[dict], presets: list[str], rates: list[float], timelines: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in presets:
        ax[0].plot(
            rates,
            [next(r for r in rows if r["rate"] == x and r["preset"] == p)["goodput_rps"] for x in rates],
            marker="o",
            label=p,
        )
    ax[0].set_xlabel("arrival rate (req/s)")
    ax[0].set_ylabel("goodput (req/s)")
    ax[0].legend(fontsize=8)
    ax[0].set_title("goodput vs load")
    top = [next(r for r in rows if r["rate"] == rates[-1] and r["preset"] == p) for p in presets]
    tier_names = sorted({t for r in top for t in r["attainment"]})
    width = 0.8 / max(1, len(tier_names))
    for i, t in enumerate(tier_names):
        ax[1].bar(
            [j + i * width for j in range(len(presets))],
            [r["attainment"].get(t, 0) for r in top],
            width,
            label=t,
        )
    ax[1].set_xticks([j + 0.4 - width / 2 for j in range(len(presets))], presets, rotation=30, fontsize=8)
    ax[1].set_ylabel(f"SLO attainment at {rates[-1]:g} req/s")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    if timelines:
        rate = max(timelines)
        tl = timelines[rate]
        fig, ax = plt.subplots(figsize=(12, 3.5))
        ts = [t for t, _, _ in tl]
        ax.plot(ts, [arr for _, _, arr in tl], color="gray", label="arrivals (req/s)")
        ax2 = ax.twinx()
        ax2.step(ts, [desc.count("TP") for _, desc, _ in tl], where="post", label="instances")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("arrivals (req/s)")
        ax2.set_ylabel("instances in the chosen cut")
        ax.set_title(f"nitsum: configuration over time at {rate:g} req/s")
        fig.tight_layout()
        fig.savefig(f"{stem}-timeline.png", dpi=110)
