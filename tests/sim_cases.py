"""Tiers, plans, a performance model and workloads the simulator tests share."""

from __future__ import annotations

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.policy.goodput import RequestRecord
from nitsum_core.policy.plan import SHARED, Assignment, Plan
from nitsum_core.sim.simulator import Preset, Simulator
from nitsum_core.workload import TraceRequest, assign_tiers, scale_rate, synthetic_azure_conv

TIERS = {
    "interactive": Tier("interactive", 0.5, 0.03, 0),
    "agent": Tier("agent", 2.0, 0.05, 1),
    "background": Tier("background", 30.0, 0.2, 2),
}
STUDY_TIERS = {  # the 8B study's (gpu_tiers.toml): TP 1 cannot decode within interactive's 5.5 ms
    "interactive": Tier("interactive", 0.3, 0.0055, 0),
    "agent": Tier("agent", 1.0, 0.03, 1),
    "background": Tier("background", 10.0, 0.1, 2),
}
STATIC4 = Plan([Assignment(0, 2, "mixed", SHARED), Assignment(2, 2, "mixed", SHARED)])
ONE_GPU = Plan([Assignment(0, 1, "mixed", SHARED)])
SLO = Preset("nitsum-static", queue_order="slo")


def perf_model() -> PerfModel:
    return PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"], Coefficients(overhead_s=2e-3))


def workload(n: int, rate: float, seed: int = 0) -> list[TraceRequest]:
    reqs = synthetic_azure_conv(n, seed=seed)
    return assign_tiers(
        scale_rate(reqs, rate), {"interactive": 0.5, "agent": 0.3, "background": 0.2}, seed=seed
    )


def on_one_gpu(wl: list[TraceRequest], preset: Preset = SLO, **sim_kwargs: int) -> list[RequestRecord]:
    """Each request's record after ``wl`` ran on one TP-1 instance with ``preset``'s scheduler."""
    return Simulator(perf_model(), 1, TIERS, preset, ONE_GPU, **sim_kwargs).run(wl).records
