"""Open-loop replay: each request is sent at its arrival time whether or not earlier ones finished."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable

from nitsum_core.client import NitsumClient
from nitsum_core.errors import NitsumError
from nitsum_core.policy.goodput import RequestRecord, mean_tpot
from nitsum_core.workload import TraceRequest

# Common one-token English words: a prompt of n words is close to n tokens for BPE tokenizers.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "or",
    "had",
    "by",
    "but",
    "some",
    "what",
    "there",
    "we",
    "can",
    "out",
    "other",
    "were",
    "all",
    "your",
    "when",
    "up",
    "use",
    "word",
    "how",
    "said",
    "an",
    "each",
    "she",
    "which",
    "do",
    "their",
    "time",
    "if",
    "will",
    "way",
    "about",
    "many",
    "then",
    "them",
    "would",
    "write",
    "like",
    "so",
    "these",
    "her",
    "long",
    "make",
    "thing",
    "see",
    "him",
    "two",
    "has",
    "look",
    "more",
    "day",
    "could",
    "go",
    "come",
    "did",
    "my",
    "sound",
    "no",
    "most",
    "number",
    "who",
    "over",
    "know",
    "water",
    "than",
    "call",
    "first",
    "people",
    "may",
    "down",
]


def synth_prompt(num_tokens: int, rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, num_tokens)))


async def _one(
    client: NitsumClient, req: TraceRequest, prompt: str, start: float, timeout_s: float
) -> RequestRecord:
    await asyncio.sleep(max(0.0, start + req.arrival_s - time.monotonic()))
    sent = time.monotonic()
    try:
        done = await client.complete(
            prompt, tier=req.tier, max_tokens=req.output_tokens, ignore_eos=True, timeout_s=timeout_s
        )
    except NitsumError as exc:
        return RequestRecord(req.tier, req.arrival_s, req.prompt_tokens, 0, None, None, error=exc.code)
    # Client-side timings: they include the bus hops a user sees.
    ttft = done.first_chunk_at - sent if done.chunk_times else None
    n = len(done.token_ids)
    tpot = mean_tpot(done.first_chunk_at, done.chunk_times[-1] if done.chunk_times else 0.0, n)
    return RequestRecord(req.tier, req.arrival_s, done.usage.prompt_tokens, n, ttft, tpot)


async def replay(
    nats_url: str,
    workload: list[TraceRequest],
    seed: int = 0,
    timeout_s: float = 600.0,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Replay ``workload``; return one record per request and the wall time of the run."""
    rng = random.Random(seed)
    prompts = [synth_prompt(r.prompt_tokens, rng) for r in workload]
    async with NitsumClient(nats_url) as client:
        start = time.monotonic()
        tasks = [
            asyncio.create_task(_one(client, r, p, start, timeout_s))
            for r, p in zip(workload, prompts, strict=True)
        ]
        reporter = asyncio.create_task(_report(tasks, start, progress)) if progress else None
        records = await asyncio.gather(*tasks)
        if reporter:
            reporter.cancel()
        elapsed = time.monotonic() - start
    return list(records), elapsed


async def _report(tasks: list[asyncio.Task], start: float, progress: Callable[[str], None]) -> None:
    while True:
        await asyncio.sleep(2.0)
        done = [t for t in tasks if t.done()]
        failed = sum(1 for t in done if t.result().error is not None)
        progress(f"  [{time.monotonic() - start:6.1f}s] {len(done)}/{len(tasks)} done, {failed} failed")


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
