"""The engine's online step-time model (what TPOT-sized steps are cut by)."""

from __future__ import annotations

import random

from nitsum_core.perf.step_time import MIN_STEPS, StepTimeModel


def test_learns_a_linear_step_time_from_noisy_steps() -> None:
    rng = random.Random(0)
    model = StepTimeModel()
    assert model(100, 4, 400) is None  # nothing seen yet: no prediction, steps are not sized

    def truth(p: int, d: int, c: int) -> float:
        return 0.020 + 2e-4 * p + 1e-3 * d + 1e-6 * c

    for _ in range(200):
        p, d = rng.choice([0, 0, 16, 64, 256]), rng.randint(0, 16)
        c = d * rng.randint(50, 500)
        model.observe(p, d, c, truth(p, d, c) * rng.uniform(0.95, 1.05))
    # Predictions sit at the 90th percentile of the noise (+-5 %): a step sized to them rarely
    # overruns, where one sized to the mean would half the time.
    for p, d, c in [(0, 8, 2000), (128, 4, 800), (512, 0, 0)]:
        predicted = model(p, d, c)
        assert predicted is not None and truth(p, d, c) * 1.01 <= predicted <= truth(p, d, c) * 1.07


def test_waits_for_prefill_steps_and_keeps_every_term_non_negative() -> None:
    model = StepTimeModel()
    for d in range(MIN_STEPS * 2):  # decode-only steps: the prompt-token cost is unknown
        model.observe(0, 1 + d % 4, 100, 0.01)
    assert model(64, 2, 100) is None
    # Steps that got *faster* with more prompt tokens (noise, a host that sped up): the fit drops
    # that term rather than predict that more work takes less time.
    for p in (8, 16, 32, 64):
        model.observe(p, 1, 100, 0.011 - p * 1e-5)
    longer, shorter = model(512, 1, 100), model(0, 1, 100)
    assert longer is not None and shorter is not None and longer >= shorter
    assert model.coefficients is not None and min(model.coefficients) >= 0.0
