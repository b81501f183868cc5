"""``nitsum profile``: time the real engine on its backend and fit the performance model to it.

Each probe is one engine step of a known shape (a prefill chunk of P tokens, or B decoding
sequences over C tokens of context), timed on the real model. The coefficients of ``PerfModel``
(weight/KV/FLOP multipliers and a fixed per-step overhead) are then fitted to minimise the
relative error of the *same* formula the simulator uses, by a coarse-to-fine search in log space
(four parameters; numpy only). TP > 1 needs several processes, so ``c_comm`` is not fitted here
and stays 1.0.

The engine is given KV and batch room for the largest probe (``engine_config``), and every probe
checks it ran the shape it is named after: a decode probe whose sequences did not all fit would
time a smaller batch under the larger one's label and skew the fit.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.perf.perf_model import Coefficients, PerfModel


@dataclass(frozen=True)
class Probe:
    """One step shape: ``prefill`` new tokens, or ``decode`` sequences over ``context`` tokens each."""

    prefill: int = 0
    decode: int = 0
    context: int = 0

    @property
    def label(self) -> str:
        return f"prefill {self.prefill}" if self.prefill else f"decode {self.decode}x{self.context}"


@dataclass(frozen=True)
class Sample:
    probe: Probe
    measured_s: float
    predicted_s: float = 0.0

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


DEFAULT_PROBES = [Probe(prefill=p) for p in (16, 64, 128, 256, 512)] + [
    Probe(decode=b, context=c) for b in (1, 4, 16, 32) for c in (64, 512)
]
QUICK_PROBES = [Probe(prefill=p) for p in (16, 128)] + [Probe(decode=b, context=64) for b in (1, 8)]
# A GPU is far from its roofline at CPU-sized steps: probe the shapes a served step has there
# (the study's 2048-token chunks, decode batches into the hundreds).
GPU_PROBES = [Probe(prefill=p) for p in (128, 512, 1024, 2048, 4096)] + [
    Probe(decode=b, context=c) for b in (1, 8, 32, 128) for c in (512, 2048)
]


def _decode_tokens(probe: Probe, chunk: int) -> int:
    """Output tokens a decode probe's sequences may reach: while later prompts prefill (a chunk a
    step, less the decodes sharing it), those already prefilled decode; then the timed steps."""
    return math.ceil(probe.decode * probe.context / max(1, chunk - probe.decode)) + 4


def engine_config(probes: list[Probe], kv_bytes_per_token: int, block_size: int = 16) -> EngineConfig:
    """An engine with room for the largest probe: its KV, its batch and its prompt in one step."""
    chunk = max(p.prefill or p.context for p in probes)
    longest = max(p.prefill or p.context + _decode_tokens(p, chunk) for p in probes)
    blocks = max(
        -(-p.prefill // block_size)
        if p.prefill
        else p.decode * -(-(p.context + _decode_tokens(p, chunk)) // block_size)
        for p in probes
    )
    return EngineConfig(
        block_size=block_size,
        kv_cache_mb=max(1, math.ceil(blocks * block_size * kv_bytes_per_token / 2**20)),
        max_num_seqs=max(1, max(p.decode for p in probes)),
        max_batched_tokens=chunk,
        max_model_len=longest + 1,
    )


def time_probe(make_engine: Callable[[], Engine], probe: Probe, repeats: int = 3) -> float:
    """Median seconds of one engine step of ``probe``'s shape (fresh engine state each repeat).

    Raises ``ValueError`` when the engine cannot run the shape in one step (too little KV, batch
    or chunk room: see ``engine_config``). A step's time includes its sampling, which waits for
    the device, so it is the step's real duration on a GPU too.
    """
    times = []
    for _ in range(repeats):
        engine = make_engine()
        if probe.prefill:
            engine.add_request("p", [7] * probe.prefill, RequestParams(max_tokens=1, ignore_eos=True))
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
            if engine.tokens_prefilled != probe.prefill:
                raise ValueError(
                    f"probe {probe.label}: one step prefilled {engine.tokens_prefilled} tokens; "
                    "give the engine max_batched_tokens >= the prompt (profiling.engine_config)"
                )
            continue
        params = RequestParams(_decode_tokens(probe, engine.config.max_batched_tokens), ignore_eos=True)
        for i in range(probe.decode):
            engine.add_request(f"d{i}", [7] * probe.context, params)
        while (
            any(s.num_computed < len(s.token_ids) - 1 for s in engine.scheduler.running)
            or engine.scheduler.num_waiting
        ):
            engine.step()  # prefill everything first
        if len(engine.scheduler.running) != probe.decode:
            raise ValueError(
                f"probe {probe.label}: only {len(engine.scheduler.running)} sequences fit the engine at "
                "once; give it KV and max_num_seqs for the whole batch (profiling.engine_config)"
            )
        steps = []
        for _ in range(2):
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        times.append(min(steps))
    return statistics.median(times)


def predict(model: PerfModel, probe: Probe) -> float:
    return model.step_time(1, probe.prefill, probe.decode, probe.decode * probe.context)


def _loss(model: PerfModel, samples: list[Sample]) -> float:
    return float(np.mean([np.log(predict(model, s.probe) / s.measured_s) ** 2 for s in samples]))


def fit(base: PerfModel, samples: list[Sample], rounds: int = 4) -> Coefficients:
    """Coefficients minimising the mean squared log error of the step-time formula; never worse
    by that error than ``base``'s own coefficients (kept when no point of the search beats them)."""
    spec, hw = base.model, base.hw
    # Search in log10 space around 1.0 for the multipliers; the overhead around the fastest step.
    centre = np.array([0.0, 0.0, 0.0, np.log10(max(1e-5, min(s.measured_s for s in samples) / 4))])
    span = np.array([2.0, 2.0, 2.0, 2.0])
    best = centre.copy()
    best_loss = float("inf")
    kept_loss = _loss(base, samples)
    for _ in range(rounds):
        grids = [np.linspace(c - w, c + w, 7) for c, w in zip(best, span, strict=True)]
        for point in itertools.product(*grids):
            coef = Coefficients(
                c_weight=10 ** point[0],
                c_kv=10 ** point[1],
                c_flops=10 ** point[2],
                overhead_s=10 ** point[3],
            )
            loss = _loss(PerfModel(spec, hw, coef), samples)
            if loss < best_loss:
                best_loss, best = loss, np.array(point)
        span = span / 3
    if best_loss >= kept_loss:  # noisy timings the formula cannot follow: nothing beats the start
        return base.coef
    return Coefficients(
        c_weight=float(10 ** best[0]),
        c_kv=float(10 ** best[1]),
        c_flops=float(10 ** best[2]),
        overhead_s=float(10 ** best[3]),
    )


def with_predictions(model: PerfModel, samples: list[Sample]) -> list[Sample]:
    return [Sample(s.probe, s.measured_s, predict(model, s.probe)) for s in samples]


def median_abs_error(samples: list[Sample]) -> float:
    return statistics.median(abs(s.error) for s in samples)


def mean_sq_log_error(samples: list[Sample]) -> float:
    """What ``fit`` minimises, over samples that carry their predictions."""
    return float(np.mean([np.log(s.predicted_s / s.measured_s) ** 2 for s in samples]))
