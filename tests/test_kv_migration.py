"""KV head-unit migration: gather/scatter round trips; a real two-process transfer is bit-exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from nitsum_core.engine.kv_migration import gather_units, scatter_units

HERE = Path(__file__).parent


def test_gather_scatter_round_trip_moves_whole_units() -> None:
    kv = torch.randn(3, 2, 8 * 4, 4, 5)  # layers, K/V, 8 blocks of 4 slots, 4 heads, dim 5
    data = gather_units(kv, 4, [6, 1, 3], [0, 3, 2])
    assert data.shape == (3, 3, 2, 4, 5) and data.is_contiguous()
    torch.testing.assert_close(data[1], kv[:, :, 4:8, 3, :], rtol=0, atol=0)
    dst = torch.zeros(3, 2, 8 * 4, 2, 5)  # the receiver holds 2 heads per block
    scatter_units(dst, 4, [0, 7, 2], [1, 0, 1], data)
    torch.testing.assert_close(dst[:, :, 28:32, 0, :], kv[:, :, 4:8, 3, :], rtol=0, atol=0)
    assert torch.count_nonzero(dst) == data.numel()  # nothing else was written


def test_two_process_transfer_is_bit_exact(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    init = f"file://{tmp_path / 'rdv'}"
    shape = ["4", "16", "32", "40", "4"]  # layers, block size, head dim, blocks, heads: 80 units, 2.6 MB
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "kv_rank.py"), str(r), init, str(out), *shape],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        p.wait(timeout=120)
        assert p.returncode == 0, p.stdout.read()
    stats = json.loads(out.read_text())
    assert stats["bytes"] == 40 * 2 * 4 * 2 * 16 * 32 * 4
