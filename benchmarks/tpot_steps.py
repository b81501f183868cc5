"""TPOT-sized steps on the real engine: decodes' TPOT when long prompts arrive, sized vs unsized.

Chat requests with a TPOT target are decoding when long document prompts arrive. An engine with
a fixed token budget (the default, as vLLM/SGLang's chunked prefill) runs each
document chunk beside the decodes and stretches their steps; a TPOT-sized engine cuts the chunks
to what its learned step time says fits the decodes' target, and lets them through faster once
the chats are done. Both engines hold the same weights, get the same warm-up (so the sized one
has learned its step time), and run the same scenario alternately ``--repeats`` times; medians
are reported. The target is ``--tpot-x`` times the chats' decode-only step on this host, measured
in the warm-up, so the scenario means the same on any machine.

    python benchmarks/tpot_steps.py [--chats 4] [--docs 4] [--doc-len 1500] [--tpot-x 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.model import LlamaModel, load_model
from nitsum_core.policy.goodput import mean_tpot


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


def run_scenario(engine: Engine, a: argparse.Namespace, tpot_s: float, seed: int) -> dict:
    """Chats decode; once every chat has its first token, the documents arrive. Per-request times."""
    chat_params = RequestParams(max_tokens=a.chat_tokens, ignore_eos=True)
    doc_params = RequestParams(max_tokens=4, ignore_eos=True)
    added: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    count: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(a.chats):
        rid = f"chat{i}-{seed}"
        engine.add_request(rid, _tokens(a.chat_len, seed * 100 + i), chat_params, tpot_s=tpot_s)
        added[rid] = time.monotonic()
    docs_in = False
    while engine.has_work():
        outs = engine.step()
        now = time.monotonic()
        for o in outs:
            first.setdefault(o.request_id, now)
            count[o.request_id] = count.get(o.request_id, 0) + len(o.token_ids)
            if o.finish_reason is not None:
                done[o.request_id] = now
        if not docs_in and all(rid in first for rid in added):
            docs_in = True
            for i in range(a.docs):
                rid = f"doc{i}-{seed}"
                engine.add_request(rid, _tokens(a.doc_len, seed * 100 + 50 + i), doc_params)
                added[rid] = time.monotonic()
    chats = [r for r in added if r.startswith("chat")]
    docs = [r for r in added if r.startswith("doc")]
    tpots = [mean_tpot(first[r], done[r], count[r]) for r in chats]
    return {
        "chat_tpot_s": tpots,
        "chat_tpot_mean_s": statistics.mean(tpots),
        "chat_attainment": sum(t <= tpot_s for t in tpots) / len(tpots),
        "doc_ttft_mean_s": statistics.mean(first[r] - added[r] for r in docs),
        "wall_s": max(done.values()) - t0,
    }


def decode_step_s(engine: Engine, a: argparse.Namespace) -> float:
    """The chats' decode-only step on this host: the median step once all of them decode."""
    params = RequestParams(max_tokens=24, ignore_eos=True)
    for i in range(a.chats):
        engine.add_request(f"probe{i}", _tokens(a.chat_len, 900 + i), params)
    steps = []
    while engine.has_work():
        t = time.monotonic()
        engine.step()
        steps.append(time.monotonic() - t)
    return statistics.median(steps[4:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chats", type=int, default=4, help="decoding requests with a TPOT target")
    p.add_argument("--chat-len", type=int, default=64, help="their prompt tokens")
    p.add_argument("--chat-tokens", type=int, default=48, help="their output tokens")
    p.add_argument("--docs", type=int, default=4, help="long prompts arriving while the chats decode")
    p.add_argument("--doc-len", type=int, default=1500, help="their prompt tokens")
    p.add_argument("--tpot-x", type=float, default=2.0, help="TPOT target / decode-only step time")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="both engines' token budget")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="bench_results/tpot_steps.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model: LlamaModel = load_model(resolve_checkpoint("smollm2"))
    engines = {
        "fixed budget": Engine(
            model,
            EngineConfig(max_batched_tokens=a.max_batched_tokens, kv_cache_mb=1024),
            set(),
        ),
        "TPOT-sized": Engine(
            model,
            EngineConfig(max_batched_tokens=a.max_batched_tokens, kv_cache_mb=1024, tpot_sized_steps=True),
            set(),
        ),
    }
    step_s = decode_step_s(engines["fixed budget"], a)
    tpot_s = a.tpot_x * step_s
    print(
        f"decode-only step with {a.chats} chats: {step_s * 1000:.1f} ms; TPOT target {tpot_s * 1000:.1f} ms"
    )
    for engine in engines.values():  # warm-up: the sized engine learns its step time here
        run_scenario(engine, a, tpot_s, seed=0)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for rep in range(a.repeats):
        for name, engine in engines.items():
            r = run_scenario(engine, a, tpot_s, seed=rep + 1)
            runs[name].append(r)
            print(
                f"repeat {rep}: {name:<12} chat TPOT {r['chat_tpot_mean_s'] * 1000:7.1f} ms "
                f"(met {r['chat_attainment']:.0%})  doc TTFT {r['doc_ttft_mean_s']:6.2f} s  wall {r['wall_s']:6.2f} s",
                flush=True,
            )
    rows = []
    for name, rs in runs.items():
        rows.append(
            {
                "engine": name,
                "chat_tpot_ms": 1000 * statistics.median(r["chat_tpot_mean_s"] for r in rs),
                "chat_attainment": statistics.median(r["chat_attainment"] for r in rs),
                "doc_ttft_s": statistics.median(r["doc_ttft_mean_s"] for r in rs),
                "wall_s": statistics.median(r["wall_s"] for r in rs),
                "runs": rs,
            }
        )
    base = rows[0]
    print()
    print(
        f"TPOT target {tpot_s * 1000:.1f} ms ({a.tpot_x}x the {step_s * 1000:.1f} ms decode-only step), medians of {a.repeats}"
    )
    print(
        f"{'engine':<12} | {'chat TPOT ms':>12} | {'chats met':>9} | {'doc TTFT s':>10} | {'wall s':>7} | {'TPOT vs fixed':>13}"
    )
    print("-" * 80)
    for r in rows:
        print(
            f"{r['engine']:<12} | {r['chat_tpot_ms']:>12.1f} | {r['chat_attainment']:>9.0%} | {r['doc_ttft_s']:>10.2f} | "
            f"{r['wall_s']:>7.2f} | {r['chat_tpot_ms'] / base['chat_tpot_ms']:>12.2f}x"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    out.write_text(
        json.dumps(
            {
                "config": vars(a),
                "env": env,
                "decode_step_s": step_s,
                "tpot_target_s": tpot_s,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
