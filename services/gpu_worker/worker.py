"""The worker service: NATS on the asyncio loop, the engine on its own thread.

Commands (submit / abort) cross into the engine thread through a queue; each step's outputs
come back with ``call_soon_threadsafe`` and leave as one TokenBatch per router.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import torch
from nats.aio.client import Client
from nats.micro.request import Request
from nitsum_core import messages as m
from nitsum_core import subjects, topology
from nitsum_core.bus import connect
from nitsum_core.checkpoints import resolve_checkpoint
from nitsum_core.engine import Engine, EngineConfig, RequestParams, StepOutput
from nitsum_core.errors import InvalidRequest, NitsumError, PromptTooLong
from nitsum_core.logs import setup_logging
from nitsum_core.model import load_model
from nitsum_core.service import decode_or_drop, register, stop_event_on_signals
from nitsum_core.tokenizer import Tokenizer


@dataclass
class _Submit:
    request_id: str
    router_id: str
    prompt_ids: list[int]
    params: RequestParams
    priority: int


@dataclass
class _Abort:
    request_id: str


class GpuWorker:
    def __init__(
        self,
        slot: int,
        nats_url: str,
        model: str,
        engine_config: EngineConfig,
        threads: int | None = None,
        heartbeat_s: float = 0.5,
    ) -> None:
        self.slot = slot
        self.nats_url = nats_url
        self.model_name = model
        self.engine_config = engine_config
        self.threads = threads
        self.heartbeat_s = heartbeat_s
        self.worker_id = f"w{slot}-{uuid.uuid4().hex[:6]}"
        self.log = setup_logging("gpu_worker").bind(slot=slot)
        self.engine: Engine | None = None
        self.nc: Client | None = None
        self._commands: queue.Queue[_Submit | _Abort | None] = queue.Queue()
        self._owner: dict[str, str] = {}  # request id -> router id (asyncio side)
        self.epoch = 0  # topology epoch this worker last saw (from the KV bucket watch)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._outbox: asyncio.Queue[tuple[int, dict[str, list[m.TokenItem]], list[m.KvEvent]]]

    # ---- start-up -------------------------------------------------------------------------
    def _load(self) -> Engine:
        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        ckpt = resolve_checkpoint(self.model_name)
        model = load_model(ckpt)
        eos = Tokenizer(ckpt).eos_token_ids
        engine = Engine(model, self.engine_config, eos)
        self.log.info(
            "model loaded",
            checkpoint=str(ckpt),
            seconds=round(time.perf_counter() - t0, 2),
            kv_blocks=engine.blocks.num_blocks,
            kv_tokens=engine.capacity_tokens,
            max_model_len=engine.max_model_len,
            torch_threads=torch.get_num_threads(),
        )
        return engine

    async def run(self) -> None:
        # The engine thread holds the GIL between torch calls; a short switch interval lets the
        # loop thread publish a finished step's tokens within ~1 ms instead of up to 5 ms.
        sys.setswitchinterval(0.001)
        stop = stop_event_on_signals()
        self._loop = asyncio.get_running_loop()
        self.engine = await asyncio.to_thread(self._load)
        self.nc = nc = await connect(self.nats_url, name=f"nitsum-worker-{self.slot}")
        svc = await register(
            nc, subjects.SERVICE_WORKER, "Nitsum worker: engine for one device slot", {"slot": str(self.slot)}
        )
        await svc.add_endpoint(
            name="submit", subject=subjects.worker_submit(self.slot), handler=self._on_submit
        )
        await nc.subscribe(subjects.worker_abort(self.slot), cb=self._on_abort)
        self._thread = threading.Thread(target=self._engine_loop, name=f"engine-{self.slot}", daemon=True)
        self._thread.start()
        kv = await topology.open_bucket(nc.jetstream())
        watcher = asyncio.create_task(topology.watch(kv, self._on_topology))
        self._outbox = asyncio.Queue()
        publisher = asyncio.create_task(self._publisher())
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        self.log.info("worker ready", worker_id=self.worker_id, pid=os.getpid())
        await stop.wait()
        self.log.info("worker stopping")
        heartbeat.cancel()
        publisher.cancel()
        watcher.cancel()
        self._commands.put(None)
        await svc.stop()
        await nc.drain()

    # ---- NATS handlers (asyncio side) ----------------------------------------------------
    def _on_topology(self, topo: m.Topology) -> None:
        mine = [i for i in topo.instances if self.slot in i.slots]
        self.epoch = topo.epoch
        if mine:
            inst = mine[0]
            self.log.info(
                "topology",
                epoch=topo.epoch,
                instance=inst.instance_id,
                tp=inst.tp,
                rank=inst.slots.index(self.slot),
                role=inst.role,
            )
        else:
            self.log.info(
                "topology: this slot is in no instance (idle until the next epoch)", epoch=topo.epoch
            )

    def _validate(self, req: m.WorkerSubmit) -> RequestParams:
        engine = self.engine
        assert engine is not None
        if req.request_id in self._owner:
            raise InvalidRequest(f"request {req.request_id} is already running on slot {self.slot}")
        if not req.prompt_ids:
            raise InvalidRequest("empty prompt")
        sp = req.sampling
        if sp.max_tokens <= 0:
            raise InvalidRequest("max_tokens must be positive")
        total = len(req.prompt_ids) + sp.max_tokens
        if len(req.prompt_ids) >= engine.max_model_len:
            raise PromptTooLong(
                f"prompt has {len(req.prompt_ids)} tokens; the context window is {engine.max_model_len}"
            )
        if total > engine.max_model_len or total > engine.capacity_tokens:
            raise InvalidRequest(
                f"prompt + max_tokens = {total} tokens exceeds this worker's limit "
                f"({min(engine.max_model_len, engine.capacity_tokens)})"
            )
        vocab = engine.model.spec.vocab_size
        if any(t < 0 or t >= vocab for t in req.prompt_ids):
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        return RequestParams(sp.max_tokens, sp.temperature, sp.top_p, sp.seed, sp.ignore_eos)

    async def _on_submit(self, request: Request) -> None:
        request_id = ""
        try:
            req = m.decode(m.WorkerSubmit, request.data)
            request_id = req.request_id
            params = self._validate(req)
        except NitsumError as exc:
            await request.respond(
                m.encode(m.SubmitAck(request_id=request_id, accepted=False, error=m.ErrorInfo.from_exc(exc)))
            )
            return
        self._owner[req.request_id] = req.router_id
        self._commands.put(_Submit(req.request_id, req.router_id, req.prompt_ids, params, req.priority))
        await request.respond(m.encode(m.SubmitAck(request_id=req.request_id, accepted=True)))

    async def _on_abort(self, msg) -> None:  # noqa: ANN001 - nats Msg
        abort = decode_or_drop(self.log, m.WorkerAbort, msg.data, "abort")
        if abort is None:
            return
        if self._owner.pop(abort.request_id, None) is not None:
            self._commands.put(_Abort(abort.request_id))

    async def _heartbeat_loop(self) -> None:
        engine = self.engine
        assert engine is not None and self.nc is not None
        while True:
            hb = m.WorkerHeartbeat(
                slot=self.slot,
                worker_id=self.worker_id,
                pid=os.getpid(),
                model=self.model_name,
                max_model_len=min(engine.max_model_len, engine.capacity_tokens),
                running=len(engine.scheduler.running),
                waiting=engine.scheduler.num_waiting,
                free_blocks=engine.blocks.num_free(),
                total_blocks=engine.blocks.num_blocks,
                block_size=engine.blocks.block_size,
                steps=engine.steps,
                tokens_generated=engine.tokens_generated,
                sent_at=time.time(),
            )
            try:
                await self.nc.publish(subjects.WORKER_HEARTBEAT, m.encode(hb))
            except Exception as exc:  # a reconnecting client may refuse a publish; try next tick
                self.log.warning("heartbeat not sent", error=str(exc))
            await asyncio.sleep(self.heartbeat_s)

    async def _publisher(self) -> None:
        while True:
            step, by_router, kv_events = await self._outbox.get()
            try:
                await self._publish_step(step, by_router, kv_events)
            except Exception as exc:
                self.log.error("step outputs not published", step=step, error=str(exc))

    async def _publish_step(
        self, step: int, by_router: dict[str, list[m.TokenItem]], kv_events: list[m.KvEvent]
    ) -> None:
        assert self.nc is not None
        for item_list in by_router.values():
            for item in item_list:
                if item.finished:
                    self._owner.pop(item.request_id, None)
        for router_id, items in by_router.items():
            await self.nc.publish(
                subjects.router_tokens(router_id),
                m.encode(m.TokenBatch(slot=self.slot, step=step, items=items)),
            )
        for ev in kv_events:
            await self.nc.publish(subjects.KV_EVENTS, m.encode(ev))

    # ---- engine thread --------------------------------------------------------------------
    def _engine_loop(self) -> None:
        engine = self.engine
        assert engine is not None
        routers: dict[str, str] = {}
        announced: set[str] = set()
        while True:
            block = not engine.has_work()
            try:
                cmd = self._commands.get(block=block)
                while True:
                    if cmd is None:
                        return
                    if isinstance(cmd, _Submit):
                        routers[cmd.request_id] = cmd.router_id
                        engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, cmd.priority)
                    else:
                        if engine.abort(cmd.request_id):
                            announced.discard(cmd.request_id)
                            self._emit(engine.steps, {}, [self._free_event(cmd.request_id)])
                        routers.pop(cmd.request_id, None)
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                pass
            if not engine.has_work():
                continue
            kv_events: list[m.KvEvent] = []
            # Block tables before the step: sequences that finish inside it release their blocks.
            try:
                outputs = engine.step()
            except Exception as exc:  # a bug in one step must not kill the worker silently
                self.log.exception("engine step failed")
                outputs = [StepOutput(rid, [], "error") for rid in list(routers)]
                for rid in list(routers):
                    engine.abort(rid)
                err = m.ErrorInfo(code="internal", message=f"engine step failed on slot {self.slot}: {exc}")
            else:
                err = None
            by_router: dict[str, list[m.TokenItem]] = {}
            for out in outputs:
                router_id = routers.get(out.request_id)
                if router_id is None:
                    continue
                if out.request_id not in announced and out.finish_reason is None:
                    announced.add(out.request_id)
                    kv_events.append(
                        m.KvEvent(
                            slot=self.slot,
                            request_id=out.request_id,
                            kind="alloc",
                            block_ids=list(engine.blocks.block_table(out.request_id)),
                            head_start=0,
                            head_end=engine.model.spec.num_kv_heads,
                            num_tokens=engine.num_tokens(out.request_id),
                        )
                    )
                finished = out.finish_reason is not None
                if finished:
                    routers.pop(out.request_id, None)
                    if out.request_id in announced:
                        announced.discard(out.request_id)
                        kv_events.append(self._free_event(out.request_id))
                by_router.setdefault(router_id, []).append(
                    m.TokenItem(
                        request_id=out.request_id,
                        token_ids=out.token_ids,
                        finished=finished,
                        finish_reason=out.finish_reason,
                        error=err if out.finish_reason == "error" else None,
                    )
                )
            if by_router or kv_events:
                self._emit(engine.steps, by_router, kv_events)

    def _emit(self, step: int, by_router: dict[str, list[m.TokenItem]], kv_events: list[m.KvEvent]) -> None:
        # One FIFO consumer on the loop keeps the step order of messages on the wire.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, (step, by_router, kv_events))

    def _free_event(self, request_id: str) -> m.KvEvent:
        return m.KvEvent(slot=self.slot, request_id=request_id, kind="free")
