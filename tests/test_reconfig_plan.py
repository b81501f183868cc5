"""The pure side of a switch: aligned cuts, migration plans, unit addressing, engine hand-over."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import shares_storage
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.kv_migration import gather_units, scatter_units
from nitsum_core.engine.model import load_model
from nitsum_core.errors import InvalidRequest
from nitsum_core.policy import reconfig
from nitsum_core.wire.cut import Topology, TopologyInstance
from nitsum_core.wire.kv import KvPlan, KvPlanRequest, KvTransfer, RequestState
from nitsum_core.wire.worker import SamplingParams

H, BS = 4, 16


def _topo(*groups: list[int], epoch: int = 1) -> Topology:
    return Topology(
        epoch=epoch,
        instances=[TopologyInstance(instance_id=i, slots=g) for i, g in enumerate(groups)],
        written_at=0.0,
    )


def _state(rid: str, slot: int, tokens: int, table: list[int]) -> RequestState:
    return RequestState(
        request_id=rid,
        router_id="r",
        slot=slot,
        token_ids=list(range(tokens + 1)),
        num_prompt_tokens=3,
        num_computed=tokens,
        priority=0,
        sampling=SamplingParams(max_tokens=100),
        block_table=table,
    )


def _plan(old: Topology, new: Topology, states: list[RequestState], units: int = 64) -> KvPlan:
    slots = {s for i in new.instances for s in i.slots}
    return reconfig.plan_migration(
        KvPlanRequest(
            old=old,
            new=new,
            requests=states,
            kv_units=dict.fromkeys(slots, units),
            num_kv_heads=H,
            block_size=BS,
        )
    )


def test_aligned_topology_accepts_buddy_blocks_and_rejects_misaligned_ones() -> None:
    t = reconfig.aligned_topology([2, 1, 1], [0, 1, 2, 3], epoch=5, reason="x")
    assert [i.slots for i in t.instances] == [[0, 1], [2], [3]] and t.epoch == 5
    assert [i.slots for i in reconfig.aligned_topology([4], [0, 1, 2, 3], 1, "").instances] == [[0, 1, 2, 3]]
    with pytest.raises(InvalidRequest, match="aligned"):
        reconfig.aligned_topology([1, 2, 1], [0, 1, 2, 3], 1, "")
    with pytest.raises(InvalidRequest, match="aligned"):
        reconfig.aligned_topology([3, 1], [0, 1, 2, 3], 1, "")
    with pytest.raises(InvalidRequest, match="cover 2 slots"):
        reconfig.aligned_topology([1, 1], [0, 1, 2, 3], 1, "")


def test_only_changed_instances_pause() -> None:
    old, new = _topo([0], [1], [2, 3]), _topo([0, 1], [2, 3])
    assert reconfig.changed_slots(old, new) == [0, 1]
    assert reconfig.changed_slots(old, old) == []


def test_a_plan_needs_kv_units_only_from_the_slots_that_change() -> None:
    # The switch driver reports KV units for the paused slots only; an instance the switch leaves
    # as it is ([2], [3] here) is not in the request, and its requests are not in the plan.
    old, new = _topo([0], [1], [2], [3]), _topo([0, 1], [2], [3], epoch=2)
    plan = reconfig.plan_migration(
        KvPlanRequest(
            old=old,
            new=new,
            requests=[_state("a", 1, 20, [0, 1])],
            kv_units={0: 64, 1: 64},
            num_kv_heads=H,
            block_size=BS,
        )
    )
    assert [(a.request_id, a.leader) for a in plan.assignments] == [("a", 0)]
    assert plan.assignments[0].block_table and not plan.recomputed


def test_merge_moves_exactly_the_other_half_of_the_heads() -> None:
    plan = _plan(_topo([0], [1]), _topo([0, 1]), [_state("a", 0, 40, [0, 1, 2]), _state("b", 1, 20, [5, 6])])
    assert [a.leader for a in plan.assignments] == [0, 0]
    tables = [a.block_table for a in plan.assignments]
    assert len(tables[0]) == 3 and len(tables[1]) == 2 and not set(tables[0]) & set(tables[1])
    moves = {(t.request_id, t.src_slot, t.dst_slot, t.head_start, t.head_end) for t in plan.transfers}
    assert moves == {("a", 0, 0, 0, 2), ("a", 0, 1, 2, 4), ("b", 1, 0, 0, 2), ("b", 1, 1, 2, 4)}
    assert plan.recomputed == []


def test_split_spreads_requests_and_gathers_every_head_from_its_rank() -> None:
    states = [_state(f"r{i}", 0, 10 + i, [i]) for i in range(4)]
    plan = _plan(_topo([0, 1, 2, 3]), _topo([0], [1], [2], [3]), states)
    assert sorted(a.leader for a in plan.assignments) == [0, 1, 2, 3]
    for a in plan.assignments:
        got = sorted((t.src_slot, t.head_start) for t in plan.transfers if t.request_id == a.request_id)
        assert got == [(0, 0), (1, 1), (2, 2), (3, 3)]  # head h lives on rank h at TP 4
        assert all(t.dst_slot == a.leader for t in plan.transfers if t.request_id == a.request_id)


def test_request_without_room_restarts_from_its_tokens_instead_of_failing() -> None:
    # 6 head-units per slot at TP 2 (2 heads per rank) = 3 blocks: the second 2-block request
    # cannot fit after the first.
    states = [_state("a", 0, 30, [0, 1]), _state("b", 1, 30, [0, 1])]
    plan = _plan(_topo([0], [1]), _topo([0, 1]), states, units=6)
    assert plan.recomputed == ["b"]
    assert [a.block_table == [] for a in plan.assignments] == [False, True]
    assert all(t.request_id == "a" for t in plan.transfers)


def test_sender_and_receiver_enumerate_the_same_units() -> None:
    old, new = _topo([0], [1]), _topo([0, 1])
    t = KvTransfer(request_id="a", src_slot=0, dst_slot=1, head_start=2, head_end=4, num_tokens=40)
    send = reconfig.transfer_units(t, [7, 8, 9], old.instances[0], 0, H, BS)
    recv = reconfig.transfer_units(t, [0, 1, 2], new.instances[0], 1, H, BS)
    assert send.blocks == [7, 7, 8, 8, 9, 9] and send.heads == [2, 3] * 3
    assert recv.blocks == [0, 0, 1, 1, 2, 2] and recv.heads == [0, 1] * 3  # rank 1 of TP 2: heads 2-3
    with pytest.raises(ValueError, match="does not hold"):
        reconfig.transfer_units(t, [0, 1, 2], new.instances[0], 0, H, BS)


def test_engine_hand_over_with_moved_kv_continues_token_for_token(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir)
    cfg = EngineConfig(block_size=BS, kv_cache_mb=4)
    params = RequestParams(max_tokens=40, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9] * 7, [11, 12, 13]]
    whole = Engine(model, cfg, set()).generate(prompts, params)

    a = Engine(model, cfg, set())
    out: dict[str, list[int]] = {"p0": [], "p1": []}
    for i, p in enumerate(prompts):
        a.add_request(f"p{i}", p, params, tpot_s=0.05)
    for _ in range(12):
        for o in a.step():
            out[o.request_id] += o.token_ids
    b = Engine(model, cfg, set())
    exported = a.export()
    # Its TPOT target and how long ago its first token came out travel with it, so the new leader
    # keeps it on course for its target (the switch's pause is added by the worker: held_s).
    assert all(r.tpot_s == 0.05 and r.since_first_s is not None and r.since_first_s > 0 for r in exported)
    for req in exported:
        # New blocks at the far end of the pool, so a wrong table would read zeros.
        nb = -(-req.num_computed // BS)
        first = b.blocks.num_blocks - (5 if req.request_id == "p0" else 10)
        table = list(range(first, first + nb))
        blocks = [blk for blk in req.block_table[:nb] for _ in range(H)]
        heads = list(range(H)) * nb
        data = gather_units(a.kv, BS, blocks, heads)
        scatter_units(b.kv, BS, [blk for blk in table for _ in range(H)], heads, data)
        b.adopt(req, table)
    assert b.tokens_prefilled == 0
    for req in exported:
        seq = b.scheduler.running[[s.seq_id for s in b.scheduler.running].index(req.request_id)]
        assert seq.tpot_s == 0.05 and seq.first_token_at is not None
        assert seq.first_token_at <= time.monotonic() - req.since_first_s
    while b.has_work():
        for o in b.step():
            out[o.request_id] += o.token_ids
    assert b.tokens_prefilled == 0  # continued from the moved KV: nothing recomputed
    assert [out["p0"], out["p1"]] == whole


def test_resident_slice_serves_every_nested_degree_by_view(tiny_llama_dir: Path) -> None:
    full = load_model(tiny_llama_dir)
    part = load_model(tiny_llama_dir)
    part.restrict_to(2, 1)  # slot 3 of a pool that never runs below TP 2: keeps rank 1 of TP 2
    resident = part.layers[0]
    assert resident["qkv"].shape[0] == full.layers[0]["qkv"].shape[0] // 2
    for tp, rank in ((2, 1), (4, 2), (4, 3)):
        view, ref = part.shard(tp, rank).layers[0], full.shard(tp, rank).layers[0]
        for k in ("qkv", "o", "gate_up", "down"):
            assert torch.equal(view[k], ref[k])
            assert shares_storage(view[k], resident[k])
    for tp, rank in ((1, 0), (2, 0), (4, 1)):
        with pytest.raises(ValueError, match="outside the resident slice"):
            part.shard(tp, rank)
