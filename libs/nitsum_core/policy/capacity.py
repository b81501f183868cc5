"""The capacity model (docs/architecture.md#controller-policy): what an instance of each TP degree can serve within SLO.

Pure and clock-free. Per (tier, degree, role) the SLO-safe request rate from the performance
model's step times (prefill as an M/D/1 queue within the TTFT target, decode batches within the
TPOT target and the KV, mixed with prefill interference), the TPOT targets a degree can reach at
all, and from these the predicted goodput of a plan and the admission budgets it hands the routers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import NamedTuple

from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.perf.saturation import saturation_tokens_per_s
from nitsum_core.policy.batching import largest_chunk, strictest_reachable
from nitsum_core.policy.plan import Assignment, TierDemand, TierSet, serves


class Capacity(NamedTuple):
    """SLO-safe request rates of one instance for one tier, by role."""

    prefill_rps: float
    decode_rps: float
    mixed_rps: float


def valid_tp_choices(pool: int, perf: PerfModel, max_tp: int = 8) -> list[int]:
    """Powers of two that divide the pool and the model's KV heads (no head padding here)."""
    out = []
    tp = 1
    while tp <= min(pool, max_tp):
        if pool % tp == 0 and perf.model.num_kv_heads % tp == 0 and perf.kv_capacity_tokens(tp) > 0:
            out.append(tp)
        tp *= 2
    return out


def _max_decode_batch(
    perf: PerfModel, tp: int, tpot_s: float, ctx_per_seq: float, kv_tokens_per_seq: float
) -> int:
    """Largest decode batch whose step time stays within the TPOT target and whose KV fits."""
    kv_cap = perf.kv_capacity_tokens(tp)
    hi = max(1, int(kv_cap // max(1.0, kv_tokens_per_seq)))
    if perf.step_time(tp, 0, 1, int(ctx_per_seq)) > tpot_s:
        return 0
    # The step time grows with the batch: the largest feasible size by the shared bisection.
    return largest_chunk(lambda b: perf.step_time(tp, 0, b, int(b * ctx_per_seq)), tpot_s, hi, 1)


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


def capacities(
    perf: PerfModel, demands: dict[str, TierDemand], tp_choices: Sequence[int]
) -> dict[tuple[str, int], Capacity]:
    """``slo_safe_capacity`` of every (tier, degree)."""
    return {(n, tp): slo_safe_capacity(perf, tp, d) for n, d in demands.items() for tp in tp_choices}


def plan_goodput(
    assignments: Iterable[Assignment], caps: dict[tuple[str, int], Capacity], demands: dict[str, TierDemand]
) -> float:
    """Predicted goodput of per-tier instances (each serving one tier of ``demands``): per tier,
    min(arrivals, what its instances can serve within SLO)."""
    mixed: dict[str, float] = {}
    pre: dict[str, float] = {}
    dec: dict[str, float] = {}
    for a in assignments:
        name = a.tier.sole
        assert name is not None, f"plan_goodput takes per-tier instances, got tiers {a.tier}"
        cap = caps[(name, a.tp)]
        if a.role == "mixed":
            mixed[name] = mixed.get(name, 0.0) + cap.mixed_rps
        elif a.role == "prefill":
            pre[name] = pre.get(name, 0.0) + cap.prefill_rps
        else:
            dec[name] = dec.get(name, 0.0) + cap.decode_rps
    total = 0.0
    for name, d in demands.items():
        served = mixed.get(name, 0.0) + min(pre.get(name, 0.0), dec.get(name, 0.0))
        total += min(d.arrival_rps, served)
    return total


def smallest_decode_step(perf: PerfModel, tp: int) -> float:
    """The fastest step a TP-``tp`` instance can take while decoding: one sequence, no context.
    No TPOT target below it can be met at that degree."""
    return perf.step_time(tp, 0, 1, 0)


def reachable_tpot(perf: PerfModel, tp: int, targets: Iterable[float]) -> float | None:
    """The strictest of ``targets`` a TP-``tp`` instance can meet at all, None if none.

    A target below the instance's smallest decode step (one sequence, no context) cannot be met
    there at any batch size. Bounding every step by it would idle the instance for the tiers it
    can serve (a TP 1 instance of a 14B model cannot decode within 8 ms, and so served nothing),
    so such a tier's requests run there best-effort and the steps are sized for the others.
    """
    return strictest_reachable(targets, smallest_decode_step(perf, tp))


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


def predicted_goodput(
    perf: PerfModel, assignments: Sequence[Assignment], demands: dict[str, TierDemand]
) -> float:
    """Predicted goodput of any plan: per-tier instances via ``plan_goodput``, shared ones on the mix."""
    shared = [a for a in assignments if a.tier.every]
    per_tier = [a for a in assignments if a.tier.sole in demands]
    if any(a.tier.several for a in assignments) or (shared and per_tier):
        # Instances of different tier sets side by side: what the budgets hand out is served.
        caps = admission_caps(perf, assignments, demands)
        return sum(min(d.arrival_rps, caps[name]) for name, d in demands.items())
    if shared:
        return shared_goodput(perf, [a.tp for a in shared], demands)
    caps = capacities(perf, demands, sorted({a.tp for a in per_tier}) or [1])
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
    shared: dict[tuple[int, TierSet], int] = {}  # (degree, tiers served) -> mixed instances
    for a in assignments:
        name = a.tier.sole
        if name is None:  # every tier, or several
            if a.role == "mixed":
                shared[(a.tp, a.tier)] = shared.get((a.tp, a.tier), 0) + 1
            continue
        d = demands.get(name)
        if d is None:
            continue
        cap = slo_safe_capacity(perf, a.tp, d)
        rate = cap.mixed_rps if a.role == "mixed" else cap.prefill_rps if a.role == "prefill" else 0.0
        caps[name] = caps.get(name, 0.0) + rate
    # Instances serving fewer tiers hand out their time first, and a group serves first the tiers
    # that fewer groups can take: the tiers the narrow groups do not serve can only use the broad
    # ones (a high-TP instance for every tier is the tight tier's only place in a hybrid cut).
    options = {name: sum(serves(tiers, name) for _, tiers in shared) for name in demands}
    for (tp, tiers), n in sorted(shared.items(), key=lambda kv: _breadth(kv[0][1])):
        per_tier = shared_caps(perf, tp, {t: d for t, d in demands.items() if serves(tiers, t)})
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


def _breadth(tiers: TierSet) -> tuple[bool, int]:
    """Sort key of tier sets, narrowest first: by count of names, every tier last."""
    return (tiers.every, 0 if tiers.names is None else len(tiers.names) - 1)


def over_saturation(pool: int, perf: PerfModel, demands: dict[str, TierDemand]) -> float:
    """The recent arrivals' tokens per second as a multiple of what the pool computes with every
    step full (``saturation.saturation_tokens_per_s``): above 1, not every request can be served."""
    arriving = sum(d.tokens_per_s for d in demands.values())
    try:
        return arriving / saturation_tokens_per_s(perf, pool)[0]
    except ValueError:  # no degree holds a full chunk of KV: saturation is not defined there
        return 0.0
