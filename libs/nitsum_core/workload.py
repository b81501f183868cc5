"""Workloads: trace readers (Azure 2023, BurstGPT), the built-in synthetic workload, scaling, tiers.

Traces are read from wherever the user keeps them (nothing is bundled). A malformed row raises
``TraceError`` naming the file and line.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path


class TraceError(ValueError):
    """A trace file that cannot be read, with the file and line in the message."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds from the start of the workload
    prompt_tokens: int
    output_tokens: int
    tier: str = "interactive"
    source: str = ""
    log_type: str = ""  # BurstGPT 'Conversation log' / 'API log'


AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def _open_rows(path: Path) -> tuple[list[str], Iterable[tuple[int, list[str]]]]:
    try:
        f = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open trace ({exc.strerror})") from None
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        f.close()
        raise TraceError(f"{path}: empty file (expected a CSV header)")

    def rows() -> Iterable[tuple[int, list[str]]]:
        with f:
            for row in reader:
                if row:
                    yield reader.line_num, row

    return [h.strip() for h in header], rows()


def _azure_time(value: str) -> float:
    # '2023-11-16 18:17:03.9799600': 7 fractional digits, which fromisoformat (3.11) rejects.
    head, _, frac = value.strip().partition(".")
    base = dt.datetime.strptime(head, "%Y-%m-%d %H:%M:%S")
    return base.timestamp() + (float("0." + frac) if frac else 0.0)


def read_azure(path: str | Path) -> list[TraceRequest]:
    """Azure LLM inference trace (2023 or 2024 week-long): TIMESTAMP, ContextTokens, GeneratedTokens."""
    p = Path(path)
    header, rows = _open_rows(p)
    try:
        it, ic, ig = (header.index(c) for c in AZURE_COLUMNS)
    except ValueError:
        raise TraceError(f"{p}: line 1: expected Azure columns {AZURE_COLUMNS}, got {header}") from None
    out: list[TraceRequest] = []
    t0: float | None = None
    for line, row in rows:
        try:
            t = _azure_time(row[it])
            prompt, output = int(row[ic]), int(row[ig])
        except (ValueError, IndexError) as exc:
            raise TraceError(f"{p}: line {line}: cannot parse {row!r} ({exc})") from None
        if t0 is None:
            t0 = t
        out.append(TraceRequest(t - t0, prompt, output, source=p.name))
    if not out:
        raise TraceError(f"{p}: no requests after the header")
    return out


def read_burstgpt(path: str | Path, keep_failed: bool = False) -> list[TraceRequest]:
    """BurstGPT (v1 or v3 columns). Failed requests (0 response tokens) are skipped unless asked."""
    p = Path(path)
    header, rows = _open_rows(p)
    try:
        it, ip, io = (header.index(c) for c in BURSTGPT_COLUMNS)
    except ValueError:
        raise TraceError(f"{p}: line 1: expected BurstGPT columns {BURSTGPT_COLUMNS}, got {header}") from None
    il = header.index("Log Type") if "Log Type" in header else None
    out: list[TraceRequest] = []
    t0: float | None = None
    for line, row in rows:
        try:
            t = float(row[it])
            prompt, output = int(row[ip]), int(row[io])
            log_type = row[il] if il is not None else ""
        except (ValueError, IndexError) as exc:
            raise TraceError(f"{p}: line {line}: cannot parse {row!r} ({exc})") from None
        if t0 is None:
            t0 = t
        if output == 0 and not keep_failed:
            continue
        out.append(TraceRequest(t - t0, prompt, output, source=p.name, log_type=log_type))
    if not out:
        raise TraceError(f"{p}: no requests after the header")
    return out


def read_trace(path: str | Path, fmt: str = "auto") -> list[TraceRequest]:
    """Read a trace, detecting Azure vs BurstGPT from the header when ``fmt`` is 'auto'."""
    if fmt == "azure":
        return read_azure(path)
    if fmt == "burstgpt":
        return read_burstgpt(path)
    if fmt != "auto":
        raise ValueError(f"unknown trace format {fmt!r}; use auto, azure or burstgpt")
    header, rows = _open_rows(Path(path))
    for _ in rows:  # close the file
        break
    if "ContextTokens" in header:
        return read_azure(path)
    if "Request tokens" in header:
        return read_burstgpt(path)
    raise TraceError(
        f"{path}: line 1: unknown trace format (header {header}); expected Azure or BurstGPT columns"
    )


