"""The engine thread of one slot: instance leader, follower or idle, and the switch between them.

Everything that touches torch or a collective runs here, on one thread: engine steps, the
leader's per-step broadcast, a follower's loop, and the pause / migrate / commit / abort steps of
a reconfiguration (docs/architecture.md#switch-protocol). The asyncio side talks to it through ``commands`` only.

KV lives in one flat head-unit pool per slot (docs/architecture.md#resident-weights-and-communicators): at TP k it is viewed as
``[layers, 2, blocks_k * block_size, h / k, head_dim]`` with ``blocks_k = units / (h / k)``, so a
TP change re-views the same memory. Units move through staging buffers, never in place: until
commit the old layout is intact, which is what makes abort safe.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from nitsum_core.engine.engine import Engine, EngineConfig, ExportedRequest, RequestParams, StepOutput
from nitsum_core.engine.kv_migration import gather_units, scatter_units, send_unit_list
from nitsum_core.engine.model import LlamaModel, ModelShard
from nitsum_core.engine.tp import IDLE, PeerLost, attach, broadcast_step, follower_loop, leader_hook
from nitsum_core.errors import ReconfigFailed
from nitsum_core.policy import reconfig
from nitsum_core.wire.codec import ErrorInfo
from nitsum_core.wire.cut import Topology, TopologyInstance
from nitsum_core.wire.kv import KvEvent, KvTransfer, RequestState
from nitsum_core.wire.reconfiguration import (
    ControlAck,
    PauseAck,
    ReconfigAbort,
    ReconfigCommit,
    ReconfigMigrate,
    ReconfigPause,
)
from nitsum_core.wire.worker import SamplingParams, TokenItem
from nitsum_gpu_worker.commands import Abort, Control, Submit

CHUNK_UNITS = 64  # head-units per message on the wire; both sides chunk identically

Emit = Callable[[int, dict[str, list[TokenItem]], list[KvEvent]], None]


@dataclass
class SlotRole:
    """What this slot is in the current cut: a rank of ``instance`` (None: idle)."""

    instance: TopologyInstance | None
    rank: int = 0

    @property
    def tp(self) -> int:
        return self.instance.tp if self.instance else 1

    @property
    def leader(self) -> int:
        return self.instance.leader if self.instance else -1


class SlotRunner:
    def __init__(
        self, slot: int, model: LlamaModel, config: EngineConfig, eos: set[int], emit: Emit, log: Any
    ) -> None:
        self.slot = slot
        self.model = model
        self.config = config
        self.eos = eos
        self.emit = emit
        self.log = log
        s = model.spec
        self.unit_numel = s.num_layers * 2 * config.block_size * s.head_dim
        self.units = max(s.num_kv_heads, (config.kv_cache_mb * 1024 * 1024) // (self.unit_numel * 4))
        self.units -= self.units % s.num_kv_heads  # whole blocks at every TP degree
        self.storage = torch.zeros(self.units * self.unit_numel)
        self.groups: dict[tuple[int, ...], dist.ProcessGroup] = {}  # filled once the pool is joined
        self.commands: queue.Queue[Submit | Abort | Control | None] = queue.Queue()
        self.engine: Engine | None = None
        self.role = SlotRole(None)
        self.follower: tuple[ModelShard, torch.Tensor, dist.ProcessGroup, int] | None = None
        self.paused = False
        self.staged: list[tuple[KvTransfer, torch.Tensor]] = []
        self.migration: ReconfigMigrate | None = None  # the plan between migrate and commit
        self.routers: dict[str, str] = {}  # request id -> router id (leader only)
        self.announced: set[str] = set()
        self.weight_bytes_moved = 0
        self._resident = {
            t.untyped_storage().data_ptr() for layer in model.layers for t in layer.values()
        } | {model.embed.untyped_storage().data_ptr(), model.lm_head_t.untyped_storage().data_ptr()}
        self.switches = 0
        self._retired = [0, 0]  # tokens generated / prefilled by engines of earlier roles
        self._apply(TopologyInstance(instance_id=slot, slots=[slot]))

    # ---- roles --------------------------------------------------------------------------------
    @property
    def pool_ready(self) -> bool:
        return dist.is_initialized()

    def kv_view(self, tp: int) -> torch.Tensor:
        s = self.model.spec
        heads = s.num_kv_heads // tp
        blocks = self.units // heads
        n = blocks * self.config.block_size
        return self.storage[: n * heads * s.num_layers * 2 * s.head_dim].view(
            s.num_layers, 2, n, heads, s.head_dim
        )

    def tokens_generated(self) -> int:
        return self._retired[0] + (self.engine.tokens_generated if self.engine else 0)

    def tokens_prefilled(self) -> int:
        """Prompt/context tokens this slot ran as leader; re-prefill after a switch would show here."""
        return self._retired[1] + (self.engine.tokens_prefilled if self.engine else 0)

    def capacity_tokens(self) -> int:
        return self.kv_view(self.role.tp).shape[2]

    def can_run(self, inst: TopologyInstance | None) -> str | None:
        """Why this slot cannot take its place in ``inst`` (None when it can)."""
        if inst is None:
            return None
        rank = inst.slots.index(self.slot)
        if not self.model.valid_tp(inst.tp):
            return (
                f"TP {inst.tp} does not divide the model ({self.model.spec.num_kv_heads} KV heads, "
                f"{self.model.mlp_units} MLP units)"
            )
        if not self.model.holds(inst.tp, rank):
            return f"slot {self.slot} keeps only the TP-{self.model.resident_tp} slice resident"
        if inst.tp > 1 and tuple(inst.slots) not in self.groups:
            return f"slot {self.slot} has no communicator for {inst.slots} (TP world not joined yet?)"
        return None

    def _apply(self, inst: TopologyInstance | None) -> None:
        """Become rank of ``inst``: cached weight views, cached communicator, re-viewed KV pool."""
        self.role = SlotRole(inst, inst.slots.index(self.slot) if inst else 0)
        if self.engine is not None:
            self._retired[0] += self.engine.tokens_generated
            self._retired[1] += self.engine.tokens_prefilled
        self.engine, self.follower = None, None
        if inst is None:
            return
        tp, rank = inst.tp, self.role.rank
        group = self.groups.get(tuple(inst.slots)) if tp > 1 else None
        shard = attach(self.model, tp, rank, group)
        self.weight_bytes_moved += sum(
            t.numel() * t.element_size()
            for layer in shard.layers
            for t in layer.values()
            if t.untyped_storage().data_ptr() not in self._resident
        )
        kv = self.kv_view(tp)
        if rank == 0:
            hook = leader_hook(group, inst.leader) if tp > 1 else None
            self.engine = Engine(shard, self.config, self.eos, before_forward=hook, kv=kv)
        else:
            self.follower = (shard, kv, group, inst.leader)

    # ---- main loop ----------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            if self.follower is not None and not self.paused:
                shard, kv, group, leader = self.follower
                try:
                    follower_loop(shard, kv, group, leader)
                except PeerLost as exc:
                    self.log.error("TP leader lost; this slot idles until the next topology", error=str(exc))
                    self._apply(TopologyInstance(instance_id=self.slot, slots=[self.slot]))
                    continue
                self.paused = True  # the leader stopped at a step boundary for a reconfiguration
            engine = self.engine
            busy = engine is not None and engine.has_work() and not self.paused
            try:
                cmd = self.commands.get(block=not busy, timeout=None if busy else 1.0)
                while True:
                    if cmd is None:
                        self._shutdown()
                        return
                    self._handle(cmd)
                    cmd = self.commands.get_nowait()
            except queue.Empty:
                if not busy and engine is not None and self.role.tp > 1 and not self.paused:
                    self._keepalive()  # idle leader: keep the followers' collective alive
            if self.engine is not None and self.engine.has_work() and not self.paused:
                self._step()

    def _keepalive(self) -> None:
        try:
            broadcast_step(IDLE, self.role_group(), self.role.leader)
        except PeerLost as exc:
            self._peer_lost(exc)

    def role_group(self) -> dist.ProcessGroup:
        assert self.role.instance is not None
        return self.groups[tuple(self.role.instance.slots)]

    def _shutdown(self) -> None:
        if self.engine is not None and self.role.tp > 1 and not self.paused:
            with contextlib.suppress(PeerLost):
                broadcast_step(None, self.role_group(), self.role.leader)

    def _handle(self, cmd: Submit | Abort | Control) -> None:
        if isinstance(cmd, Submit):
            if self.engine is None:  # raced with a switch: the asyncio side checked, so rare
                self._finish_with_error(
                    cmd.request_id, cmd.router_id, "reconfiguring", "slot is no longer a leader"
                )
                return
            self.routers[cmd.request_id] = cmd.router_id
            self.engine.add_request(
                cmd.request_id, cmd.prompt_ids, cmd.params, cmd.priority, cmd.ttft_deadline, cmd.tpot_s
            )
        elif isinstance(cmd, Abort):
            if self.engine is not None and self.engine.abort(cmd.request_id):
                self.announced.discard(cmd.request_id)
                self.emit(self.engine.steps, {}, [self._free_event(cmd.request_id)])
            self.routers.pop(cmd.request_id, None)
        else:
            handler = getattr(self, f"_on_{cmd.phase}")
            try:
                cmd.reply.set_result(handler(cmd.msg))
            except Exception as exc:  # reply with the failure; the controller aborts the switch
                self.log.exception("reconfiguration step failed", phase=cmd.phase)
                cmd.reply.set_exception(exc)

    def _finish_with_error(self, request_id: str, router_id: str, code: str, message: str) -> None:
        item = TokenItem(
            request_id=request_id,
            token_ids=[],
            finished=True,
            finish_reason="error",
            error=ErrorInfo(code=code, message=message),
        )
        self.emit(self.engine.steps if self.engine else 0, {router_id: [item]}, [])

    # ---- stepping -----------------------------------------------------------------------------
    def _step(self) -> None:
        engine = self.engine
        assert engine is not None
        try:
            outputs = engine.step()
        except PeerLost as exc:
            self._peer_lost(exc)
            return
        except Exception as exc:  # a bug in one step must not kill the worker silently
            self.log.exception("engine step failed")
            err = ErrorInfo(code="internal", message=f"engine step failed on slot {self.slot}: {exc}")
            outputs = [StepOutput(rid, [], "error") for rid in list(self.routers)]
            for rid in list(self.routers):
                engine.abort(rid)
        else:
            err = None
        self._publish_outputs(engine, outputs, err)

    def _publish_outputs(self, engine: Engine, outputs: list[StepOutput], err: ErrorInfo | None) -> None:
        kv_events: list[KvEvent] = []
        by_router: dict[str, list[TokenItem]] = {}
        spec = engine.model.spec
        for out in outputs:
            router_id = self.routers.get(out.request_id)
            if router_id is None:
                continue
            if out.request_id not in self.announced and out.finish_reason is None:
                self.announced.add(out.request_id)
                per_rank = spec.num_kv_heads // self.role.tp
                kv_events.append(
                    KvEvent(
                        slot=self.slot,
                        request_id=out.request_id,
                        kind="alloc",
                        block_ids=list(engine.blocks.block_table(out.request_id)),
                        head_start=0,
                        head_end=per_rank * self.role.tp,
                        num_tokens=engine.num_tokens(out.request_id),
                    )
                )
            finished = out.finish_reason is not None
            if finished:
                self.routers.pop(out.request_id, None)
                if out.request_id in self.announced:
                    self.announced.discard(out.request_id)
                    kv_events.append(self._free_event(out.request_id))
            by_router.setdefault(router_id, []).append(
                TokenItem(
                    request_id=out.request_id,
                    token_ids=out.token_ids,
                    finished=finished,
                    finish_reason=out.finish_reason,
                    error=err if out.finish_reason == "error" else None,
                )
            )
        if by_router or kv_events:
            self.emit(engine.steps, by_router, kv_events)

    def _free_event(self, request_id: str) -> KvEvent:
        return KvEvent(slot=self.slot, request_id=request_id, kind="free")

    def _peer_lost(self, exc: PeerLost) -> None:
        """A rank of this leader's instance died: keep every request, continue alone at TP 1."""
        self.log.error("TP peer lost; continuing this instance's requests at TP 1", error=str(exc))
        exported = self.engine.export() if self.engine else []
        self._apply(TopologyInstance(instance_id=self.slot, slots=[self.slot]))
        assert self.engine is not None
        for req in exported:
            self.engine.adopt(req, [])  # the KV view changed: recompute from the tokens, lose nothing
            self.announced.discard(req.request_id)

    # ---- reconfiguration steps (docs/architecture.md#switch-protocol) ----------------------------------------------------
    def _on_adopt(self, topo: Topology) -> bool:
        """Apply a topology written without a switch protocol (pool change after a fault)."""
        inst = reconfig.instance_of(topo, self.slot)
        current = self.role.instance.slots if self.role.instance else None
        if (inst.slots if inst else None) == current:
            return False
        reason = self.can_run(inst)
        if reason is not None:
            self.log.error("cannot take this slot's place in the topology", epoch=topo.epoch, reason=reason)
            return False
        exported = self.engine.export() if self.engine else []
        if self.engine is not None and self.role.tp > 1:
            self._shutdown()
        self._apply(inst)
        for req in exported:
            if self.engine is not None:
                self.engine.adopt(req, [])
                self.announced.discard(req.request_id)
            else:
                self._finish_with_error(
                    req.request_id,
                    self.routers.pop(req.request_id, ""),
                    "worker_lost",
                    "slot left its instance",
                )
        self.paused = False
        return True

    def _on_pause(self, msg: ReconfigPause) -> PauseAck:
        t0 = time.perf_counter()
        reason = self.can_run(reconfig.instance_of(msg.target, self.slot))
        if reason is None and self.role.tp > 1 and not self.pool_ready:
            reason = "TP world not joined"
        if reason is not None:
            return PauseAck(slot=self.slot, ok=False, error=ErrorInfo(code="invalid_request", message=reason))
        states: list[RequestState] = []
        if self.engine is not None and not self.paused:
            if self.role.tp > 1:
                broadcast_step(None, self.role_group(), self.role.leader)  # followers leave their loop
            for req in self.engine.export():
                states.append(
                    RequestState(
                        request_id=req.request_id,
                        router_id=self.routers.get(req.request_id, ""),
                        slot=self.slot,
                        token_ids=req.token_ids,
                        num_prompt_tokens=req.num_prompt_tokens,
                        num_computed=req.num_computed,
                        priority=req.priority,
                        sampling=SamplingParams(
                            max_tokens=req.params.max_tokens,
                            temperature=req.params.temperature,
                            top_p=req.params.top_p,
                            seed=req.params.seed,
                            ignore_eos=req.params.ignore_eos,
                        ),
                        rng_state=req.rng_state,
                        block_table=req.block_table,
                        ttft_left_s=req.ttft_left_s,
                        tpot_s=req.tpot_s,
                        since_first_s=req.since_first_s,
                    )
                )
        self.paused = True
        s = self.model.spec
        return PauseAck(
            slot=self.slot,
            ok=True,
            requests=states,
            kv_units=self.units,
            num_kv_heads=s.num_kv_heads,
            block_size=self.config.block_size,
            seconds=time.perf_counter() - t0,
        )

    def _on_migrate(self, msg: ReconfigMigrate) -> ControlAck:
        """Gather -> send -> receive into staging; the live KV is not touched until commit."""
        t0 = time.perf_counter()
        s, bs = self.model.spec, self.config.block_size
        h = s.num_kv_heads
        old_tables = {r.request_id: r.block_table for r in msg.requests}
        new_tables = {a.request_id: a.block_table for a in msg.plan.assignments}
        old_inst, new_inst = self.role.instance, reconfig.instance_of(msg.target, self.slot)
        old_kv = self.kv_view(self.role.tp)
        shape = (s.num_layers, 2, bs, s.head_dim)
        self.staged = []
        self.migration = msg
        recv_works: list[dist.Work] = []
        # 1. Post every receive first, so that no pair of slots sending to each other can deadlock.
        for t in msg.plan.transfers:
            if t.dst_slot == self.slot and t.src_slot != self.slot:
                assert new_inst is not None
                units = reconfig.transfer_units(t, new_tables[t.request_id], new_inst, self.slot, h, bs)
                buf = torch.empty(len(units.blocks), *shape)
                for start in range(0, len(units.blocks), CHUNK_UNITS):
                    recv_works.append(dist.irecv(buf[start : start + CHUNK_UNITS], t.src_slot))
                self.staged.append((t, buf))
        # 2. Gather and send (double-buffered, kv_migration); local units are copied into staging.
        sent = 0
        try:
            for t in msg.plan.transfers:
                if t.src_slot != self.slot:
                    continue
                assert old_inst is not None
                units = reconfig.transfer_units(t, old_tables[t.request_id], old_inst, self.slot, h, bs)
                if t.dst_slot == self.slot:  # stays on this slot but moves to its new place
                    self.staged.append((t, gather_units(old_kv, bs, units.blocks, units.heads)))
                else:
                    sent += send_unit_list(
                        old_kv, bs, units.blocks, units.heads, t.dst_slot, chunk=CHUNK_UNITS
                    )
            for work in recv_works:
                work.wait()
        except (RuntimeError, dist.DistBackendError) as exc:
            raise PeerLost(f"KV migration to/from a peer failed: {str(exc).splitlines()[0]}") from exc
        received = sum(buf.numel() * buf.element_size() for t, buf in self.staged if t.src_slot != self.slot)
        return ControlAck(
            slot=self.slot,
            ok=True,
            bytes_sent=sent,
            bytes_received=received,
            seconds=time.perf_counter() - t0,
        )

    def _on_commit(self, msg: ReconfigCommit) -> ControlAck:
        t0 = time.perf_counter()
        mig = self.migration
        if mig is None or mig.plan_id != msg.plan_id:
            raise ReconfigFailed(f"commit of plan {msg.plan_id} without its migrate step on slot {self.slot}")
        plan, requests = mig.plan, mig.requests
        inst = reconfig.instance_of(msg.target, self.slot)
        before = self.weight_bytes_moved
        self.routers, self.announced = {}, set()
        self._apply(inst)
        bs, h = self.config.block_size, self.model.spec.num_kv_heads
        if self.engine is not None:
            by_id = {r.request_id: r for r in requests}
            for a in plan.assignments:
                if a.leader != self.slot:
                    continue
                r = by_id[a.request_id]
                sp = r.sampling
                params = RequestParams(sp.max_tokens, sp.temperature, sp.top_p, sp.seed, sp.ignore_eos)
                # The switch held it for ``held_s``: that time counts against its targets.
                held = msg.held_s
                self.engine.adopt(
                    ExportedRequest(
                        r.request_id,
                        r.token_ids,
                        r.num_prompt_tokens,
                        r.num_computed,
                        r.priority,
                        params,
                        r.rng_state,
                        a.block_table,
                        None if r.ttft_left_s is None else r.ttft_left_s - held,
                        r.tpot_s,
                        None if r.since_first_s is None else r.since_first_s + held,
                    ),
                    a.block_table,
                )
                self.routers[r.request_id] = r.router_id
        if self.staged:
            assert inst is not None
            kv = self.kv_view(inst.tp)
            tables = {a.request_id: a.block_table for a in plan.assignments}
            for t, data in self.staged:
                units = reconfig.transfer_units(t, tables[t.request_id], inst, self.slot, h, bs)
                scatter_units(kv, bs, units.blocks, units.heads, data)
        self.staged, self.migration = [], None
        self.paused = False
        self.switches += 1
        return ControlAck(
            slot=self.slot,
            ok=True,
            weight_bytes_moved=self.weight_bytes_moved - before,
            seconds=time.perf_counter() - t0,
        )

    def _on_abort(self, msg: ReconfigAbort) -> ControlAck:
        self.staged, self.migration = [], None
        self.paused = False  # leader resumes stepping; a follower re-enters its loop
        self.log.warning("reconfiguration aborted; resuming the old epoch", reason=msg.reason)
        return ControlAck(slot=self.slot, ok=True)
