"""Goodput accounting (docs/architecture.md#tiers-and-goodput): one implementation for loadgen, ``nitsum bench`` and the simulator."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nitsum_core.config import Tier


@dataclass(frozen=True)
class RequestRecord:
    tier: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # None when the request failed before its first token
    tpot_s: float | None
    error: str | None = None


def mean_tpot(first_token_s: float, last_token_s: float, output_tokens: int) -> float:
    """Mean time per output token after the first: the gaps between ``output_tokens`` tokens,
    the first at ``first_token_s`` and the last at ``last_token_s``; 0 for a single token."""
    return (last_token_s - first_token_s) / (output_tokens - 1) if output_tokens > 1 else 0.0


def meets_targets(ttft_s: float, tpot_s: float, tier: Tier) -> bool:
    """Whether a request met both of its tier's targets: TTFT and mean TPOT (``mean_tpot``, 0 for
    a single token) within them. Goodput counts exactly these requests."""
    return ttft_s <= tier.ttft_s and tpot_s <= tier.tpot_s


def meets_slo(rec: RequestRecord, tier: Tier) -> bool:
    """Whether ``rec`` finished and met both targets (``meets_targets``; single-token outputs
    have no TPOT)."""
    if rec.error is not None or rec.ttft_s is None:
        return False
    return meets_targets(rec.ttft_s, (rec.tpot_s or 0.0) if rec.output_tokens > 1 else 0.0, tier)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class TierReport:
    tier: str
    ttft_target_s: float
    tpot_target_s: float
    requests: int
    completed: int
    failed: int
    met_slo: int
    attainment: float
    goodput_rps: float
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float


@dataclass
class GoodputReport:
    duration_s: float
    num_gpus: int
    requests: int
    met_slo: int
    goodput_rps: float
    goodput_per_gpu_rps: float
    throughput_rps: float
    output_tokens_per_s: float
    tiers: list[TierReport]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(
    records: list[RequestRecord], tiers: dict[str, Tier], duration_s: float, num_gpus: int
) -> GoodputReport:
    """Per-tier attainment and goodput (requests meeting both targets per second of the run)."""
    duration_s = max(duration_s, 1e-9)
    reports: list[TierReport] = []
    total_met = 0
    for name in sorted(
        {r.tier for r in records} | set(tiers), key=lambda n: (tiers[n].priority if n in tiers else 99, n)
    ):
        recs = [r for r in records if r.tier == name]
        if not recs:
            continue
        tier = tiers.get(name)
        ok = [r for r in recs if r.error is None]
        met = sum(meets_slo(r, tier) for r in recs) if tier else 0
        total_met += met
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpots = [r.tpot_s for r in ok if r.tpot_s is not None and r.output_tokens > 1]
        reports.append(
            TierReport(
                tier=name,
                ttft_target_s=tier.ttft_s if tier else math.nan,
                tpot_target_s=tier.tpot_s if tier else math.nan,
                requests=len(recs),
                completed=len(ok),
                failed=len(recs) - len(ok),
                met_slo=met,
                attainment=met / len(recs),
                goodput_rps=met / duration_s,
                ttft_p50_s=percentile(ttfts, 50),
                ttft_p90_s=percentile(ttfts, 90),
                ttft_p99_s=percentile(ttfts, 99),
                tpot_p50_s=percentile(tpots, 50),
                tpot_p90_s=percentile(tpots, 90),
                tpot_p99_s=percentile(tpots, 99),
            )
        )
    completed = [r for r in records if r.error is None]
    return GoodputReport(
        duration_s=duration_s,
        num_gpus=num_gpus,
        requests=len(records),
        met_slo=total_met,
        goodput_rps=total_met / duration_s,
        goodput_per_gpu_rps=total_met / duration_s / max(1, num_gpus),
        throughput_rps=len(completed) / duration_s,
        output_tokens_per_s=sum(r.output_tokens for r in completed) / duration_s,
        tiers=reports,
    )


def format_report(rep: GoodputReport) -> str:
    """A plain-text table of the report."""
    lines = [
        f"{'tier':<12} {'reqs':>5} {'ok':>5} {'SLO met':>8} {'attain':>7} {'TTFT p50':>9} {'p99':>7} "
        f"{'TPOT p50':>9} {'p99':>7}  targets (TTFT/TPOT)"
    ]
    for t in rep.tiers:
        lines.append(
            f"{t.tier:<12} {t.requests:>5} {t.completed:>5} {t.met_slo:>8} {t.attainment:>7.1%} "
            f"{t.ttft_p50_s:>8.3f}s {t.ttft_p99_s:>6.3f}s {t.tpot_p50_s * 1000:>7.1f}ms {t.tpot_p99_s * 1000:>5.0f}ms"
            f"  {t.ttft_target_s:g}s / {t.tpot_target_s * 1000:g}ms"
        )
    lines.append(
        f"goodput {rep.goodput_rps:.3f} req/s ({rep.goodput_per_gpu_rps:.3f} per worker), throughput "
        f"{rep.throughput_rps:.3f} req/s, {rep.output_tokens_per_s:.1f} output tok/s over {rep.duration_s:.1f}s"
    )
    return "\n".join(lines)
