"""Tensor parallelism runtime on torch.distributed: gloo on CPU (NCCL on CUDA, import-guarded).

Small and explicit (after gpt-fast's tp.py): a process group per aligned instance, and an
all-reduce hook on the model shard. Collectives block: call them from the engine thread, never
from the asyncio loop.
"""

from __future__ import annotations

import datetime as dt

import torch
import torch.distributed as dist

from nitsum_core.engine.model import LlamaModel, ModelShard
from nitsum_core.errors import NitsumError


class PeerLost(NitsumError):
    """A rank of the instance stopped answering a collective (dead or hung) within the timeout."""

    code = "worker_lost"


def _collective(what: str, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:
        raise PeerLost(f"TP peer lost during {what}: {str(exc).splitlines()[0]}") from exc


def aligned_groups(pool_size: int) -> list[tuple[int, ...]]:
    """Every aligned block of TP >= 2 in a pool of ``pool_size`` slots, in a fixed order."""
    out = []
    k = 2
    while k <= pool_size:
        out += [tuple(range(j * k, (j + 1) * k)) for j in range(pool_size // k)]
        k *= 2
    return out


def join_pool(
    slot: int, pool_size: int, store: dist.Store, timeout_s: float = 30.0
) -> dict[tuple[int, ...], dist.ProcessGroup]:
    """Join the pool's gloo world and build the communicator of every aligned group once.

    Called once at start-up (docs/architecture.md, communicators): a later TP switch picks a
    cached group, it never rendezvouses. Returns the groups this slot belongs to, by their slots.
    """
    dist.init_process_group(
        "gloo", store=store, rank=slot, world_size=pool_size, timeout=dt.timedelta(seconds=timeout_s)
    )
    mine: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for slots in aligned_groups(pool_size):
        group = dist.new_group(ranks=list(slots), backend="gloo")  # every rank must call this
        if slot in slots:
            mine[slots] = group
    return mine


def attach(model: LlamaModel, tp: int, rank_in_instance: int, group: dist.ProcessGroup | None) -> ModelShard:
    """The shard of ``model`` for this rank with its all-reduce bound to ``group``."""
    shard = model.shard(tp, rank_in_instance)
    if tp > 1:
        if group is None:
            raise ValueError("TP > 1 needs the instance's process group")

        def all_reduce(t: torch.Tensor) -> None:
            _collective("all-reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM, group=group)

        shard.all_reduce = all_reduce
    return shard


def broadcast_step(step: object | None, group: dist.ProcessGroup, leader: int) -> object | None:
    """Leader -> followers: one engine step's inputs (ids + attention metadata), or None to stop.

    Followers hold no scheduling state: they run exactly the plan the leader broadcasts.
    (Pickled over gloo; the CUDA path would broadcast the tensors themselves.)
    """
    box = [step]
    _collective("step broadcast", dist.broadcast_object_list, box, src=leader, group=group)
    return box[0]


def leader_hook(group: dist.ProcessGroup, leader: int):  # noqa: ANN201
    """An Engine ``before_forward`` hook that ships each step to the followers."""

    def hook(input_ids: torch.Tensor, meta: object) -> None:
        broadcast_step((input_ids, meta), group, leader)

    return hook


IDLE = "idle"  # broadcast by an idle leader so its followers' collective does not time out


def follower_loop(shard: ModelShard, kv: torch.Tensor, group: dist.ProcessGroup, leader: int) -> int:
    """Run broadcast steps until the leader sends None; return how many were run."""
    steps = 0
    while (step := broadcast_step(None, group, leader)) is not None:
        if step == IDLE:
            continue
        input_ids, meta = step
        shard.forward(input_ids, meta, kv)
        steps += 1
    return steps
