"""The searches (docs/architecture.md#controller-policy): the best per-tier cut by greedy or exhaustive search, and the
hysteresis against switching. Pure and clock-free.

``greedy`` scores every option (tier x TP x role) by SLO-safe requests/s per GPU, capped by what
actually arrives and weighted by the tier's starvation factor (arrivals / served), and hands out
GPUs one aligned TP-sized group at a time. ``exhaustive`` searches every aligned partition for
small pools and is the yardstick for the greedy search. ``should_switch`` is the hysteresis
against switching cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache

from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.capacity import Capacity, capacities, plan_goodput, valid_tp_choices
from nitsum_core.policy.plan import Assignment, Plan, Role, TierDemand, TierSet


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
    pool: int,
    demands: dict[str, TierDemand],
    tps: Sequence[int],
    roles: Sequence[Role],
    caps: dict[tuple[str, int], Capacity],
) -> tuple[list[_Pick], float]:
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
    """The greedy search (docs/architecture.md#controller-policy): best marginal goodput per GPU, one aligned group at a time.

    Run once per cap on the largest TP (a few passes; each is linear in the pool) and keep the
    best: a pass that may take a large group early can fragment the pool for the rest. A pass
    whose largest pick is below its cap never chose the larger degrees, so a lower cap down to
    that pick would repeat it exactly: those caps are skipped.
    """
    tps = sorted(tp_choices or valid_tp_choices(pool, perf), reverse=True)
    caps = capacities(perf, demands, tps)
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
    return Plan([Assignment(s, tp, role, TierSet.of(name)) for s, tp, role, name in sorted(picks)], goodput)


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
    caps = capacities(perf, demands, tps)
    labels = [(TierSet.of(t), r) for t in demands for r in roles]
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
