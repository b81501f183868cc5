"""An engine's own step time, learned online: what its scheduler sizes TPOT-safe steps by.

A step's time is close to linear in what it does (``perf_model``'s roofline terms, on one instance):
a fixed part (weights streamed, launches, the TP all-reduces), a part per prompt token (FLOPs),
a part per decoding sequence and a part per KV token those sequences read. Rather than ask the
operator for a profile, the engine times every step and refits those four coefficients by least
squares over its recent steps, so the prediction follows the backend, the TP degree and a busy
host as they are now.
"""

from __future__ import annotations

from collections import deque

import numpy as np

# Steps the fit looks back over: a few seconds of serving, so a changed host (or TP degree) shows
# within seconds, and enough steps that one slow outlier moves a coefficient little.
WINDOW_STEPS = 256
# Fewest steps before the model predicts anything, and the fewest of those that prefilled: with
# decode-only steps alone the per-prompt-token cost is not identifiable.
MIN_STEPS = 16
MIN_PREFILL_STEPS = 4
REFIT_EVERY = 8  # new steps between refits: a refit is a 4-column least-squares solve
# Predictions are the fit scaled up to this quantile of the recent steps' observed / fitted time.
# A step sized to the *mean* prediction overruns about half the time, and a decode's TPOT is the
# mean of its steps: sized to the mean, chats on the CPU engine ended 0.7 % over their target
# (benchmarks/tpot_steps.py); sized to the 90th percentile, under it.
PREDICTION_QUANTILE = 0.9


class StepTimeModel:
    """``seconds ≈ fixed + per_prompt_token·p + per_decode·d + per_ctx_token·c``, refitted online.

    Coefficients are kept non-negative (a step never gets faster for doing more): the term the fit
    drives most negative is dropped and the rest refitted, until none is.
    """

    def __init__(self, window: int = WINDOW_STEPS) -> None:
        self._steps: deque[tuple[int, int, int, float]] = deque(maxlen=window)
        self._since_fit = 0
        self.coefficients: tuple[float, float, float, float] | None = None
        self.margin = 0.0  # predictions are the fit x (1 + margin): PREDICTION_QUANTILE

    def observe(self, prefill_tokens: int, decodes: int, decode_ctx_tokens: int, seconds: float) -> None:
        """One step ran: ``prefill_tokens`` prompt tokens beside ``decodes`` decoding sequences
        that held ``decode_ctx_tokens`` tokens of KV, in ``seconds``."""
        self._steps.append((prefill_tokens, decodes, decode_ctx_tokens, seconds))
        self._since_fit += 1

    def __call__(self, prefill_tokens: int, decodes: int, decode_ctx_tokens: int) -> float | None:
        """Predicted seconds of such a step; None until enough steps have been seen."""
        if self.coefficients is None or self._since_fit >= REFIT_EVERY:
            self._fit()
        if self.coefficients is None:
            return None
        fixed, per_token, per_decode, per_ctx = self.coefficients
        fitted = fixed + per_token * prefill_tokens + per_decode * decodes + per_ctx * decode_ctx_tokens
        return fitted * (1.0 + self.margin)

    def _fit(self) -> None:
        self._since_fit = 0
        steps = self._steps
        if len(steps) < MIN_STEPS or sum(1 for s in steps if s[0] > 0) < MIN_PREFILL_STEPS:
            return
        data = np.asarray(steps, dtype=np.float64)
        features = np.column_stack([np.ones(len(data)), data[:, :3]])
        seconds = data[:, 3]
        active = [0, 1, 2, 3]
        while True:
            coef, *_ = np.linalg.lstsq(features[:, active], seconds, rcond=None)
            worst = min(range(len(active)), key=lambda i: coef[i])
            if coef[worst] >= 0:
                break
            del active[worst]  # the most negative term goes; the others may be fine without it
            if not active:
                return
        full = np.zeros(4)
        full[active] = coef
        fitted = features @ full
        ok = fitted > 0
        if not ok.any():
            return
        self.margin = max(0.0, float(np.quantile(seconds[ok] / fitted[ok], PREDICTION_QUANTILE)) - 1.0)
        self.coefficients = (float(full[0]), float(full[1]), float(full[2]), float(full[3]))
