"""The plan vocabulary (docs/architecture.md#controller-policy): how a cut of the pool is written down. Pure, no perf model.

An ``Assignment`` is one instance (aligned slots, TP degree, role, the ``TierSet`` it serves); a
``Plan`` is a list of them with the goodput it was predicted to reach. ``TierDemand`` is what a
tier asked for in a window. The capacity model (``capacity``), the candidate cuts (``cuts``) and
the searches (``search``) speak this vocabulary; ``reconfig`` and the services need only it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from nitsum_core.config import Tier

Role = Literal["mixed", "prefill", "decode"]


@dataclass(frozen=True, slots=True)
class TierSet:
    """The tiers an instance serves: ``names``, or every tier where ``names`` is None (``SHARED``).

    A typed set, so tier names may hold any character; ``serves`` is its membership test.
    ``str()`` renders it as plans have always been described: "*" for every tier, else the names
    sorted and joined by "+".
    """

    names: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.names is None:
            return
        if isinstance(self.names, str):
            raise TypeError(
                f"TierSet takes a collection of names, got the string {self.names!r}: use TierSet.of"
            )
        names = frozenset(self.names)
        if not names:
            raise ValueError("a TierSet names at least one tier (None: every tier)")
        object.__setattr__(self, "names", names)

    @classmethod
    def of(cls, *names: str) -> TierSet:
        """The set of ``names`` (at least one)."""
        return cls(frozenset(names))

    @property
    def every(self) -> bool:
        """Whether this is every tier (``SHARED``)."""
        return self.names is None

    @property
    def sole(self) -> str | None:
        """The one tier named, None for every tier or several."""
        if self.names is None or len(self.names) != 1:
            return None
        (name,) = self.names
        return name

    @property
    def several(self) -> bool:
        """Whether it names more than one tier but not every tier."""
        return self.names is not None and len(self.names) > 1

    def __str__(self) -> str:
        return "*" if self.names is None else "+".join(sorted(self.names))

    def to_wire(self) -> list[str]:
        """The names for a topology's ``TopologyInstance.tiers``: sorted, empty for every tier."""
        return [] if self.names is None else sorted(self.names)

    @classmethod
    def from_wire(cls, names: Iterable[str]) -> TierSet:
        """The set an ``TopologyInstance.tiers`` list names (empty: every tier)."""
        names = frozenset(names)
        return cls(names) if names else SHARED


SHARED = TierSet()  # every tier (the SLO-ordered queues sort them out inside the instance)


def serves(tiers: TierSet, tier: str) -> bool:
    """Whether an instance serving ``tiers`` takes requests of ``tier``."""
    return tiers.names is None or tier in tiers.names


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


@dataclass(frozen=True)
class Assignment:
    """An instance: aligned slots [start, start + tp), its role and the tiers it serves."""

    start: int
    tp: int
    role: Role
    tier: TierSet

    def __post_init__(self) -> None:
        if not isinstance(self.tier, TierSet):
            raise TypeError(f"Assignment.tier is a TierSet (SHARED, TierSet.of(...)), got {self.tier!r}")

    @property
    def slots(self) -> list[int]:
        return list(range(self.start, self.start + self.tp))


@dataclass
class Plan:
    """A cut of the pool, and the goodput (req/s) it was predicted to reach."""

    assignments: list[Assignment] = field(default_factory=list)
    predicted_goodput_rps: float = 0.0

    def describe(self) -> str:
        """One line per plan, as the study's results record it: "[0:2] TP2 mixed *, ..."."""
        return ", ".join(f"[{a.start}:{a.start + a.tp}] TP{a.tp} {a.role} {a.tier}" for a in self.assignments)


def plan_shape(assignments: Iterable[Assignment]) -> set[tuple[int, int, str]]:
    """The instances' slots, degrees and roles: what a switch must move to change."""
    return {(a.start, a.tp, a.role) for a in assignments}


def only_tiers_change(old: Iterable[Assignment], new: Iterable[Assignment]) -> bool:
    """Whether moving from ``old`` to ``new`` changes only which tiers instances serve: a switch
    that pauses nothing and so costs nothing (the simulator's and the controller's switch cost)."""
    return plan_shape(old) == plan_shape(new)


def plan_family(assignments: Iterable[Assignment]) -> str:
    """A coarse name for what kind of plan this is, for learning from how such plans did.

    Per-tier cuts change shape with every window's demand, so experience is kept per family:
    each uniform shared degree, per-tier cuts of mixed instances, and per-tier cuts that split
    prefill from decode (whose hand-offs the capacity model knows least about).
    """
    assignments = list(assignments)
    if assignments and all(a.tier.every for a in assignments):
        return "shared-tp" + "-".join(str(t) for t in sorted({a.tp for a in assignments}))
    if any(a.tier.several for a in assignments):
        return "hybrid-tp" + "-".join(str(t) for t in sorted({a.tp for a in assignments}))
    return "per-tier-pd" if any(a.role != "mixed" for a in assignments) else "per-tier"
