"""The pool's saturation point, and sweeps stated as multiples of it."""

from __future__ import annotations

import pytest
from nitsum_core.perf.perf_model import HARDWARE, Coefficients, PerfModel, model_spec
from nitsum_core.perf.saturation import offered_load, rate_for_load, saturation
from nitsum_core.policy.plan import SHARED, Assignment, Plan
from nitsum_core.sim.simulator import Preset, Simulator
from nitsum_core.workload import TraceRequest, assign_tiers, scale_rate, synthetic_azure_conv, window

from tests.test_simulator import TIERS


def _perf(model: str = "llama-3.1-8b", hardware: str = "h100-sxm") -> PerfModel:
    return PerfModel(model_spec(model), HARDWARE[hardware], Coefficients(overhead_s=2e-3))


def _mix(n: int = 800, seed: int = 0) -> list[TraceRequest]:
    return assign_tiers(
        synthetic_azure_conv(n, seed=seed), {"interactive": 0.5, "agent": 0.3, "background": 0.2}
    )


def test_saturation_is_full_chunks_on_the_fastest_cut() -> None:
    perf, mix = _perf(), _mix()
    sat = saturation(perf, 8, mix)
    tokens = sum(r.prompt_tokens + r.output_tokens for r in mix) / len(mix)
    # An 8B model is compute-bound at a 2048-token chunk: TP 1 serves the most tokens per GPU
    # (higher degrees only add all-reduces), so the pool is 8 TP-1 instances.
    assert sat.tp == 1 and sat.tokens_per_request == pytest.approx(tokens)
    assert sat.rps == pytest.approx(8 * 2048 / perf.step_time(1, 2048) / tokens)
    # Twice the GPUs, twice the requests.
    assert saturation(perf, 16, mix).rps == pytest.approx(2 * sat.rps)
    # A 70B model does not fit on one H200 with room for its KV cache: TP 2 is the smallest cut.
    assert saturation(_perf("llama-3.1-70b", "h200"), 8, mix).tp == 2


def test_saturation_rejects_what_it_cannot_answer() -> None:
    with pytest.raises(ValueError, match="at least one request"):
        saturation(_perf(), 8, [])
    with pytest.raises(ValueError, match="no room"):
        saturation(_perf("llama-3.1-70b", "h100-sxm"), 1, _mix(10))


@pytest.mark.parametrize("load", [0.5, 3.0])
def test_saturation_separates_keeping_up_from_falling_behind(load: float) -> None:
    """Arrivals of the mix at half of saturation are served as they come; at three times it, an
    FCFS pool (which serves the mix as it arrives, not the short requests first) completes no
    more than saturation's rate and its queue grows."""
    perf, mix = _perf(), _mix(3000)
    sat = saturation(perf, 1, mix)
    arrivals = scale_rate(mix, load * sat.rps)
    end = arrivals[-1].arrival_s
    res = Simulator(perf, 1, TIERS, Preset("vanilla"), Plan([Assignment(0, 1, "mixed", SHARED)])).run(
        arrivals
    )
    assert all(r.error is None for r in res.records)
    done_by_end = sum(r.arrival_s + r.ttft_s + r.tpot_s * (r.output_tokens - 1) <= end for r in res.records)
    if load < 1:
        assert done_by_end >= 0.95 * len(mix)
    else:
        assert 0.5 * sat.rps <= done_by_end / end <= sat.rps


def test_rate_for_load_finds_the_rate_of_a_multiple() -> None:
    perf, mix = _perf(), _mix(4000)

    def workload(rate: float) -> list[TraceRequest]:
        return window(scale_rate(mix, rate), 0.0, 30.0)

    for multiple in (0.5, 2.0):
        rate = rate_for_load(workload, perf, 1, multiple, 30.0)
        assert offered_load(perf, 1, workload(rate), 30.0) == pytest.approx(multiple, rel=0.01)
    # One GPU saturates at ~43 req/s: 4000 requests cannot fill 30 s at 10x that.
    with pytest.raises(ValueError, match="run out at 4000 requests"):
        rate_for_load(workload, perf, 1, 10.0, 30.0)
    with pytest.raises(ValueError, match="multiple > 0"):
        rate_for_load(workload, perf, 1, 0.0, 30.0)
