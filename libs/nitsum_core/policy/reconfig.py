"""Pure pieces of a topology switch (docs/architecture.md#switch-protocol): aligned cuts and the KV migration plan.

No NATS, no torch: the controller builds topologies here, the kv_broker computes plans here, and
workers derive the exact units of each transfer here, so every side agrees by construction.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import NamedTuple

from nitsum_core.errors import InvalidRequest
from nitsum_core.policy.kv_cache import BlockManager, blocks_needed
from nitsum_core.policy.plan import Assignment, Plan, TierSet
from nitsum_core.wire.cut import Topology, TopologyInstance
from nitsum_core.wire.kv import KvPlan, KvPlanRequest, KvTransfer, MovedRequest


def is_aligned_block(slots: Sequence[int]) -> bool:
    """Whether ``slots`` are [j*k, (j+1)*k) for k = their count, a power of two: the only blocks
    a TP-k instance may run on, as its weight and KV slices nest only there."""
    k = len(slots)
    return (
        k > 0 and not k & (k - 1) and slots[0] % k == 0 and list(slots) == list(range(slots[0], slots[0] + k))
    )


def aligned_topology(degrees: list[int], slots: list[int], epoch: int, reason: str) -> Topology:
    """Instances of TP ``degrees[i]`` laid out in slot order, each on an aligned block.

    ``[2, 1, 1]`` on slots 0-3 gives [0, 1], [2], [3]; ``[1, 2, 1]`` is rejected because [1, 2]
    does not start at a multiple of 2 (its weight and KV slices would not nest).
    """
    if not degrees or any(k < 1 for k in degrees):
        raise InvalidRequest(f"TP degrees must be positive integers, got {degrees}")
    if sum(degrees) != len(slots):
        raise InvalidRequest(f"TP degrees {degrees} cover {sum(degrees)} slots; the pool has {len(slots)}")
    if sorted(slots) != list(range(slots[0], slots[0] + len(slots))) or slots[0] != 0:
        raise InvalidRequest(f"the pool must be slots 0..N-1 with every worker alive, got {sorted(slots)}")
    instances = []
    start = 0
    for i, k in enumerate(degrees):
        if not is_aligned_block(range(start, start + k)):
            raise InvalidRequest(
                f"instance {i} (TP {k}) would start at slot {start}: an instance of TP k must sit on an "
                f"aligned block [j*k, (j+1)*k) with k a power of two; reorder the degrees, e.g. largest first"
            )
        instances.append(TopologyInstance(instance_id=i, slots=list(range(start, start + k))))
        start += k
    return Topology(epoch=epoch, instances=instances, written_at=time.time(), reason=reason)


def _placed(a: Assignment, slots: Sequence[int] | None) -> list[int]:
    """The slots ``a`` runs on: its positions, or the live ``slots`` they stand for."""
    return a.slots if slots is None else [slots[p] for p in a.slots]


def placement_error(
    plan: Plan, slots: Sequence[int] | None = None, tp_world: Collection[int] | None = None
) -> str | None:
    """Why ``plan`` cannot run on ``slots`` (see ``plan_topology``), or None where it can: each
    instance must land on an aligned block of the live slots its positions stand for, and, where
    ``tp_world`` is given, a TP > 1 one only on slots that hold the pool's TP communicators (a
    slot still joining at start, or a worker started after the pool formed, runs TP 1 only)."""
    for a in sorted(plan.assignments, key=lambda a: a.start):
        placed = _placed(a, slots)
        if not is_aligned_block(placed):
            fix = (
                f"the live slots {list(slots)} have a gap there; start a worker on the missing slot"
                if slots is not None
                else "start it at a multiple of its degree"
            )
            return (
                f"TP {a.tp} on positions {a.slots} would run on slots {placed}, "
                f"not an aligned block [j*{a.tp}, (j+1)*{a.tp}): {fix}"
            )
        outside = [s for s in placed if tp_world is not None and a.tp > 1 and s not in tp_world]
        if outside:
            return (
                f"TP {a.tp} on slots {placed}: slots {outside} have no TP communicators "
                "(still joining the pool, or started after it formed: restart the pool to bring them in)"
            )
    return None


def plan_topology(plan: Plan, epoch: int, reason: str, slots: Sequence[int] | None = None) -> Topology:
    """The topology of a plan: one instance per assignment, in slot order.

    ``slots``: the live slots that the plan's positions 0..n-1 stand for, in order (the
    control loop cuts a pool of n; after a worker died mid-range the pool is, say, 0, 1, 3).
    Each instance must land on an aligned block of them, or the cut is refused.
    """
    error = placement_error(plan, slots)
    if error is not None:
        raise InvalidRequest(error)
    instances = [
        TopologyInstance(instance_id=i, slots=_placed(a, slots), role=a.role, tiers=a.tier.to_wire())
        for i, a in enumerate(sorted(plan.assignments, key=lambda a: a.start))
    ]
    return Topology(epoch=epoch, instances=instances, written_at=time.time(), reason=reason)


def topology_plan(topo: Topology, slots: Sequence[int] | None = None) -> Plan:
    """The plan a topology runs (an instance serves every tier, one, or a set).

    ``slots``: the topology's live slots in order; an instance's start is then its position among
    them (the inverse of ``plan_topology``'s mapping).
    """
    position = {s: i for i, s in enumerate(slots)} if slots is not None else None
    out = [
        Assignment(
            inst.slots[0] if position is None else position[inst.slots[0]],
            inst.tp,
            inst.role,
            TierSet.from_wire(inst.tiers),
        )
        for inst in topo.instances
    ]
    return Plan(sorted(out, key=lambda a: a.start))


def changed_slots(old: Topology, new: Topology) -> list[int]:
    """Slots whose instance differs between ``old`` and ``new`` (only they pause)."""
    same = {tuple(i.slots) for i in old.instances} & {tuple(i.slots) for i in new.instances}
    every = {s for t in (old, new) for i in t.instances for s in i.slots}
    return sorted(s for s in every if not any(s in keep for keep in same))


def instance_of(topo: Topology, slot: int) -> TopologyInstance | None:
    return next((i for i in topo.instances if slot in i.slots), None)


def head_owner(inst: TopologyInstance, head: int, num_kv_heads: int) -> int:
    """The slot of ``inst`` holding KV head ``head`` (rank r of TP k holds heads [r*h/k, (r+1)*h/k))."""
    return inst.slots[head // (num_kv_heads // inst.tp)]


def plan_migration(req: KvPlanRequest) -> KvPlan:
    """Which instance continues each paused request, its new block table, and the head moves.

    Merges keep every request on the new instance that contains its old one; splits spread the
    old instance's requests over the new instances (fewest assigned KV tokens first). A request
    whose KV does not fit its new instance restarts from its tokens there (``recomputed``).
    """
    h, bs = req.num_kv_heads, req.block_size
    for inst in req.new.instances:
        if h % inst.tp:
            raise InvalidRequest(f"TP {inst.tp} does not divide the model's {h} KV heads")
    pools: dict[int, BlockManager] = {}
    load: dict[int, int] = {}
    # Only the paused slots report their KV units: an instance the switch leaves as it is keeps
    # its own requests and blocks, and no paused request can land on it (it overlaps no old
    # instance that changed).
    for inst in req.new.instances:
        if not all(s in req.kv_units for s in inst.slots):
            continue
        units = min(req.kv_units[s] for s in inst.slots)
        pools[inst.instance_id] = BlockManager(max(1, units // (h // inst.tp)), bs)
        load[inst.instance_id] = 0
    plan = KvPlan()
    for state in req.requests:
        old = instance_of(req.old, state.slot)
        if old is None:
            raise InvalidRequest(
                f"request {state.request_id} is on slot {state.slot}, which is in no instance"
            )
        candidates = [i for i in req.new.instances if set(i.slots) & set(old.slots)]
        if not candidates:
            raise InvalidRequest(f"no new instance overlaps slots {old.slots}")
        if any(i.instance_id not in pools for i in candidates):
            raise InvalidRequest(
                f"request {state.request_id} moves to slots no KV units were reported for "
                f"(reported: {sorted(req.kv_units)})"
            )
        target = min(candidates, key=lambda i: (load[i.instance_id], i.instance_id))
        load[target.instance_id] += len(state.token_ids)
        pool = pools[target.instance_id]
        table: list[int] = []
        if state.num_computed and pool.can_reserve(state.request_id, state.num_computed):
            table = pool.reserve(state.request_id, state.num_computed).block_table
        elif state.num_computed:
            plan.recomputed.append(state.request_id)
        plan.assignments.append(
            MovedRequest(request_id=state.request_id, leader=target.leader, block_table=table)
        )
        if not table:
            continue
        start = 0
        for head in range(1, h + 1):
            pair = (head_owner(old, start, h), head_owner(target, start, h))
            if head == h or (head_owner(old, head, h), head_owner(target, head, h)) != pair:
                plan.transfers.append(
                    KvTransfer(
                        request_id=state.request_id,
                        src_slot=pair[0],
                        dst_slot=pair[1],
                        head_start=start,
                        head_end=head,
                        num_tokens=state.num_computed,
                    )
                )
                start = head
    return plan


class Units(NamedTuple):
    """The (block, local head) pairs of one transfer on one side, block-major."""

    blocks: list[int]
    heads: list[int]


def transfer_units(
    transfer: KvTransfer,
    table: list[int],
    inst: TopologyInstance,
    slot: int,
    num_kv_heads: int,
    block_size: int,
) -> Units:
    """Units of ``transfer`` as addressed in ``slot``'s pool while it is rank of ``inst``.

    Sender and receiver enumerate the same (token block, global head) sequence, each mapped to
    its own blocks and head positions, so chunk i on the wire means the same units on both sides.
    """
    per_rank = num_kv_heads // inst.tp
    base = inst.slots.index(slot) * per_rank
    nb = blocks_needed(transfer.num_tokens, block_size)
    if len(table) < nb:
        raise ValueError(f"block table of {transfer.request_id} has {len(table)} blocks, needs {nb}")
    heads = range(transfer.head_start, transfer.head_end)
    if not all(base <= hd < base + per_rank for hd in heads):
        raise ValueError(f"slot {slot} does not hold heads {transfer.head_start}-{transfer.head_end}")
    blocks = [table[b] for b in range(nb) for _ in heads]
    local = [hd - base for _ in range(nb) for hd in heads]
    return Units(blocks, local)
