"""Baselines as presets, each at its own best static configuration (swept, chosen with hindsight).

| preset        | cut of the pool                              | queues                          |
|---------------|----------------------------------------------|---------------------------------|
| vanilla       | uniform static TP, every tier everywhere     | FCFS, tier-blind (vLLM/SGLang)  |
| priority      | uniform static TP                            | by tier priority                |
| split         | static per-tier clusters (size, TP of each)  | FCFS inside a cluster           |
| static-pd     | fixed P/D split, TP per phase (DistServe)    | FCFS                            |
| nitsum-static | uniform static TP (best one)                 | feasible / best-effort / bg     |
| nitsum-slow   | re-cut every window, weights reloaded        | feasible / best-effort / bg     |
| nitsum        | re-cut every window, resident weights + KV migration | feasible / best-effort / bg |
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.capacity import valid_tp_choices
from nitsum_core.policy.cuts import uniform_cut
from nitsum_core.policy.goodput import GoodputReport, summarize
from nitsum_core.policy.plan import SHARED, Assignment, Plan, TierSet
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.sim.simulator import Preset, SimResult, Simulator
from nitsum_core.workload import TraceRequest

PRESETS: dict[str, Preset] = {
    "vanilla": Preset("vanilla", "fcfs"),
    "priority": Preset("priority", "priority"),
    "split": Preset("split", "fcfs"),
    "static-pd": Preset("static-pd", "fcfs"),
    "nitsum-static": Preset("nitsum-static", "slo"),
    "nitsum-slow": Preset("nitsum-slow", "slo", dynamic=True, switch="slow", roles=("mixed",)),
    "nitsum": Preset("nitsum", "slo", dynamic=True, switch="fast", roles=("mixed",)),
}


def uniform(pool: int, tp: int) -> Plan:
    return Plan(uniform_cut(pool, tp))


def split_clusters(pool: int, tp: int, tiers: list[str]) -> Iterator[Plan]:
    """Every way to give each tier a contiguous cluster of TP-``tp`` instances (at least one each)."""
    units = pool // tp
    if units < len(tiers):
        return
    for cuts in itertools.combinations(range(1, units), len(tiers) - 1):
        bounds = (0, *cuts, units)
        plan = []
        for tier, lo, hi in zip(tiers, bounds, bounds[1:], strict=False):
            plan += [Assignment(u * tp, tp, "mixed", TierSet.of(tier)) for u in range(lo, hi)]
        yield Plan(plan)


def split_clusters_by_degree(pool: int, tps: list[int], tiers: list[str]) -> Iterator[Plan]:
    """Every way to give each tier its own cluster of instances of one degree, the degree chosen
    per cluster (a platform team running one deployment per tier picks each one's TP), filling
    the pool. The clusters are laid out highest degree first, so every instance stays aligned."""
    for sizes in itertools.product(range(1, pool + 1), repeat=len(tiers)):
        if sum(sizes) != pool:
            continue
        for degrees in itertools.product(*([tp for tp in tps if size % tp == 0] for size in sizes)):
            plan, start = [], 0
            for tier, size, tp in sorted(zip(tiers, sizes, degrees, strict=True), key=lambda c: -c[2]):
                plan += [Assignment(s, tp, "mixed", TierSet.of(tier)) for s in range(start, start + size, tp)]
                start += size
            yield Plan(plan)


def prefill_decode(pool: int, tps: list[int]) -> Iterator[Plan]:
    """Every fixed prefill/decode split of the pool (DistServe-like), each phase at its own degree
    from ``tps``: DistServe picks the parallelism of prefill and of decode apart. The group of the
    higher degree is laid out first, so every instance stays aligned."""
    for n_pre in range(1, pool):
        for tp_pre in (tp for tp in tps if n_pre % tp == 0):
            for tp_dec in (tp for tp in tps if (pool - n_pre) % tp == 0):
                groups = [("prefill", n_pre, tp_pre), ("decode", pool - n_pre, tp_dec)]
                plan, start = [], 0
                for role, size, tp in sorted(groups, key=lambda g: -g[2]):
                    plan += [Assignment(s, tp, role, SHARED) for s in range(start, start + size, tp)]
                    start += size
                yield Plan(plan)


def candidates(name: str, pool: int, perf: PerfModel, tiers: list[str]) -> list[Plan | None]:
    """The static configurations a preset is swept over (None: dynamic, no static plan)."""
    tps = valid_tp_choices(pool, perf)
    if PRESETS[name].dynamic:
        return [None]
    if name == "split":
        return list(split_clusters_by_degree(pool, tps, tiers))
    if name == "static-pd":
        return list(prefill_decode(pool, tps))
    return [uniform(pool, tp) for tp in tps]


@dataclass
class BaselineRun:
    preset: str
    config: str
    report: GoodputReport
    result: SimResult
    configs_tried: int


def best_static(
    name: str,
    pool: int,
    perf: PerfModel,
    tiers: dict[str, Tier],
    workload: list[TraceRequest],
    **sim_kwargs: object,
) -> BaselineRun:
    """Run preset ``name`` at every candidate configuration; keep the one with the most goodput."""
    best: BaselineRun | None = None
    plans = candidates(name, pool, perf, sorted(tiers, key=lambda t: tiers[t].priority))
    for plan in plans:
        res = Simulator(perf, pool, tiers, PRESETS[name], plan, replay=PlanReplay.like, **sim_kwargs).run(
            workload
        )  # type: ignore[arg-type]
        rep = summarize(res.records, tiers, res.duration_s, pool)
        if best is None or rep.goodput_rps > best.report.goodput_rps:
            best = BaselineRun(name, plan.describe() if plan else "dynamic", rep, res, len(plans))
    assert best is not None
    return best
