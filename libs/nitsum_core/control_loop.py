"""The controller's per-window decision (DESIGN §1, §7), shared by ``tp_controller`` and the simulator.

Pure and clock-free: the driver feeds it arrivals and finishes as they happen and calls
``window()`` once per control window. It estimates each tier's demand over the last few windows,
learns how each plan family actually did, and proposes a new cut only when the configurator
predicts a clear gain that beats the switching cost. The admission budgets it returns go to the
router's ``LanePolicy``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nitsum_core.config import Tier
from nitsum_core.configurator import (
    Plan,
    Role,
    TierDemand,
    admission_caps,
    choose_plan,
    plan_family,
    predicted_goodput,
    should_switch,
)
from nitsum_core.perf_model import PerfModel


class Arrival(NamedTuple):
    tier: str
    prompt: int
    output: int  # actual output length where known (simulator), else the router's estimate


@dataclass
class Decision:
    """One window's outcome: the demand seen, the admission budgets, and maybe a new plan."""

    demands: dict[str, TierDemand]
    budgets: dict[str, float] | None  # None: no demand this window, keep the old budgets
    switch_to: Plan | None = None
    pause_s: float = 0.0
    predicted_current_rps: float = 0.0


class ControlLoop:
    def __init__(
        self,
        pool: int,
        perf: PerfModel,
        tiers: dict[str, Tier],
        plan: Plan,
        window_s: float = 1.0,
        dynamic: bool = True,
        history: int = 3,
        roles: Sequence[Role] = ("mixed", "prefill", "decode"),
    ) -> None:
        self.pool, self.perf, self.tiers = pool, perf, tiers
        self.plan, self.window_s, self.dynamic, self.roles = plan, window_s, dynamic, roles
        # Demand over the last few windows: one second of a bursty trace is a noisy estimate, and
        # the controller should follow the load, not its noise.
        self._recent: deque[list[Arrival]] = deque(maxlen=history)
        self.arrivals: list[Arrival] = []  # this window's, in arrival order
        self._finished: dict[str, int] = {}
        self._good = 0  # requests finished within both targets this window
        self.observed: dict[str, float] = {}  # plan family -> EWMA of goodput per arrival

    def arrival(self, tier: str, prompt: int, output: int) -> None:
        self.arrivals.append(Arrival(tier, prompt, output))

    def finished(self, tier: str, good: bool) -> None:
        self._finished[tier] = self._finished.get(tier, 0) + 1
        self._good += good

    def demands(self, arrivals: list[Arrival], spans: int = 1) -> dict[str, TierDemand]:
        out = {}
        w = self.window_s * spans
        for name, tier in self.tiers.items():
            rs = [r for r in arrivals if r.tier == name]
            if not rs:
                continue
            out[name] = TierDemand(
                tier,
                arrival_rps=len(rs) / w,
                mean_prompt=sum(r.prompt for r in rs) / len(rs),
                mean_output=sum(r.output for r in rs) / len(rs),
                served_rps=self._finished.get(name, 0) / self.window_s,
            )
        return out

    def window(self, switch_cost: Callable[[Plan], float]) -> Decision:
        """Close the window: demand, budgets for the current plan, and a switch if it pays.

        The driver applies ``switch_to`` and then sets ``plan`` (a failed switch keeps the old one).
        """
        window, self.arrivals = self.arrivals, []
        self._recent.append(window)
        if window:
            key, seen = plan_family(self.plan.assignments), self._good / len(window)
            prev = self.observed.get(key)
            self.observed[key] = seen if prev is None else 0.7 * prev + 0.3 * seen
        self._good = 0
        demands = self.demands([r for w in self._recent for r in w], len(self._recent))
        self._finished.clear()
        if not demands:
            return Decision(demands, None)
        decision = Decision(demands, admission_caps(self.perf, self.plan.assignments, demands))
        if not self.dynamic:
            return decision
        proposed = choose_plan(self.pool, self.perf, demands, self.roles)
        current = predicted_goodput(self.perf, self.plan.assignments, demands)
        decision.predicted_current_rps = current
        if proposed.assignments == self.plan.assignments:
            return decision
        pause = switch_cost(proposed)
        if should_switch(
            current,
            proposed.predicted_goodput_rps,
            pause,
            self.window_s,
            observed_current=self.observed.get(plan_family(self.plan.assignments)),
            observed_proposed=self.observed.get(plan_family(proposed.assignments)),
        ):
            decision.switch_to, decision.pause_s = proposed, pause
        return decision
