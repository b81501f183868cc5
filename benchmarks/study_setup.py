"""Shared command line and set-up of the study benchmarks (one simulated load point).

The arguments mirror `nitsum sim` (model, hardware, pool, one rate, traces with tier fractions,
tiers); the perf model is the nominal roofline with the 2 ms step overhead the study uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nitsum_cli.sim import resolve_rate, sim_workload
from nitsum_core.config import Tier, load_tiers
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.workload import TraceRequest

GPU_TIERS = Path(__file__).resolve().parents[1] / "libs" / "nitsum_core" / "gpu_tiers.toml"


def add_study_args(p: argparse.ArgumentParser, rate: float, out: str) -> None:
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--hardware", default="h100-sxm", choices=sorted(HARDWARE))
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument(
        "--rate",
        type=parse_rate,
        default=rate,
        help="req/s, or a multiple of the pool's saturation like 2x (as `nitsum sim --rates`)",
    )
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--tiers", default=None, help="tier TOML (default: the packaged gpu_tiers.toml)")
    p.add_argument("--trace", action="append", default=[], help="PATH[:tier=frac,...] as for `nitsum sim`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)


def parse_rate(text: str) -> float | str:
    """A `--rate` value: req/s as a float, or a multiple of saturation ('2x') kept as text."""
    return text if text.strip().lower().endswith("x") else float(text)


def load_study(a: argparse.Namespace) -> tuple[list[TraceRequest], dict[str, Tier], PerfModel]:
    """The workload, tiers and perf model of one load point; a ``--rate`` given as a multiple of
    saturation is replaced by the req/s it comes to."""
    a.start = 0.0
    tiers = load_tiers(a.tiers or GPU_TIERS)
    perf = PerfModel(model_spec(a.model), HARDWARE[a.hardware], Coefficients(overhead_s=2e-3))
    if isinstance(a.rate, str):
        a.rate = resolve_rate(a, perf, a.rate)
    return sim_workload(a, a.rate), tiers, perf