# Built-in synthetic workload: a log-normal maximum-likelihood fit of the Azure 2023
# conversation trace (AzureLLMInferenceTrace_conv.csv: 19,366 requests), Poisson arrivals
# (the trace's inter-arrival CV is 1.09). See docs/benchmarks.md.
AZURE_CONV_FIT = {
    "rate_per_s": 5.53,
    "prompt_log_mu": 6.633,
    "prompt_log_sigma": 0.985,
    "output_log_mu": 5.019,
    "output_log_sigma": 0.859,
}


def synthetic_azure_conv(num_requests: int, seed: int = 0) -> list[TraceRequest]:
    """``num_requests`` requests drawn from the Azure-conversation fit, at the trace's own rate."""
    rng = random.Random(seed)
    f = AZURE_CONV_FIT
    t = 0.0
    out: list[TraceRequest] = []
    for _ in range(num_requests):
        out.append(
            TraceRequest(
                arrival_s=t,
                prompt_tokens=max(1, round(rng.lognormvariate(f["prompt_log_mu"], f["prompt_log_sigma"]))),
                output_tokens=max(1, round(rng.lognormvariate(f["output_log_mu"], f["output_log_sigma"]))),
                source="synthetic-azure-conv",
            )
        )
        t += rng.expovariate(f["rate_per_s"])
    return out


def scale_tokens(
    reqs: list[TraceRequest], factor: float, max_prompt: int | None = None, max_output: int | None = None
) -> list[TraceRequest]:
    """Multiply token counts by ``factor`` (at least 1 token), then cap them."""
    out = []
    for r in reqs:
        p = max(1, round(r.prompt_tokens * factor))
        o = max(1, round(r.output_tokens * factor))
        out.append(replace(r, prompt_tokens=min(p, max_prompt or p), output_tokens=min(o, max_output or o)))
    return out


def scale_rate(reqs: list[TraceRequest], rate_per_s: float) -> list[TraceRequest]:
    """Stretch or compress time so the mean arrival rate is ``rate_per_s`` (burst shape kept)."""
    if len(reqs) < 2 or rate_per_s <= 0:
        return list(reqs)
    span = reqs[-1].arrival_s - reqs[0].arrival_s
    if span <= 0:
        return list(reqs)
    k = (len(reqs) - 1) / rate_per_s / span
    t0 = reqs[0].arrival_s
    return [replace(r, arrival_s=(r.arrival_s - t0) * k) for r in reqs]


def window(reqs: list[TraceRequest], start_s: float, duration_s: float) -> list[TraceRequest]:
    """Requests arriving in [start_s, start_s + duration_s), re-based to start at 0."""
    sel = [r for r in reqs if start_s <= r.arrival_s < start_s + duration_s]
    return [replace(r, arrival_s=r.arrival_s - start_s) for r in sel]


def merge(*streams: list[TraceRequest]) -> list[TraceRequest]:
    """One arrival stream from several (each keeps its tier and source)."""
    return sorted((r for s in streams for r in s), key=lambda r: r.arrival_s)


def assign_tiers(reqs: list[TraceRequest], fractions: dict[str, float], seed: int = 0) -> list[TraceRequest]:
    """Give each request a tier drawn with the given fractions (normalised), reproducibly."""
    if not fractions or any(v < 0 for v in fractions.values()) or sum(fractions.values()) <= 0:
        raise ValueError(f"tier fractions must be non-negative and sum to > 0, got {fractions}")
    rng = random.Random(seed)
    names = list(fractions)
    weights = [fractions[n] for n in names]
    return [replace(r, tier=rng.choices(names, weights)[0]) for r in reqs]


def parse_tier_mix(spec: str) -> dict[str, float]:
    """'interactive=0.5,agent=0.3,background=0.2' -> dict."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"bad tier mix {spec!r}: expected name=fraction[,name=fraction...]")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"bad tier mix {spec!r}: {value!r} is not a number") from None
    return out


def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else math.nan
