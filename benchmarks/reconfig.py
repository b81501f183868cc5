"""Reconfiguration time: Nitsum's switch protocol vs the naive path, in one run, on 4 CPU workers.

A random-initialised Llama checkpoint with SmolLM2-135M's shape but 8 query / 4 KV heads (so
TP 1, 2 and 4 all divide it; SmolLM2's own 3 KV heads allow only TP 1 and 3) is served by a real
4-worker stack. With ``--requests`` requests generating, the pool goes TP 1 -> 2 -> 4 -> 1
(``[1,1,1,1] -> [2,2] -> [4] -> [1,1,1,1]``); each switch's phases come from the controller.

The naive path, measured in the same run on the same stack: restart all four workers (new
processes, weights reloaded, a fresh pool rendezvous), then re-prefill every in-flight request's
context (prompt + tokens generated so far), timed in-process with the same engine.

    python benchmarks/reconfig.py [--requests 16] [--out bench_results/reconfig.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import torch
from nats.aio.msg import Msg
from nitsum_cli.stack import Stack, StackConfig
from nitsum_core.client import NitsumClient
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.model import load_model
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.wire import subjects
from nitsum_core.wire.bus import connect
from nitsum_core.wire.codec import decode
from nitsum_core.wire.worker import WorkerHeartbeat

SWITCHES = ([2, 2], [4], [1, 1, 1, 1])


def write_checkpoint(path: Path) -> Path:
    """SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536) with 4 KV heads, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    smol = resolve_checkpoint("smollm2")
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=72,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (smol / name).exists():
            (path / name).write_bytes((smol / name).read_bytes())
    return path


async def restart_workers(stack: Stack, n: int) -> float:
    """Kill every worker and start fresh ones; seconds until all n heartbeat with a joined pool."""
    nc = await connect(stack.nats_url, name="bench-restart")
    old = {f"worker{s}": stack.procs[f"worker{s}"].pid for s in range(n)}
    ready: set[int] = set()

    async def on_hb(msg: Msg) -> None:
        hb = decode(WorkerHeartbeat, msg.data)
        if hb.pid not in old.values() and hb.pool_joined:
            ready.add(hb.slot)

    sub = await nc.subscribe(subjects.WORKER_HEARTBEAT, cb=on_hb)
    t0 = time.perf_counter()
    for name in old:
        stack.procs[name].kill()
        stack.procs[name].wait()
    stack.pool_id = uuid.uuid4().hex[:12]
    for s in range(n):
        stack.start_worker(s)
    while len(ready) < n:
        await asyncio.sleep(0.05)
    took = time.perf_counter() - t0
    await sub.unsubscribe()
    await nc.close()
    return took


def reprefill_seconds(ckpt: Path, contexts: list[list[int]], threads: int) -> float:
    """Prefill every context once (the naive path's re-prefill), same engine settings as the workers."""
    torch.set_num_threads(threads)
    engine = Engine(load_model(ckpt), EngineConfig(kv_cache_mb=256), set())
    t0 = time.perf_counter()
    for i, ctx in enumerate(contexts):
        engine.add_request(f"c{i}", ctx, RequestParams(max_tokens=1, ignore_eos=True))
    while engine.has_work():
        engine.step()
    return time.perf_counter() - t0


async def main_async(a: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="nitsum-reconfig-"))
    ckpt = write_checkpoint(tmp / "ckpt")
    stack = Stack(
        StackConfig(workers=4, model=str(ckpt), home=tmp / "home", kv_cache_mb=512, threads_per_worker=1)
    )
    await stack.start()
    rows = []
    try:
        async with NitsumClient(stack.nats_url) as c:
            progress: dict[int, list[int]] = {i: [] for i in range(a.requests)}
            prompts = [f"Request {i}: " + "tell me something new " * (4 + 3 * i) for i in range(a.requests)]

            async def run(i: int) -> None:
                async for chunk in c.generate(
                    prompts[i], max_tokens=a.max_tokens, ignore_eos=True, timeout_s=600
                ):
                    progress[i].extend(chunk.token_ids)

            tasks = [asyncio.create_task(run(i)) for i in range(a.requests)]
            for tp in SWITCHES:
                while min(len(v) for v in progress.values()) < a.gap_tokens * (1 + len(rows)):
                    for t in tasks:
                        if t.done() and t.exception():
                            raise t.exception()  # a request failed: report it, don't wait forever
                    await asyncio.sleep(0.05)
                res = await c.reconfigure(tp=tp, reason="benchmark")
                rows.append({"to": tp, **{k: v for k, v in msgspec.to_builtins(res).items() if k != "error"}})
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Naive path, same stack: what the in-flight requests would have cost to restart.
            tok = Tokenizer(ckpt)
            contexts = [tok.encode_prompt(p) + progress[i] for i, p in enumerate(prompts)]
        restart_s = await restart_workers(stack, 4)
    finally:
        stack.stop()
    prefill_s = reprefill_seconds(ckpt, contexts, threads=max(1, (os.cpu_count() or 2) - 1))
    naive_s = restart_s + prefill_s
    for r in rows:
        r["speedup_vs_naive"] = naive_s / r["phases"]["total"]
        mig = r["phases"].get("migrate", 0.0)
        r["migrate_gb_per_s"] = r["kv_bytes_moved"] / mig / 1e9 if mig else 0.0
    return {
        "requests_in_flight": a.requests,
        "context_tokens": sum(len(x) for x in contexts),
        "switches": rows,
        "naive": {"restart_reload_s": restart_s, "reprefill_s": prefill_s, "total_s": naive_s},
        "median_switch_s": statistics.median(r["phases"]["total"] for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=16, help="requests generating during the switches")
    p.add_argument("--max-tokens", type=int, default=600, help="long enough to span every switch")
    p.add_argument("--gap-tokens", type=int, default=8, help="tokens each request generates between switches")
    p.add_argument("--out", default="bench_results/reconfig.json")
    a = p.parse_args()
    res = asyncio.run(main_async(a))
    phases = ("hold", "pause", "plan", "migrate", "commit", "resume", "total")
    print(f"{a.requests} requests in flight, {res['context_tokens']} tokens of context (4 CPU workers)")
    print(
        f"{'switch':<14}"
        + "".join(f"{ph:>9}" for ph in phases)
        + f"{'KV MB':>9}{'GB/s':>7}{'moved':>7}{'x naive':>9}"
    )
    for r in res["switches"]:
        cells = "".join(f"{r['phases'].get(ph, 0) * 1000:9.1f}" for ph in phases)
        print(
            f"{'->' + str(r['to']):<14}{cells}{r['kv_bytes_moved'] / 1e6:9.2f}{r['migrate_gb_per_s']:7.2f}"
            f"{r['requests_moved']:7d}{r['speedup_vs_naive']:9.1f}"
        )
    n = res["naive"]
    print(
        f"naive path: restart+reload {n['restart_reload_s'] * 1000:.0f} ms + re-prefill {n['reprefill_s'] * 1000:.0f} ms"
        f" = {n['total_s'] * 1000:.0f} ms   (all times in ms)"
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
