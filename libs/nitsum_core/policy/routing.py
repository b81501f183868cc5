"""Router scheduling policy (pure, clock-free), shared by the router and the simulator.

Which instance gets a new request (least-loaded among the live leaders serving its tier) and
which local queue it joins there (``LanePolicy``: feasible / background / best-effort, docs/architecture.md#request-scheduling).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import NamedTuple, TypeVar

from nitsum_core.config import Tier
from nitsum_core.policy.plan import TierSet, serves
from nitsum_core.wire.cut import Topology


class Candidate(NamedTuple):
    slot: int
    load: int  # requests the router has in flight there plus the worker's own waiting queue


T = TypeVar("T")


def route_targets(
    instances: Iterable[T], takes_requests: Callable[[T], bool], serves_tier: Callable[[T], bool]
) -> tuple[list[T], bool]:
    """The instances a request of some tier may go to, and whether that is a fallback.

    Of the ``instances`` that take new requests (``takes_requests``: a prefill or mixed instance
    the driver can reach), those that serve the tier; where none does, every one of them. A plan
    may dedicate every instance to other tiers (a tier with no recent demand gets none); its
    requests then go best-effort anywhere rather than being refused. The router (``leaders_for``)
    and the simulator route by this one rule.
    """
    takers = [i for i in instances if takes_requests(i)]
    serving = [i for i in takers if serves_tier(i)]
    if serving:
        return serving, False
    return takers, bool(takers)


def leaders_for(topology: Topology | None, tier: str, alive: set[int]) -> tuple[list[int], bool]:
    """Leaders to route a ``tier`` request to, and whether that is a fallback (``route_targets``)."""
    if topology is None:
        return [], False
    targets, fallback = route_targets(
        topology.instances,
        lambda inst: inst.role in ("mixed", "prefill") and inst.leader in alive,
        lambda inst: serves(TierSet.from_wire(inst.tiers), tier),
    )
    return [inst.leader for inst in targets], fallback


def fallback_lane(lane: int, fallback: bool) -> int:
    """The lane a request routed by ``route_targets`` runs in: a feasible one sent to instances
    that do not serve its tier (a fallback) runs best-effort there, behind their own tiers."""
    return int(Lane.BEST_EFFORT) if fallback and lane == Lane.FEASIBLE else lane


def least_loaded(candidates: list[Candidate]) -> int | None:
    """The slot with the smallest load (lowest slot on ties, so routing is deterministic)."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.load, c.slot)).slot


class Lane(IntEnum):
    """A request's local queue on its instance (docs/architecture.md#request-scheduling); lower runs first."""

    FEASIBLE = 0  # within its tier's SLO-safe budget this window
    BACKGROUND = 1  # the lowest-priority tier: its loose TTFT survives queueing
    BEST_EFFORT = 2  # over budget: predicted to miss, so it must not delay the others
    LATE = 3  # sure to miss its TTFT target: it can no longer count, so it goes last


class LanePolicy:
    """Feasible / best-effort / background classification against per-tier budgets (docs/architecture.md#request-scheduling).

    Pure and clock-free: the driver (router or simulator) calls ``new_window`` once per control
    window with the configurator's budgets (requests/s per tier), ``classify`` per arrival and
    ``first_token`` when a feasible request's first token is out. Budgets are model estimates,
    so an AIMD scale shrinks them while feasible requests miss their TTFT and regrows it after.
    """

    def __init__(self, tiers: dict[str, Tier], window_s: float = 1.0) -> None:
        self.tiers, self.window_s = tiers, window_s
        lowest = max(t.priority for t in tiers.values()) if tiers else 0
        self.background = {n for n, t in tiers.items() if t.priority == lowest} if len(tiers) > 1 else set()
        self.budgets: dict[str, float] = {}  # requests/s per tier after scaling; absent: no limit
        self.scale = 1.0
        self._admitted: dict[str, int] = {}
        self._hits = [0, 0]  # feasible first tokens this window: [within TTFT, all]
        self._rr = itertools.count()

    def classify(self, tier: str) -> Lane:
        if tier in self.background:
            return Lane.BACKGROUND
        if self._admitted.get(tier, 0) < self.budgets.get(tier, float("inf")) * self.window_s:
            self._admitted[tier] = self._admitted.get(tier, 0) + 1
            return Lane.FEASIBLE
        return Lane.BEST_EFFORT

    def first_token(self, lane: int, within_ttft: bool) -> None:
        if lane == Lane.FEASIBLE:
            self._hits[1] += 1
            self._hits[0] += within_ttft

    def new_window(self, budgets: dict[str, float] | None) -> None:
        """Start a window; ``budgets`` None keeps the old ones (no demand seen, nothing learnt)."""
        self._admitted.clear()
        if budgets is None:
            return
        hits, seen = self._hits
        if seen >= 10 and hits < 0.9 * seen:
            self.scale = max(0.05, self.scale * 0.8)
        elif seen:
            self.scale = min(1.0, self.scale + 0.05)
        self._hits = [0, 0]
        self.budgets = {t: c * self.scale for t, c in budgets.items()}

    def pick(self, candidates: list[Candidate], lane: Lane) -> int | None:
        """Least-loaded for feasible and background work; best-effort is spread round-robin so it
        queues evenly behind the feasible work instead of piling onto the least-loaded instance."""
        if not candidates:
            return None
        if lane == Lane.BEST_EFFORT:
            return candidates[next(self._rr) % len(candidates)].slot
        return least_loaded(candidates)
