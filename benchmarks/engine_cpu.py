"""Decode throughput of our engine vs HF transformers ``generate()`` on SmolLM2, same run, same weights.

For each batch size B, both sides run B prompts of the same length (so HF needs no padding) and
generate exactly N tokens (EOS ignored). Decode time = time(N tokens) - time(1 token), which
cancels prefill on both sides; decode tok/s = B * (N - 1) / decode time. The two engines are
measured alternately (ours, HF, ours, HF...) --repeats times and the medians are reported, so
machine noise hits both sides alike.

    python benchmarks/engine_cpu.py [--batches 1 8 32] [--new-tokens 64] [--prompt-len 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.model import load_model
from transformers import AutoModelForCausalLM


def _prompts(batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (batch, length), generator=g).tolist()


def time_ours(engine: Engine, prompts: list[list[int]], n: int) -> float:
    t0 = time.perf_counter()
    out = engine.generate(prompts, RequestParams(max_tokens=n, ignore_eos=True))
    dt = time.perf_counter() - t0
    assert all(len(o) == n for o in out)
    return dt


def time_hf(hf, prompts: list[list[int]], n: int) -> float:
    ids = torch.tensor(prompts)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n
    return dt


def decode_tps(timer, prompts: list[list[int]], n: int) -> float:  # noqa: ANN001
    """Decode tokens/s: a run of n tokens minus a run of 1 token (prefill) on the same prompts."""
    return len(prompts) * (n - 1) / max(1e-9, timer(prompts, n) - timer(prompts, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="bench_results/engine_cpu.json")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint("smollm2")
    engine = Engine(
        load_model(ckpt), EngineConfig(max_num_seqs=max(a.batches), kv_cache_mb=1024), eos_token_ids=set()
    )
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    n = a.new_tokens
    rows = []
    for b in a.batches:
        prompts = _prompts(b, a.prompt_len)
        time_ours(engine, prompts, 2), time_hf(hf, prompts, 2)  # warm-up
        ours_runs, hf_runs = [], []
        for _ in range(a.repeats):
            ours_runs.append(decode_tps(lambda p, k: time_ours(engine, p, k), prompts, n))
            hf_runs.append(decode_tps(lambda p, k: time_hf(hf, p, k), prompts, n))
        ours_tps, hf_tps = statistics.median(ours_runs), statistics.median(hf_runs)
        rows.append(
            {
                "batch": b,
                "nitsum_tok_s": ours_tps,
                "hf_tok_s": hf_tps,
                "ratio": ours_tps / hf_tps,
                "nitsum_runs": ours_runs,
                "hf_runs": hf_runs,
            }
        )
        print(
            f"batch {b:>3}: nitsum {ours_tps:8.1f} tok/s   HF generate {hf_tps:8.1f} tok/s   ratio {ours_tps / hf_tps:5.2f}x",
            flush=True,
        )
    print()
    print(f"{'batch':>5} | {'nitsum tok/s':>12} | {'HF tok/s':>9} | {'ratio':>6}")
    print("-" * 42)
    for r in rows:
        print(f"{r['batch']:>5} | {r['nitsum_tok_s']:>12.1f} | {r['hf_tok_s']:>9.1f} | {r['ratio']:>5.2f}x")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    out.write_text(json.dumps({"config": vars(a), "env": meta, "results": rows}, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
