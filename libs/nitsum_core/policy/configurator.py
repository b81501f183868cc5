"""The configurator (DESIGN §1, §7): how to cut the pool this window. Pure and clock-free.

Given each tier's recent demand (arrival rate, length mix) and the performance model, it scores
every option (tier x TP x role) by SLO-safe requests/s per GPU, capped by what actually arrives
and weighted by the tier's starvation factor (arrivals / served), and hands out GPUs one aligned
TP-sized group at a time. ``exhaustive`` searches every aligned partition for small pools and is
the yardstick for the greedy search. ``should_switch`` is the hysteresis against switching cost.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Literal, NamedTuple

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.perf.saturation import saturation_tokens_per_s

Role = Literal["mixed", "prefill", "decode"]


@dataclass(frozen=True)
class TierDemand:
    """What one tier asked for in the last window."""

    tier: Tier
    arrival_rps: float
    mean_prompt: float
    mean_output: float
    served_rps: float | None = None  # None: assume served as much as arrived

    @property
    def tokens_per_s(self) -> float:
        """Prompt and output tokens per second this tier brings."""
        return self.arrival_rps * (self.mean_prompt + self.mean_output)

    @property
    def starvation(self) -> float:
        """arrivals / served (>= 1): a tier that got less than it asked for weighs more."""
        if self.served_rps is None or self.arrival_rps <= 0:
            return 1.0
        return max(1.0, self.arrival_rps / max(self.served_rps, 1e-3))


class Capacity(NamedTuple):
    """SLO-safe request rates of one instance for one tier, by role."""

    prefill_rps: float
    decode_rps: float
    mixed_rps: float


@dataclass(frozen=True)
class Assignment:
    """An instance: aligned slots [start, start + tp), its role and the tier it serves."""

    start: int
    tp: int
    role: Role
    tier: str

    @property
    def slots(self) -> list[int]:
        return list(range(self.start, self.start + self.tp))


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    predicted_goodput_rps: float = 0.0

    def describe(self) -> str:
        return ", ".join(f"[{a.start}:{a.start + a.tp}] TP{a.tp} {a.role} {a.tier}" for a in self.assignments)


def _max_decode_batch(
    perf: PerfModel, tp: int, tpot_s: float, ctx_per_seq: float, kv_tokens_per_seq: float
) -> int:
    """Largest decode batch whose step time stays within the TPOT target and whose KV fits."""
    kv_cap = perf.kv_capacity_tokens(tp)
    hi = max(1, int(kv_cap // max(1.0, kv_tokens_per_seq)))
    if perf.step_time(tp, 0, 1, int(ctx_per_seq)) > tpot_s:
        return 0
    lo = 1
    while lo < hi:  # step time grows with the batch: binary search the last feasible size
        mid = (lo + hi + 1) // 2
        if perf.step_time(tp, 0, mid, int(mid * ctx_per_seq)) <= tpot_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def slo_safe_capacity(perf: PerfModel, tp: int, demand: TierDemand) -> Capacity:
    """The request rates a TP-``tp`` instance can prefill and decode for this tier within its SLO."""
    tier = demand.tier
    prompt, output = max(1.0, demand.mean_prompt), max(1.0, demand.mean_output)
    # Prefill as an M/D/1 queue: wait = rho * t / (2 (1 - rho)); need t + wait <= TTFT target.
    t_pre = perf.step_time(tp, int(prompt), 0, 0)
    if t_pre >= tier.ttft_s:
        pre = 0.0
    else:
        rho = 2 * (tier.ttft_s - t_pre) / (2 * tier.ttft_s - t_pre)
        pre = min(rho, 0.95) / t_pre
    # Decode: B sequences in flight, each needing ``output`` steps of at most the TPOT target.
    batch = _max_decode_batch(perf, tp, tier.tpot_s, prompt + output / 2, prompt + output)
    if not batch:
        return Capacity(pre, 0.0, 0.0)
    step = perf.step_time(tp, 0, batch, int(batch * (prompt + output / 2)))
    dec = batch / (step * output)
    # Mixed: prefills run inside decode steps and stretch them. With a fraction lam * t_pre of
    # the time spent prefilling, TPOT grows to step / (1 - lam * t_pre); keep that within target
    # (at the smallest step) and keep decode throughput over the remaining time.
    if pre == 0.0:
        return Capacity(0.0, dec, 0.0)
    smallest = perf.step_time(tp, 0, 1, int(prompt + output / 2))
    interference = max(0.0, 1.0 - smallest / tier.tpot_s) / t_pre
    mixed = min(pre, interference, dec / (1.0 + dec * t_pre))
    return Capacity(pre, dec, mixed)


def plan_goodput(
    assignments: Iterable[Assignment], caps: dict[tuple[str, int], Capacity], demands: dict[str, TierDemand]
) -> float:
    """Predicted goodput: per tier, min(arrivals, what its instances can serve within SLO)."""
    mixed: dict[str, float] = {}
    pre: dict[str, float] = {}
    dec: dict[str, float] = {}
    for a in assignments:
        cap = caps[(a.tier, a.tp)]
        if a.role == "mixed":
            mixed[a.tier] = mixed.get(a.tier, 0.0) + cap.mixed_rps
        elif a.role == "prefill":
            pre[a.tier] = pre.get(a.tier, 0.0) + cap.prefill_rps
        else:
            dec[a.tier] = dec.get(a.tier, 0.0) + cap.decode_rps
    total = 0.0
    for name, d in demands.items():
        served = mixed.get(name, 0.0) + min(pre.get(name, 0.0), dec.get(name, 0.0))
        total += min(d.arrival_rps, served)
    return total


SHARED = "*"  # an instance serving every tier (the SLO-ordered queues sort them out inside it)
TIER_SEP = "+"  # an instance serving some tiers: their names joined, e.g. "agent+background"


def tier_set(spec: str) -> frozenset[str] | None:
    """The tiers an assignment's ``tier`` names: None for ``SHARED`` (every tier)."""
    return None if spec == SHARED else frozenset(spec.split(TIER_SEP))


