"""The candidate cuts (docs/architecture.md#controller-policy): the plans the control loop weighs each window. Pure.

Uniform cuts with every instance serving every tier, hybrid cuts (a few high-TP instances for
the strictest-TPOT tier, the rest of the pool at the lowest degree for the others), in overload
the best hybrid fenced one tier per instance, and where instances may split prefill from decode
the greedy per-tier cut (``search.greedy``); and the cut a pool boots on before any traffic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.capacity import (
    over_saturation,
    predicted_goodput,
    reachable_tpot,
    shared_goodput,
    slo_safe_capacity,
    valid_tp_choices,
)
from nitsum_core.policy.plan import SHARED, Assignment, Plan, Role, TierDemand, TierSet
from nitsum_core.policy.search import greedy


def tight_and_rest(tpots: dict[str, float]) -> tuple[str, TierSet]:
    """The strictest-TPOT tier of ``tpots`` (ties by name) and the set of all the others: what a
    hybrid cut's high- and low-TP instances are for."""
    tight = min(tpots, key=lambda name: (tpots[name], name))
    return tight, TierSet.of(*(name for name in tpots if name != tight))


def uniform_cut(pool: int, tp: int) -> list[Assignment]:
    """The pool cut into TP-``tp`` instances (``tp`` divides it), every one serving every tier."""
    return [Assignment(s, tp, "mixed", SHARED) for s in range(0, pool - pool % tp, tp)]


