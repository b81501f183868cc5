"""The router's traffic over one control window, reported to the controller (docs/architecture.md#controller-policy)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from nitsum_core.wire.control import MAX_IN_FLIGHT_REPORTED, InFlightRequest, TierWindowStats
from nitsum_router.flight import Flight


class TrafficWindow:
    """Arrivals and finishes by tier since the window started, and each tier's mean output."""

    def __init__(self) -> None:
        self.tiers: dict[str, TierWindowStats] = {}
        self.started = time.monotonic()  # arrival offsets in the stats count from here
        self.mean_output: dict[str, float] = {}  # per tier, EWMA of finished requests' lengths

    def _tier(self, tier: str) -> TierWindowStats:
        return self.tiers.setdefault(tier, TierWindowStats())

    def arrival(self, tier: str, prompt_tokens: int, max_tokens: int) -> None:
        """Count an admitted request; its output length is estimated by the tier's recent mean."""
        stats = self._tier(tier)
        stats.prompt_tokens.append(prompt_tokens)
        stats.arrival_offsets_s.append(round(time.monotonic() - self.started, 4))
        # The output length is known only at the end: estimate it by the tier's recent mean.
        stats.output_tokens.append(round(min(max_tokens, self.mean_output.get(tier, max_tokens))))

    def finished(self, tier: str, output_tokens: int, good: bool) -> None:
        """Count a finished request (``good``: within both its TTFT and its TPOT target)."""
        stats = self._tier(tier)
        stats.finished += 1
        stats.good += good
        prev = self.mean_output.get(tier)
        self.mean_output[tier] = output_tokens if prev is None else 0.9 * prev + 0.1 * output_tokens

    def close(self, in_flight: Iterable[Flight]) -> dict[str, TierWindowStats]:
        """End the window: its stats (empty: no traffic) with ``in_flight`` added; start the next."""
        stats, self.tiers = self.tiers, {}
        self.started = time.monotonic()
        if stats:
            self._report_in_flight(stats, in_flight)
        return stats

    def _report_in_flight(self, stats: dict[str, TierWindowStats], flights: Iterable[Flight]) -> None:
        """Add the requests still in flight to the window's stats: the controller's replay of each
        candidate cut starts from this backlog instead of an empty pool."""
        now = time.monotonic()
        by_tier: dict[str, list[Flight]] = {}
        for f in flights:
            if not f.finished:
                by_tier.setdefault(f.tier.name, []).append(f)
        for name, tier_flights in by_tier.items():
            # The youngest are kept when there are too many: the oldest have likely missed their
            # targets already, and the report must stay well under the bus's payload limit.
            tier_flights.sort(key=lambda f: f.arrived, reverse=True)
            estimate = self.mean_output.get(name)
            tier_stats = stats.setdefault(name, TierWindowStats())
            for f in tier_flights[:MAX_IN_FLIGHT_REPORTED]:
                done = len(f.generated)
                output = f.req.max_tokens if estimate is None else min(f.req.max_tokens, round(estimate))
                tier_stats.in_flight.append(
                    InFlightRequest(
                        prompt_tokens=len(f.prompt_ids),
                        output_tokens=max(output, done + 1),
                        age_s=round(now - f.arrived, 4),
                        ttft_s=None if f.first_token_at is None else round(f.first_token_at - f.arrived, 4),
                        generated=done,
                    )
                )