def serves(spec: str, tier: str) -> bool:
    """Whether an instance whose assignment names ``spec`` takes requests of ``tier``."""
    return spec in (SHARED, tier) or (TIER_SEP in spec and tier in spec.split(TIER_SEP))


def join_tiers(tiers: Iterable[str]) -> str:
    """The ``tier`` of an assignment serving ``tiers`` (sorted, so one set has one name)."""
    return TIER_SEP.join(sorted(tiers))


def smallest_decode_step(perf: PerfModel, tp: int) -> float:
    """The fastest step a TP-``tp`` instance can take while decoding: one sequence, no context.
    No TPOT target below it can be met at that degree."""
    return perf.step_time(tp, 0, 1, 0)


def tight_and_rest(tpots: dict[str, float]) -> tuple[str, str]:
    """The strictest-TPOT tier of ``tpots`` (ties by name) and the assignment ``tier`` naming
    all the others: what a hybrid cut's high- and low-TP instances are for."""
    tight = min(tpots, key=lambda name: (tpots[name], name))
    return tight, join_tiers(name for name in tpots if name != tight)


def reachable_tpot(perf: PerfModel, tp: int, targets: Iterable[float]) -> float | None:
    """The strictest of ``targets`` a TP-``tp`` instance can meet at all, None if none.

    A target below the instance's smallest decode step (one sequence, no context) cannot be met
    there at any batch size. Bounding every step by it would idle the instance for the tiers it
    can serve (a TP 1 instance of a 14B model cannot decode within 8 ms, and so served nothing),
    so such a tier's requests run there best-effort and the steps are sized for the others.
    """
    floor = smallest_decode_step(perf, tp)
    reachable = [t for t in targets if t >= floor]
    return min(reachable) if reachable else None


def shared_caps(perf: PerfModel, tp: int, demands: dict[str, TierDemand]) -> dict[str, float]:
    """Each tier's SLO-safe mixed rate on a TP-``tp`` instance that serves every tier in ``demands``.

    A shared instance runs at the strictest TPOT target among the tiers it serves that it can
    reach (``reachable_tpot``; its seat cap and prefill chunks are sized for it), so every tier's
    capacity there is computed with that target and the tier's own TTFT target and lengths. A
    tier it cannot reach gets 0.
    """
    strict = reachable_tpot(perf, tp, (d.tier.tpot_s for d in demands.values()))
    return {
        name: 0.0
        if strict is None or d.tier.tpot_s < strict
        else slo_safe_capacity(perf, tp, replace(d, tier=replace(d.tier, tpot_s=strict))).mixed_rps
        for name, d in demands.items()
    }


