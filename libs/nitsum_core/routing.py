"""Request routing policy (pure, clock-free): which instance gets a new request.

Least-loaded among the live instance leaders that serve the request's tier. The SLO-aware
feasible / best-effort classification of DESIGN §1 builds on this interface.
"""

from __future__ import annotations

from typing import NamedTuple

from nitsum_core.messages import Topology


class Candidate(NamedTuple):
    slot: int
    load: int  # requests the router has in flight there plus the worker's own waiting queue


def eligible_leaders(topology: Topology | None, tier: str, alive: set[int]) -> list[int]:
    """Leaders of instances that serve ``tier`` (an empty tier list means every tier) and are alive."""
    if topology is None:
        return []
    return [
        inst.leader
        for inst in topology.instances
        if inst.role in ("mixed", "prefill")
        and (not inst.tiers or tier in inst.tiers)
        and inst.leader in alive
    ]


def least_loaded(candidates: list[Candidate]) -> int | None:
    """The slot with the smallest load (lowest slot on ties, so routing is deterministic)."""
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.load, c.slot)).slot
