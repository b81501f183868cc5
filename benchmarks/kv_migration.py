"""KV migration throughput vs size: head-units of SmolLM2-shaped KV sent between two processes
over gloo (loopback TCP), gather -> send -> scatter, double-buffered.

    python benchmarks/kv_migration.py [--tokens 1024 4096 16384 65536] [--chunk 64]

Reports time and GB/s per size; a fixed setup cost shows up as low GB/s at small sizes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from nitsum_core.engine.kv_migration import scatter_units, send_unit_list, unit_shape

LAYERS, HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 16  # SmolLM2-135M


class UnitMove(NamedTuple):
    """Source (block, head) on the sender -> destination (block, head) on the receiver."""

    src_block: int
    src_head: int
    dst_block: int
    dst_head: int


def send_units(
    kv: torch.Tensor,
    block_size: int,
    moves: list[UnitMove],
    dst: int,
    group: dist.ProcessGroup | None = None,
    chunk: int = 64,
) -> int:
    """Send the source side of ``moves`` to rank ``dst``; return the bytes sent."""
    return send_unit_list(
        kv, block_size, [m.src_block for m in moves], [m.src_head for m in moves], dst, group, chunk
    )


def recv_units(
    kv: torch.Tensor,
    block_size: int,
    moves: list[UnitMove],
    src: int,
    group: dist.ProcessGroup | None = None,
    chunk: int = 64,
) -> int:
    """Receive ``moves`` from rank ``src`` and scatter them; return the bytes received."""
    shape = unit_shape(kv, block_size)
    received = 0
    starts = list(range(0, len(moves), chunk))
    bufs = [torch.empty(min(chunk, len(moves) - s), *shape, dtype=kv.dtype) for s in starts[:2]]
    works = {}
    # Post the first two receives, then scatter each chunk as it lands and re-post into its buffer.
    for i in range(min(2, len(starts))):
        works[i] = dist.irecv(bufs[i][: min(chunk, len(moves) - starts[i])], src, group=group)
    for i, start in enumerate(starts):
        part = moves[start : start + chunk]
        works.pop(i).wait()
        data = bufs[i % 2][: len(part)]
        scatter_units(kv, block_size, [m.dst_block for m in part], [m.dst_head for m in part], data)
        received += data.numel() * data.element_size()
        nxt = i + 2
        if nxt < len(starts):
            n = min(chunk, len(moves) - starts[nxt])
            if bufs[nxt % 2].shape[0] < n:
                bufs[nxt % 2] = torch.empty(n, *shape, dtype=kv.dtype)
            works[nxt] = dist.irecv(bufs[nxt % 2][:n], src, group=group)
    return received


def _rank(rank: int, init: str, sizes: list[int], chunk: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=dt.timedelta(seconds=120)
    )
    rows = []
    for tokens in sizes:
        blocks = tokens // BLOCK
        moves = [UnitMove(b, h, b, h) for b in range(blocks) for h in range(HEADS)]
        kv = (
            torch.randn(LAYERS, 2, blocks * BLOCK, HEADS, HEAD_DIM)
            if rank == 0
            else torch.zeros(LAYERS, 2, blocks * BLOCK, HEADS, HEAD_DIM)
        )
        best = float("inf")
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            n = (
                send_units(kv, BLOCK, moves, 1, chunk=chunk)
                if rank == 0
                else recv_units(kv, BLOCK, moves, 0, chunk=chunk)
            )
            dist.barrier()
            best = min(best, time.perf_counter() - t0)
        rows.append({"tokens": tokens, "bytes": n, "seconds": best, "gb_per_s": n / best / 1e9})
        del kv
    if rank == 0:
        Path(out).write_text(json.dumps(rows, indent=2))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--chunk", type=int, default=64, help="units per staging buffer")
    p.add_argument("--out", default="bench_results/kv_migration.json")
    a = p.parse_args()
    tmp = tempfile.mkdtemp()
    os.makedirs(Path(a.out).parent, exist_ok=True)
    mp.spawn(_rank, args=(f"file://{tmp}/rdv", a.tokens, a.chunk, a.out), nprocs=2, join=True)
    rows = json.loads(Path(a.out).read_text())
    print(f"{'KV tokens':>10} | {'MB':>8} | {'ms':>8} | {'GB/s':>6}")
    print("-" * 42)
    for r in rows:
        print(
            f"{r['tokens']:>10} | {r['bytes'] / 1e6:>8.1f} | {r['seconds'] * 1e3:>8.1f} | {r['gb_per_s']:>6.2f}"
        )
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()
