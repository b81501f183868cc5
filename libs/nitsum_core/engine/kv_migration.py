"""Moving KV head-units between workers (docs/architecture.md, switch protocol): gather -> send -> scatter.

A unit is one KV head of one block for every layer, K and V: ``kv[:, :, block*bs:(block+1)*bs,
head, :]`` in the engine's ``[layers, 2, slots, heads, head_dim]`` pool. Units are gathered into a
contiguous staging buffer, sent point to point over the process group, and scattered into the
receiver's (possibly different) blocks and head positions. Two staging buffers alternate so the
next chunk is gathered while the previous one is on the wire.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _blocked(kv: torch.Tensor, block_size: int) -> torch.Tensor:
    layers, two, slots, heads, hd = kv.shape
    return kv.view(layers, two, slots // block_size, block_size, heads, hd)


def gather_units(
    kv: torch.Tensor, block_size: int, blocks: list[int], heads: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Units (blocks[i], heads[i]) as one contiguous [n, layers, 2, block_size, head_dim] tensor."""
    kvb = _blocked(kv, block_size)
    # Two index lists split by a slice: the indexed dimension comes first in the result.
    data = kvb[:, :, torch.tensor(blocks), :, torch.tensor(heads), :]
    if out is None:
        return data.contiguous()
    out[: len(blocks)].copy_(data)
    return out[: len(blocks)]


def scatter_units(
    kv: torch.Tensor, block_size: int, blocks: list[int], heads: list[int], data: torch.Tensor
) -> None:
    """Write units gathered by ``gather_units`` into (blocks[i], heads[i]) of ``kv``."""
    kvb = _blocked(kv, block_size)
    kvb[:, :, torch.tensor(blocks), :, torch.tensor(heads), :] = data


def unit_shape(kv: torch.Tensor, block_size: int) -> tuple[int, int, int, int]:
    layers, two, _, _, hd = kv.shape
    return (layers, two, block_size, hd)


def send_unit_list(
    kv: torch.Tensor,
    block_size: int,
    blocks: list[int],
    heads: list[int],
    dst: int,
    group: dist.ProcessGroup | None = None,
    chunk: int = 64,
) -> int:
    """Send units (blocks[i], heads[i]) to rank ``dst`` in ``chunk``-unit messages; return the bytes.

    Two staging buffers alternate, so the next chunk is gathered while the previous one is on the
    wire. The receiver must post matching receives (same chunking) or this blocks.
    """
    bufs = [torch.empty(chunk, *unit_shape(kv, block_size), dtype=kv.dtype) for _ in range(2)]
    pending: list[dist.Work | None] = [None, None]
    sent = 0
    for i, start in enumerate(range(0, len(blocks), chunk)):
        slot = i % 2
        if pending[slot] is not None:
            pending[slot].wait()  # the buffer we are about to refill is off the wire
        part = slice(start, start + chunk)
        staged = gather_units(kv, block_size, blocks[part], heads[part], bufs[slot])
        pending[slot] = dist.isend(staged.contiguous(), dst, group=group)
        sent += staged.numel() * staged.element_size()
    for work in pending:
        if work is not None:
            work.wait()
    return sent
