"""Control-plane overhead: TTFT and TPOT through the real stack vs the same engine in-process.

Both sides run the same requests one at a time (no queueing), alternating (stack, in-process,
stack, ...), with the same engine settings and torch thread count. The stack side is measured at the client (send -> first token chunk; mean
gap between token chunks), so it includes NATS hops, router tokenisation/detokenisation and the
worker's thread hand-offs. Overhead = stack p50 - in-process p50.

    python benchmarks/control_plane.py [--requests 20] [--prompt-words 64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from nitsum_cli.stack import Stack, StackConfig
from nitsum_core.client import NitsumClient
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.model import load_model
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.policy.goodput import mean_tpot
from nitsum_loadgen.replay import synth_prompt


class InProcess:
    """The same engine, tokenizer and settings, called directly."""

    def __init__(self) -> None:
        ckpt = resolve_checkpoint("smollm2")
        self.tok = Tokenizer(ckpt)
        self.engine = Engine(load_model(ckpt), EngineConfig(kv_cache_mb=256), self.tok.eos_token_ids)
        self.count = 0

    def run(self, text: str, n: int) -> tuple[float, float]:
        self.count += 1
        t0 = time.perf_counter()
        ids = self.tok.encode_prompt(text)  # the router tokenises too: count it on both sides
        self.engine.add_request(f"r{self.count}", ids, RequestParams(max_tokens=n, ignore_eos=True))
        times = []
        while self.engine.has_work():
            if self.engine.step():
                times.append(time.perf_counter())
        return times[0] - t0, mean_tpot(times[0], times[-1], len(times))


async def via_stack(client: NitsumClient, text: str, n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    times = []
    async for chunk in client.generate(text, max_tokens=n, ignore_eos=True):
        if chunk.token_ids:
            times.append(time.perf_counter())
    return times[0] - t0, mean_tpot(times[0], times[-1], len(times))


async def measure(prompts: list[str], n: int, threads: int) -> dict[str, list[tuple[float, float]]]:
    """Alternate one request through the stack and one in-process, so noise hits both alike."""
    torch.set_num_threads(threads)
    local = InProcess()
    home = Path(tempfile.mkdtemp(prefix="nitsum-overhead-"))
    stack = Stack(StackConfig(workers=1, threads_per_worker=threads, kv_cache_mb=256, home=home))
    await stack.start()
    out: dict[str, list[tuple[float, float]]] = {"in_process": [], "stack": []}
    try:
        async with NitsumClient(stack.nats_url) as client:
            await via_stack(client, prompts[0], n)  # warm-up both
            local.run(prompts[0], n)
            for text in prompts:
                out["stack"].append(await via_stack(client, text, n))
                out["in_process"].append(local.run(text, n))
    finally:
        stack.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="bench_results/control_plane.json")
    a = p.parse_args()
    rng = random.Random(0)
    prompts = [synth_prompt(a.prompt_words, rng) for _ in range(a.requests)]
    runs = asyncio.run(measure(prompts, a.new_tokens, a.threads))
    local_ttft, local_tpot = (list(x) for x in zip(*runs["in_process"], strict=True))
    stack_ttft, stack_tpot = (list(x) for x in zip(*runs["stack"], strict=True))
    med = statistics.median
    rows = {
        "ttft_p50_ms": (med(local_ttft) * 1e3, med(stack_ttft) * 1e3),
        "tpot_p50_ms": (med(local_tpot) * 1e3, med(stack_tpot) * 1e3),
    }
    print(f"{'metric':<12} | {'in-process':>10} | {'via stack':>10} | {'overhead':>9} | target")
    print("-" * 62)
    targets = {"ttft_p50_ms": 2.0, "tpot_p50_ms": 1.0}
    for k, (local, remote) in rows.items():
        print(f"{k:<12} | {local:>10.2f} | {remote:>10.2f} | {remote - local:>+8.2f} | < {targets[k]} ms")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": vars(a),
        "in_process": {"ttft_s": local_ttft, "tpot_s": local_tpot},
        "stack": {"ttft_s": stack_ttft, "tpot_s": stack_tpot},
        "summary": {k: {"in_process": v[0], "stack": v[1], "overhead": v[1] - v[0]} for k, v in rows.items()},
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
