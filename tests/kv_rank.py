"""One rank of the KV-migration test (run by test_kv_migration.py): rank 0 sends, rank 1 receives."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from nitsum_core.engine.kv_migration import UnitMove, gather_units, recv_units, send_units
from nitsum_core.engine.tp import init_world


def source_pool(layers: int, slots: int, heads: int, hd: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(layers, 2, slots, heads, hd, generator=g)


def main() -> None:
    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    layers, bs, hd, blocks, heads = (int(x) for x in sys.argv[4:9])
    init_world(rank, 2, init, timeout_s=60)
    # TP 1 (all heads) -> rank 1 of TP 2 (heads [heads/2, heads)): units land in other blocks and
    # at re-based head positions, exactly what a TP split does.
    moves = [
        UnitMove(b, h, blocks - 1 - b, h - heads // 2)
        for b in range(blocks)
        for h in range(heads // 2, heads)
    ]
    if rank == 0:
        kv = source_pool(layers, blocks * bs, heads, hd)
        dist.barrier()
        t0 = time.perf_counter()
        sent = send_units(kv, bs, moves, dst=1, chunk=32)
        dist.barrier()
        Path(out).write_text(json.dumps({"bytes": sent, "seconds": time.perf_counter() - t0}))
    else:
        kv = torch.zeros(layers, 2, blocks * bs, heads // 2, hd)
        dist.barrier()
        got = recv_units(kv, bs, moves, src=0, chunk=32)
        dist.barrier()
        src = source_pool(layers, blocks * bs, heads, hd)
        want = gather_units(src, bs, [m.src_block for m in moves], [m.src_head for m in moves])
        have = gather_units(kv, bs, [m.dst_block for m in moves], [m.dst_head for m in moves])
        assert got == want.numel() * 4 and torch.equal(have, want), "migrated KV differs from the source"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