def shared_plans(pool: int, perf: PerfModel, demands: dict[str, TierDemand]) -> list[Plan]:
    """Uniform cuts of TP k with every instance serving every tier, each with its predicted goodput."""
    plans = []
    for tp in valid_tp_choices(pool, perf):
        plans.append(Plan(uniform_cut(pool, tp), shared_goodput(perf, [tp] * (pool // tp), demands)))
    return plans


def hybrid_cut(pool: int, tp: int, n: int, base: int, rest: TierSet) -> list[Assignment]:
    """``n`` TP-``tp`` instances serving every tier, then the rest of the pool at TP ``base``
    serving only the tiers of ``rest`` (``base`` divides ``tp``, so every instance is aligned)."""
    high = [Assignment(i * tp, tp, "mixed", SHARED) for i in range(n)]
    return high + [Assignment(s, base, "mixed", rest) for s in range(n * tp, pool, base)]


HYBRID_CANDIDATES = 3  # hybrid cuts per window handed on to be scored (each replay costs time)
HYBRID_GATE = 0.5  # offer hybrids where the lowest degree serves the tight tier below this share


def hybrid_plans(
    pool: int,
    perf: PerfModel,
    demands: dict[str, TierDemand],
    keep: int = HYBRID_CANDIDATES,
    tiers: Iterable[str] = (),
) -> list[Plan]:
    """Cuts with two degrees: a few high-TP instances for the strictest-TPOT tier, the rest of the
    pool at the lowest degree for the other tiers. ``keep`` in all: the best cut of each of the
    two best degrees, then the best of the rest by predicted goodput.

    A tight TPOT target needs a high degree (a 14B model decodes within 8.5 ms at TP 2-4, not at
    TP 1), while prompt-heavy, looser tiers get the most tokens per GPU at the lowest degree. A
    uniform cut serves one of them badly (docs/simulator.md). The high-TP instances
    serve every tier, so the others' bursts can use them when the tight tier is quiet; the
    low-TP ones serve every tier but the tight one (of ``demands`` and of ``tiers``, the names
    of every configured tier), whose targets then size their steps.

    They are offered where the lowest degree gives the tight tier under ``HYBRID_GATE`` of the
    SLO-safe requests per GPU of the best higher degree. Reaching the target with one sequence
    is not enough: TP 1 decodes 8B within 6.5 ms but with no room to batch, and gating on reach
    alone made 6.5 ms worth less than 5.5 ms (277 vs 300 req/s at 2x, 8B). Where the lowest degree serves the tight tier about as well per GPU, a uniform cut
    serves every tier and hybrids only cost replays (and, in a burst, a switch).
    """
    tps = valid_tp_choices(pool, perf)
    if len(demands) < 2 or len(tps) < 2:
        return []
    tight, _ = tight_and_rest({name: d.tier.tpot_s for name, d in demands.items()})
    # A tier with no arrivals in the recent windows (the code trace is bursty) still belongs on
    # the low-TP instances: named from the demands alone, a cut fenced it out of most of the pool
    # until the loop re-cut (8B at 0.25x saturation: 52.6 req/s fenced, 55.6 not).
    rest = TierSet.of(*({*demands, *tiers} - {tight}))
    base, demand = tps[0], demands[tight]
    # The tight tier's SLO-safe rate on one instance of each degree: the gate compares it per GPU.
    cap = {tp: slo_safe_capacity(perf, tp, demand).mixed_rps for tp in tps}
    if cap[base] / base >= HYBRID_GATE * max(cap[tp] / tp for tp in tps[1:]):
        return []
    best_per_degree: list[Plan] = []
    others: list[Plan] = []
    for tp in tps[1:]:
        # Around the count the tight tier's demand needs at this degree, and never the whole
        # pool. In overload that count exceeds the pool; clamped, the cuts that give the tight
        # tier most of the pool stay on offer (14B at 2x: 2 x TP 2 + 4 x TP 1 is the best static
        # hybrid, and unclamped only cuts with one TP 2 instance were weighed).
        need = math.ceil(demand.arrival_rps / cap[tp]) if cap[tp] > 0 else 1
        need = min(need, pool // tp - 1)
        cuts = [
            hybrid_cut(pool, tp, n, base, rest)
            for n in sorted({1, need - 1, need, need + 1})
            if 1 <= n < pool // tp
        ]
        plans = [Plan(cut, predicted_goodput(perf, cut, demands)) for cut in cuts]
        if not plans:
            continue
        plans.sort(key=lambda plan: -plan.predicted_goodput_rps)
        best_per_degree.append(plans[0])
        others.extend(plans[1:])
    # One cut per degree first, so that the replay, not the roofline alone, chooses between the
    # degrees: the cuts of one degree differ only in count, which the model ranks well enough.
    best_per_degree.sort(key=lambda plan: -plan.predicted_goodput_rps)
    chosen = best_per_degree[:2]
    leftover = sorted(best_per_degree[2:] + others, key=lambda plan: -plan.predicted_goodput_rps)
    return (chosen + leftover)[:keep]


FENCE_GATE = 1.0  # offer fenced cuts where the recent arrivals bring this multiple of saturation


def fenced_cut(cut: Sequence[Assignment], demands: dict[str, TierDemand]) -> list[Assignment] | None:
    """``cut`` (a hybrid cut) with every instance fenced to one tier: its high-TP instances serve
    only the strictest-TPOT tier, and its low-TP ones are dealt to the looser tiers by their share
    of arriving tokens, at least one each (``deal_by_tokens``). None where there are fewer low-TP
    instances than looser tiers (one would get none) or the cut is not a hybrid.

    In a hybrid cut the looser tiers' bursts spill onto the high-TP instances, whose steps are
    sized for the tight TPOT, and share the low-TP ones with each other's long prompts. Fenced,
    each tier keeps its own: on 70B at 2x saturation this is the best static plan of any shape
    (TP 4 interactive, TP 2 agent, TP 2 background: 36.5 req/s against 35.4 for the hybrid). It
    starves a tier whose share moves, so it is one candidate among the others, replayed like them,
    and offered only in overload (``candidate_plans``).
    """
    high = [a for a in cut if a.tier.every]
    low = [a for a in cut if not a.tier.every]
    looser = low[0].tier.names if low else None
    if not high or not looser or len(low) < len(looser):
        return None
    tight, _ = tight_and_rest({name: d.tier.tpot_s for name, d in demands.items()})
    # A tier quiet of late (not in ``demands``) brings no tokens: it gets its one instance only.
    tokens = {name: demands[name].tokens_per_s if name in demands else 0.0 for name in looser}
    dealt = deal_by_tokens(len(low), tokens)
    return [replace(a, tier=TierSet.of(tight)) for a in high] + [
        replace(a, tier=TierSet.of(t)) for a, t in zip(low, dealt, strict=True)
    ]


def deal_by_tokens(instances: int, tokens: dict[str, float]) -> list[str]:
    """Deal ``instances`` (at least one per tier) among the tiers: one each, then the rest by
    largest remainder of each tier's share of ``tokens`` (ties to the busier tier, then by name).
    The tier with the most tokens comes first in the returned list.

    Round-robin dealing gave 8B at 2x saturation 3 agent + 3 background TP 1 instances (333.1
    req/s as a static plan) where the arrivals ask for 4 + 2 (339.1, the best static plan of any
    shape).
    """
    if not tokens or instances < len(tokens):
        raise ValueError(f"cannot deal {instances} instances to {len(tokens)} tiers with at least one each")
    order = sorted(tokens, key=lambda name: (-tokens[name], name))
    spare = instances - len(order)
    total = sum(tokens.values())
    quota = {name: spare * (tokens[name] / total if total > 0 else 1 / len(order)) for name in order}
    counts = {name: 1 + math.floor(quota[name]) for name in order}
    left = instances - sum(counts.values())
    for name in sorted(order, key=lambda name: -(quota[name] - math.floor(quota[name])))[:left]:
        counts[name] += 1
    return [name for name in order for _ in range(counts[name])]


def candidate_plans(
    pool: int,
    perf: PerfModel,
    demands: dict[str, TierDemand],
    roles: Sequence[Role] = ("mixed", "prefill", "decode"),
    tiers: Iterable[str] = (),
) -> list[Plan]:
    """Every plan the configurator weighs: each shared uniform cut, the best hybrid cuts, in
    overload the best hybrid fenced one tier per instance (``fenced_cut``), and (where instances
    may split prefill from decode) the per-tier greedy cut. ``tiers`` names every configured
    tier, so that hybrid cuts serve tiers quiet of late too.

    Shared cuts pool the capacity (no GPU idles while another tier queues); hybrid cuts give a
    tight-TPOT tier high-TP instances and the rest of the pool the lowest degree.
    ``control_loop.ControlLoop`` picks among them by replay or calibrated prediction. With mixed
    instances only (``roles``; the serving path until prefill->decode hand-off is built) the
    greedy's per-tier cut is left out: it fences the looser tiers apart, and a cut that fits one
    window's mix starves a tier when the mix moves (14B at 1x saturation with an 8 ms tier: 85.1
    req/s with it, 94.2 without).
    """
    hybrids = hybrid_plans(pool, perf, demands, tiers=tiers)
    plans = [*shared_plans(pool, perf, demands), *hybrids]
    # Fencing pays only where the pool cannot serve everyone; below saturation the shared high-TP
    # instances absorb a looser tier's burst, and a fenced cut starves it (14B at 0.5x: 61.8
    # req/s offered it, 64.3 not; 70B 15.9 vs 16.8).
    overloaded = bool(hybrids) and over_saturation(pool, perf, demands) >= FENCE_GATE
    fenced = fenced_cut(hybrids[0].assignments, demands) if overloaded else None
    if fenced:
        plans.append(Plan(fenced, predicted_goodput(perf, fenced, demands)))
    if any(role != "mixed" for role in roles):
        plans.append(greedy(pool, perf, demands, roles=roles))
    return plans


def boot_plan(pool: int, perf: PerfModel, tiers: dict[str, Tier]) -> Plan:
    """The cut a pool boots on before any request has arrived, from the tier targets alone.

    The smallest degree the model fits at, every instance serving every tier, where that degree
    can decode within every tier's TPOT target. Where it cannot decode the strictest one at all
    (its smallest decode step is above the target), one instance of the smallest degree that can
    serves every tier and the rest of the pool, at the smallest degree, the others (a hybrid cut
    with one high-TP instance): no tier boots on a cut that cannot serve it. How many instances
    the tight tier needs depends on the traffic, which the control loop sees from its first
    window on; this cut is its placeholder until then.
    """
    tps = valid_tp_choices(pool, perf) or [1]
    base = tps[0]
    if len(tiers) < 2:
        return Plan(uniform_cut(pool, base))
    tight, rest = tight_and_rest({name: t.tpot_s for name, t in tiers.items()})
    reaching = [tp for tp in tps if reachable_tpot(perf, tp, [tiers[tight].tpot_s]) is not None]
    # Where no degree meets it, the tier runs best-effort wherever it lands.
    if not reaching or reaching[0] == base:
        return Plan(uniform_cut(pool, base))
    return Plan(hybrid_cut(pool, reaching[0], 1, base, rest))  # the whole pool where that is one instance
