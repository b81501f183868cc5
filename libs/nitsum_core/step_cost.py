"""What an engine step costs here, fitted online from the steps the engine has run.

The scheduler's SLO rules need step times before running them: how long a prompt needs at the
least (the TTFT rule) and how many tokens a step may carry within a TPOT target (SLO-safe
steps). The simulator asks the roofline performance model; a live engine asks this fit of its own
measured steps, ``seconds = base_s + per_token_s * tokens``, weighted towards recent steps so it
follows a changing machine. Pure and clock-free: the engine feeds it (tokens, seconds).
"""

from __future__ import annotations

from typing import NamedTuple


class StepCost(NamedTuple):
    """Predicted step time: a fixed part (weights read, launch, sync) plus a part per token."""

    base_s: float
    per_token_s: float

    def step_s(self, tokens: int) -> float:
        return self.base_s + self.per_token_s * tokens

    def tokens_within(self, seconds: float) -> int:
        """The most tokens one step can carry and still take at most ``seconds``."""
        return max(0, int((seconds - self.base_s) / self.per_token_s))

    def prefill_s(self, tokens: int, chunk: int) -> float:
        """Time to prefill ``tokens`` alone, in steps of at most ``chunk`` tokens."""
        steps = -(-tokens // max(1, chunk))
        return steps * self.base_s + tokens * self.per_token_s


class StepCostFit:
    """Exponentially weighted least squares of step seconds on step tokens.

    ``decay`` is the weight each older step keeps per new one (0.98: about the last 50 steps
    count). Until ``min_steps`` steps are seen, or while every step had the same size (no slope
    to fit), ``cost()`` falls back to a pure per-token cost, or None before any step.
    """

    def __init__(self, decay: float = 0.98, min_steps: int = 8) -> None:
        self.decay, self.min_steps = decay, min_steps
        self.steps = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        d = self.decay
        self._w = d * self._w + 1.0
        self._x = d * self._x + tokens
        self._y = d * self._y + seconds
        self._xx = d * self._xx + tokens * tokens
        self._xy = d * self._xy + tokens * seconds
        self.steps += 1

    def cost(self) -> StepCost | None:
        if not self.steps:
            return None
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var_x = self._xx / self._w - mean_x * mean_x
        if self.steps >= self.min_steps and var_x > 1e-9 * max(1.0, mean_x * mean_x):
            slope = (self._xy / self._w - mean_x * mean_y) / var_x
            base = mean_y - slope * mean_x
            if slope > 0 and base >= 0:
                return StepCost(base, slope)
        return StepCost(0.0, mean_y / mean_x)  # no usable slope yet: all of it per token
