"""One rank of the KV-migration test (run by test_kv_migration.py): rank 0 sends, rank 1 receives."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from nitsum_core.engine.kv_migration import gather_units, scatter_units, send_unit_list, unit_shape

CHUNK = 32  # units per message; both sides chunk identically, as the workers do


def source_pool(layers: int, slots: int, heads: int, hd: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(layers, 2, slots, heads, hd, generator=g)


def main() -> None:
    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    layers, bs, hd, blocks, heads = (int(x) for x in sys.argv[4:9])
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=dt.timedelta(seconds=60)
    )
    # TP 1 (all heads) -> rank 1 of TP 2 (heads [heads/2, heads)): units land in other blocks and
    # at re-based head positions, exactly what a TP split does.
    moves = [(b, h, blocks - 1 - b, h - heads // 2) for b in range(blocks) for h in range(heads // 2, heads)]
    src_blocks, src_heads, dst_blocks, dst_heads = (list(c) for c in zip(*moves, strict=True))
    if rank == 0:
        kv = source_pool(layers, blocks * bs, heads, hd)
        dist.barrier()
        t0 = time.perf_counter()
        sent = send_unit_list(kv, bs, src_blocks, src_heads, dst=1, chunk=CHUNK)
        dist.barrier()
        Path(out).write_text(json.dumps({"bytes": sent, "seconds": time.perf_counter() - t0}))
    else:
        kv = torch.zeros(layers, 2, blocks * bs, heads // 2, hd)
        dist.barrier()
        # As a worker's migrate step: every chunk received into staging, then scattered.
        staging = torch.empty(len(moves), *unit_shape(kv, bs))
        works = [dist.irecv(staging[i : i + CHUNK], 0) for i in range(0, len(moves), CHUNK)]
        for work in works:
            work.wait()
        scatter_units(kv, bs, dst_blocks, dst_heads, staging)
        got = staging.numel() * staging.element_size()
        dist.barrier()
        src = source_pool(layers, blocks * bs, heads, hd)
        want = gather_units(src, bs, src_blocks, src_heads)
        have = gather_units(kv, bs, dst_blocks, dst_heads)
        assert got == want.numel() * 4 and torch.equal(have, want), "migrated KV differs from the source"
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