def shared_goodput(perf: PerfModel, tps: Sequence[int], demands: dict[str, TierDemand]) -> float:
    """Predicted goodput of shared instances (every tier on every instance) of the given degrees.

    Each request of tier t costs 1 / cap_t instance-seconds on a TP-k instance (cap_t from
    ``shared_caps``: the tier's SLO-safe mixed rate under the strictest TPOT the instance runs at).
    A tier no instance can serve within its SLO contributes nothing and is not charged.
    """
    total = 0.0
    count = {tp: list(tps).count(tp) for tp in set(tps)}
    for tp, n in count.items():
        caps = shared_caps(perf, tp, demands)
        # Instance-seconds per second of arrivals, over the tiers this degree can serve.
        cost = sum(d.arrival_rps / caps[name] for name, d in demands.items() if caps[name] > 0)
        served = sum(d.arrival_rps for name, d in demands.items() if caps[name] > 0)
        if cost > 0:
            # These n instances' worth of capacity: their share of the feasible arrivals.
            total += served * min(n / len(tps), n / cost)
    return total


def uniform_cut(pool: int, tp: int) -> list[Assignment]:
    """The pool cut into TP-``tp`` instances (``tp`` divides it), every one serving every tier."""
    return [Assignment(s, tp, "mixed", SHARED) for s in range(0, pool - pool % tp, tp)]


def shared_plans(pool: int, perf: PerfModel, demands: dict[str, TierDemand]) -> list[Plan]:
    """Uniform cuts of TP k with every instance serving every tier, each with its predicted goodput."""
    plans = []
    for tp in valid_tp_choices(pool, perf):
        plans.append(Plan(uniform_cut(pool, tp), shared_goodput(perf, [tp] * (pool // tp), demands)))
    return plans


def predicted_goodput(
    perf: PerfModel, assignments: Sequence[Assignment], demands: dict[str, TierDemand]
) -> float:
    """Predicted goodput of any plan: per-tier instances via ``plan_goodput``, shared ones on the mix."""
    shared = [a for a in assignments if a.tier == SHARED]
    per_tier = [a for a in assignments if a.tier in demands]
    if any(TIER_SEP in a.tier for a in assignments) or (shared and per_tier):
        # Instances of different tier sets side by side: what the budgets hand out is served.
        caps = admission_caps(perf, assignments, demands)
        return sum(min(d.arrival_rps, caps[name]) for name, d in demands.items())
    if shared:
        return shared_goodput(perf, [a.tp for a in shared], demands)
    caps = _capacities(perf, demands, sorted({a.tp for a in per_tier}) or [1])
    return plan_goodput(per_tier, caps, demands)


def admission_caps(
    perf: PerfModel, assignments: Sequence[Assignment], demands: dict[str, TierDemand]
) -> dict[str, float]:
    """Per tier, the arrival rate the current plan can serve within SLO (the feasible budget).

    The router policy admits a tier's requests as *feasible* up to this rate per window and sends
    the rest to the best-effort queue behind them, so an overload queues the excess instead of
    making every request late. Per-tier instances add their tier's capacity; shared instances
    hand out their instance-seconds to tiers in order of goodput per instance-second (cheapest
    requests first), which is what maximises goodput when the pool cannot serve everything.
    """
    # Every demanded tier gets a budget; 0 where this plan cannot serve it within SLO (all of its
    # requests are then best-effort), never "no budget", which the lane policy reads as unlimited.
    caps: dict[str, float] = dict.fromkeys(demands, 0.0)
    shared: dict[tuple[int, str], int] = {}  # (degree, tiers served) -> mixed instances
    for a in assignments:
        if a.tier == SHARED or TIER_SEP in a.tier:
            if a.role == "mixed":
                shared[(a.tp, a.tier)] = shared.get((a.tp, a.tier), 0) + 1
            continue
        d = demands.get(a.tier)
        if d is None:
            continue
        cap = slo_safe_capacity(perf, a.tp, d)
        rate = cap.mixed_rps if a.role == "mixed" else cap.prefill_rps if a.role == "prefill" else 0.0
        caps[a.tier] = caps.get(a.tier, 0.0) + rate
    # Instances serving fewer tiers hand out their time first, and a group serves first the tiers
    # that fewer groups can take: the tiers the narrow groups do not serve can only use the broad
    # ones (a high-TP instance for every tier is the tight tier's only place in a hybrid cut).
    options = {name: sum(serves(spec, name) for _, spec in shared) for name in demands}
    for (tp, spec), n in sorted(
        shared.items(), key=lambda kv: (kv[0][1] == SHARED, kv[0][1].count(TIER_SEP))
    ):
        per_tier = shared_caps(perf, tp, {t: d for t, d in demands.items() if serves(spec, t)})
        left = float(n)  # instance-seconds per second
        for name in sorted(per_tier, key=lambda t: (options[t], -per_tier[t])):
            cap = per_tier[name]
            if cap <= 0 or left <= 0:
                continue
            take = min(demands[name].arrival_rps - caps.get(name, 0.0), left * cap)
            if take > 0:
                caps[name] = caps.get(name, 0.0) + take
                left -= take / cap
    return caps


def plan_shape(assignments: Iterable[Assignment]) -> set[tuple[int, int, str]]:
    """The instances' slots, degrees and roles: what a switch must move to change. Two plans of
    one shape differ only in which tiers instances serve, a switch that pauses nothing."""
    return {(a.start, a.tp, a.role) for a in assignments}


def plan_family(assignments: Sequence[Assignment]) -> str:
    """A coarse name for what kind of plan this is, for learning from how such plans did.

    Per-tier cuts change shape with every window's demand, so experience is kept per family:
    each uniform shared degree, per-tier cuts of mixed instances, and per-tier cuts that split
    prefill from decode (whose hand-offs the capacity model knows least about).
    """
    if assignments and all(a.tier == SHARED for a in assignments):
        return "shared-tp" + "-".join(str(t) for t in sorted({a.tp for a in assignments}))
    if any(TIER_SEP in a.tier for a in assignments):
        return "hybrid-tp" + "-".join(str(t) for t in sorted({a.tp for a in assignments}))
    return "per-tier-pd" if any(a.role != "mixed" for a in assignments) else "per-tier"


def hybrid_cut(pool: int, tp: int, n: int, base: int, rest: str) -> list[Assignment]:
    """``n`` TP-``tp`` instances serving every tier, then the rest of the pool at TP ``base``
    serving only the tiers named ``rest`` (``base`` divides ``tp``, so every instance is aligned)."""
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
    uniform cut serves one of them badly (docs/simulator.md, round 16). The high-TP instances
    serve every tier, so the others' bursts can use them when the tight tier is quiet; the
    low-TP ones serve every tier but the tight one (of ``demands`` and of ``tiers``, the names
    of every configured tier), whose targets then size their steps.

    They are offered where the lowest degree gives the tight tier under ``HYBRID_GATE`` of the
    SLO-safe requests per GPU of the best higher degree. Reaching the target with one sequence
    is not enough: TP 1 decodes 8B within 6.5 ms but with no room to batch, and gating on reach
    alone made 6.5 ms worth less than 5.5 ms (277 vs 300 req/s at 2x; docs/simulator.md round
    19). Where the lowest degree serves the tight tier about as well per GPU, a uniform cut
    serves every tier and hybrids only cost replays (and, in a burst, a switch).
    """
    tps = valid_tp_choices(pool, perf)
    if len(demands) < 2 or len(tps) < 2:
        return []
    tight, _ = tight_and_rest({name: d.tier.tpot_s for name, d in demands.items()})
    # A tier with no arrivals in the recent windows (the code trace is bursty) still belongs on
    # the low-TP instances: named from the demands alone, a cut fenced it out of most of the pool
    # until the loop re-cut (8B at 0.25x saturation: 52.6 req/s fenced, 55.6 not; round 19).
    rest = join_tiers({*demands, *tiers} - {tight})
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


def over_saturation(pool: int, perf: PerfModel, demands: dict[str, TierDemand]) -> float:
    """The recent arrivals' tokens per second as a multiple of what the pool computes with every
    step full (``saturation.saturation_tokens_per_s``): above 1, not every request can be served."""
    arriving = sum(d.tokens_per_s for d in demands.values())
    try:
        return arriving / saturation_tokens_per_s(perf, pool)[0]
    except ValueError:  # no degree holds a full chunk of KV: saturation is not defined there
        return 0.0


def fenced_cut(cut: Sequence[Assignment], demands: dict[str, TierDemand]) -> list[Assignment] | None:
    """``cut`` (a hybrid cut) with every instance fenced to one tier: its high-TP instances serve
    only the strictest-TPOT tier, and its low-TP ones are dealt to the looser tiers by their share
    of arriving tokens, at least one each (``deal_by_tokens``). None where there are fewer low-TP
    instances than looser tiers (one would get none) or the cut is not a hybrid.

    In a hybrid cut the looser tiers' bursts spill onto the high-TP instances, whose steps are
    sized for the tight TPOT, and share the low-TP ones with each other's long prompts. Fenced,
    each tier keeps its own: on 70B at 2x saturation this is the best static plan of any shape
    (TP 4 interactive, TP 2 agent, TP 2 background: 36.5 req/s against 35.4 for the hybrid;
    docs/simulator.md round 23). It starves a tier whose share moves, so it is one candidate
    among the others, replayed like them, and offered only in overload (``candidate_plans``).
    """
    high = [a for a in cut if a.tier == SHARED]
    low = [a for a in cut if a.tier != SHARED]
    looser = tier_set(low[0].tier) if low else None
    if not high or not looser or len(low) < len(looser):
        return None
    tight, _ = tight_and_rest({name: d.tier.tpot_s for name, d in demands.items()})
    # A tier quiet of late (not in ``demands``) brings no tokens: it gets its one instance only.
    tokens = {name: demands[name].tokens_per_s if name in demands else 0.0 for name in looser}
    dealt = deal_by_tokens(len(low), tokens)
    return [replace(a, tier=tight) for a in high] + [
        replace(a, tier=t) for a, t in zip(low, dealt, strict=True)
    ]


def deal_by_tokens(instances: int, tokens: dict[str, float]) -> list[str]:
    """Deal ``instances`` (at least one per tier) among the tiers: one each, then the rest by
    largest remainder of each tier's share of ``tokens`` (ties to the busier tier, then by name).
    The tier with the most tokens comes first in the returned list.

    Round-robin dealing gave 8B at 2x saturation 3 agent + 3 background TP 1 instances (333.1
    req/s as a static plan) where the arrivals ask for 4 + 2 (339.1, the best static plan of any
    shape; docs/simulator.md round 24).
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
    req/s with it, 94.2 without; docs/simulator.md round 16).
    """
    hybrids = hybrid_plans(pool, perf, demands, tiers=tiers)
    plans = [*shared_plans(pool, perf, demands), *hybrids]
    # Fencing pays only where the pool cannot serve everyone; below saturation the shared high-TP
    # instances absorb a looser tier's burst, and a fenced cut starves it (14B at 0.5x: 61.8
    # req/s offered it, 64.3 not; 70B 15.9 vs 16.8; docs/simulator.md round 23).
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


def _capacities(
    perf: PerfModel, demands: dict[str, TierDemand], tp_choices: Sequence[int]
) -> dict[tuple[str, int], Capacity]:
    return {(n, tp): slo_safe_capacity(perf, tp, d) for n, d in demands.items() for tp in tp_choices}


def valid_tp_choices(pool: int, perf: PerfModel, max_tp: int = 8) -> list[int]:
    """Powers of two that divide the pool and the model's KV heads (no head padding here)."""
    out = []
    tp = 1
    while tp <= min(pool, max_tp):
        if pool % tp == 0 and perf.model.num_kv_heads % tp == 0 and perf.kv_capacity_tokens(tp) > 0:
            out.append(tp)
        tp *= 2
    return out


class _Buddy:
    """Aligned free blocks of the pool: a TP-k instance takes slots [j*k, (j+1)*k).

    Slots are only taken during a pass, never freed, so the lowest free aligned block of each
    size only moves forward: a cursor per size makes every scan amortised O(pool) per pass.
    """

    def __init__(self, pool: int) -> None:
        self.free = [True] * pool
        self._cursor: dict[int, int] = {}

    def find(self, tp: int) -> int | None:
        start = self._cursor.get(tp, 0)
        while start + tp <= len(self.free):
            if all(self.free[start : start + tp]):
                self._cursor[tp] = start
                return start
            start += tp
        self._cursor[tp] = start
        return None

    def take(self, start: int, tp: int) -> None:
        for i in range(start, start + tp):
            self.free[i] = False


_Pick = tuple[int, int, Role, str]  # (start, tp, role, tier): an Assignment before it is built


def _greedy_pass(
    pool: int, demands: dict[str, TierDemand], tps: Sequence[int], roles: Sequence[Role], caps
) -> tuple[list[_Pick], float]:  # noqa: ANN001
    """One greedy pass. Each tier needs its arrival rate twice over -- prefill capacity and
    decode capacity; a mixed instance supplies both, a prefill or decode one supplies one. An
    option's gain is the demand it newly covers (averaged over the two), per GPU, times the
    tier's starvation factor; so a prefill-heavy tier gets one decode group and many prefill
    groups, and a light tier gets the smallest group that meets its SLO.

    Returns the picks as plain tuples and their predicted goodput: ``greedy`` builds
    ``Assignment`` objects only for the winning pass (at 128 GPUs that halves the decision time).
    """
    buddy = _Buddy(pool)
    chosen: list[_Pick] = []
    need_p = {n: d.arrival_rps for n, d in demands.items()}
    need_d = dict(need_p)
    weight = {n: d.starvation for n, d in demands.items()}
    # (prefill, decode) capacity each role supplies, per (tier, tp): computed once per pass.
    supply = {
        key: [
            (role, c.mixed_rps if role == "mixed" else c.prefill_rps if role == "prefill" else 0.0,
             c.mixed_rps if role == "mixed" else c.decode_rps if role == "decode" else 0.0)
            for role in roles
        ]
        for key, c in caps.items()
    }  # fmt: skip
    # What the picks supply per tier, accumulated as they are made: the pass's goodput at the end.
    got_p_total = dict.fromkeys(demands, 0.0)
    got_d_total = dict.fromkeys(demands, 0.0)
    while True:
        best: tuple[float, str, int, Role, float, float] | None = None
        starts = {tp: buddy.find(tp) for tp in tps}
        for name in demands:
            np_, nd_ = need_p[name], need_d[name]
            if np_ <= 0 and nd_ <= 0:
                continue
            for tp in tps:
                if starts[tp] is None:
                    continue
                for role, p, q in supply[(name, tp)]:
                    got_p, got_d = min(p, np_), min(q, nd_)
                    score = (got_p + got_d) / 2 * weight[name] / tp
                    if score > 1e-12 and (best is None or score > best[0]):
                        best = (score, name, tp, role, got_p, got_d)
        if best is None:
            break
        _, name, tp, role, got_p, got_d = best
        full_p, full_d = next((p, q) for r, p, q in supply[(name, tp)] if r == role)
        start: int | None = starts[tp]
        # Take the same option again while it still gets its full capacity: its score is then
        # unchanged and no other option's score rose, so the scan would pick it again anyway.
        while start is not None:
            chosen.append((start, tp, role, name))
            buddy.take(start, tp)
            need_p[name] -= got_p
            need_d[name] -= got_d
            got_p_total[name] += full_p
            got_d_total[name] += full_d
            if need_p[name] < full_p or need_d[name] < full_d or (got_p, got_d) != (full_p, full_d):
                break
            start = buddy.find(tp)
    # Idle slots serve the most demanded tier as mixed instances of the smallest degree this pass
    # allows (capacity is never wasted; a model too big for one GPU never gets a TP-1 instance).
    if demands and tps:
        busiest = max(demands.values(), key=lambda d: d.arrival_rps * d.starvation).tier.name
        smallest = min(tps)
        mixed = caps[(busiest, smallest)].mixed_rps
        while (start := buddy.find(smallest)) is not None:
            chosen.append((start, smallest, "mixed", busiest))
            buddy.take(start, smallest)
            got_p_total[busiest] += mixed
            got_d_total[busiest] += mixed
    # Same sum as ``plan_goodput``: a tier's served rate is what both of its halves can carry.
    goodput = sum(min(d.arrival_rps, got_p_total[n], got_d_total[n]) for n, d in demands.items())
    return chosen, goodput


def greedy(
    pool: int,
    perf: PerfModel,
    demands: dict[str, TierDemand],
    tp_choices: Sequence[int] | None = None,
    roles: Sequence[Role] = ("mixed", "prefill", "decode"),
) -> Plan:
    """DESIGN §1's greedy search: best marginal goodput per GPU, one aligned group at a time.

    Run once per cap on the largest TP (a few passes; each is linear in the pool) and keep the
    best: a pass that may take a large group early can fragment the pool for the rest. A pass
    whose largest pick is below its cap never chose the larger degrees, so a lower cap down to
    that pick would repeat it exactly: those caps are skipped.
    """
    tps = sorted(tp_choices or valid_tp_choices(pool, perf), reverse=True)
    caps = _capacities(perf, demands, tps)
    best: tuple[list[_Pick], float] | None = None
    cap: int | None = tps[0] if tps else None
    while cap is not None:
        picks, goodput = _greedy_pass(pool, demands, [t for t in tps if t <= cap], roles, caps)
        if best is None or goodput > best[1]:
            best = (picks, goodput)
        largest = max((tp for _, tp, _, _ in picks), default=cap)  # never above the cap
        cap = next((t for t in tps if t < largest), None)
    if best is None:
        return Plan()
    picks, goodput = best
    return Plan([Assignment(s, tp, role, name) for s, tp, role, name in sorted(picks)], goodput)


def aligned_partitions(pool: int, tps: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Every way to cut [0, pool) into aligned blocks of the given sizes, as (start, tp) lists."""

    @cache
    def cut(start: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        if start == pool:
            return ((),)
        out = []
        for tp in tps:
            if start % tp == 0 and start + tp <= pool:
                out.extend(((start, tp), *rest) for rest in cut(start + tp))
        return tuple(out)

    return [list(p) for p in cut(0)]


def exhaustive(
    pool: int,
    perf: PerfModel,
    demands: dict[str, TierDemand],
    tp_choices: Sequence[int] | None = None,
    roles: Sequence[Role] = ("mixed", "prefill", "decode"),
) -> Plan:
    """The optimum over every aligned partition and every (tier, role) per instance (pool <= 8)."""
    if pool > 8:
        raise ValueError("exhaustive search is for pools of at most 8 slots")
    tps = sorted(tp_choices or valid_tp_choices(pool, perf))
    caps = _capacities(perf, demands, tps)
    labels = [(t, r) for t in demands for r in roles]
    best = Plan()
    for part in aligned_partitions(pool, tps):
        for choice in itertools.product(labels, repeat=len(part)):
            plan = [Assignment(s, tp, r, t) for (s, tp), (t, r) in zip(part, choice, strict=True)]
            g = plan_goodput(plan, caps, demands)
            if g > best.predicted_goodput_rps + 1e-12:
                best = Plan(plan, g)
    return best


def should_switch(
    current_rps: float,
    proposed_rps: float,
    switch_pause_s: float,
    window_s: float,
    margin: float = 0.1,
    observed_current: float | None = None,
    observed_proposed: float | None = None,
) -> bool:
    """Hysteresis: switch only for a clear predicted gain (``margin``: window-to-window demand
    estimates are noisy, and flapping between near-equal plans only pays pauses) that also
    beats what the pause costs -- unless experience says otherwise: when both plans have run
    before, their observed SLO attainment (goodput per arrival) overrules the prediction."""
    if (
        observed_current is not None
        and observed_proposed is not None
        and observed_proposed <= observed_current
    ):
        return False
    if proposed_rps <= current_rps * (1.0 + margin):
        return False
    return (proposed_rps - current_rps) * window_s > current_rps * switch_pause_s
