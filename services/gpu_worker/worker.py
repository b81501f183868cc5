"""The worker service: NATS on the asyncio loop, the engine (``SlotRunner``) on its own thread.

Commands (submit / abort / reconfiguration steps) cross into the engine thread through a queue;
each step's outputs come back with ``call_soon_threadsafe`` and leave as one TokenBatch per
router. With ``pool_size > 1`` the worker joins the pool's gloo world at start-up (rendezvous
through a NATS KV bucket) and builds every aligned group's communicator once (docs/architecture.md#resident-weights-and-communicators).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable

import torch
import torch.distributed as dist
from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError
from nats.micro.request import Request
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.engine import EngineConfig, RequestParams
from nitsum_core.engine.model import load_model
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.engine.tp import join_pool
from nitsum_core.errors import InvalidRequest, NitsumError, PromptTooLong, Reconfiguring
from nitsum_core.logs import setup_logging
from nitsum_core.wire import subjects, topology
from nitsum_core.wire.bus import connect
from nitsum_core.wire.codec import ErrorInfo, decode, encode
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.kv import KvEvent
from nitsum_core.wire.reconfiguration import (
    ControlAck,
    PauseAck,
    ReconfigAbort,
    ReconfigCommit,
    ReconfigMigrate,
    ReconfigPause,
)
from nitsum_core.wire.service import decode_or_drop, register, stop_event_on_signals
from nitsum_core.wire.worker import (
    SubmitAck,
    TokenBatch,
    TokenItem,
    WorkerAbort,
    WorkerHeartbeat,
    WorkerSubmit,
)
from nitsum_gpu_worker.commands import Abort, Control, Submit
from nitsum_gpu_worker.runner import SlotRunner


class GpuWorker:
    def __init__(
        self,
        slot: int,
        nats_url: str,
        model: str,
        engine_config: EngineConfig,
        threads: int | None = None,
        heartbeat_s: float = 0.5,
        pool_size: int = 1,
        pool_id: str = "default",
        advertise_host: str = "127.0.0.1",
        resident_tp: int = 1,
        collective_timeout_s: float = 30.0,
    ) -> None:
        self.slot = slot
        self.nats_url = nats_url
        self.model_name = model
        self.engine_config = engine_config
        self.threads = threads
        self.heartbeat_s = heartbeat_s
        self.pool_size = pool_size
        self.pool_id = pool_id
        self.advertise_host = advertise_host
        self.resident_tp = resident_tp
        self.collective_timeout_s = collective_timeout_s
        self.worker_id = f"w{slot}-{uuid.uuid4().hex[:6]}"
        self.log = setup_logging("gpu_worker").bind(slot=slot)
        self.runner: SlotRunner | None = None
        self.nc: Client | None = None
        self._owner: dict[str, str] = {}  # request id -> router id (asyncio side)
        self.epoch = 0  # topology epoch this worker runs
        # False from a pause until its commit/abort: submissions get a retryable "reconfiguring".
        self.accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._outbox: asyncio.Queue[tuple[int, dict[str, list[TokenItem]], list[KvEvent]]]

    # ---- start-up -------------------------------------------------------------------------
    def _load(self) -> SlotRunner:
        if self.threads:
            torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        ckpt = resolve_checkpoint(self.model_name)
        model = load_model(ckpt)
        if self.resident_tp > 1:
            # Keep only this slot's slice at the smallest TP it may run (aligned: rank = slot % k).
            model.restrict_to(self.resident_tp, self.slot % self.resident_tp)
        eos = Tokenizer(ckpt).eos_token_ids
        runner = SlotRunner(self.slot, model, self.engine_config, eos, self._emit, self.log)
        engine = runner.engine
        assert engine is not None
        self.log.info(
            "model loaded",
            checkpoint=str(ckpt),
            seconds=round(time.perf_counter() - t0, 2),
            kv_head_units=runner.units,
            kv_tokens_tp1=engine.capacity_tokens,
            max_model_len=engine.max_model_len,
            torch_threads=torch.get_num_threads(),
            resident_tp=self.resident_tp,
        )
        return runner

    async def run(self) -> None:
        # The engine thread holds the GIL between torch calls; a short switch interval lets the
        # loop thread publish a finished step's tokens within ~1 ms instead of up to 5 ms.
        sys.setswitchinterval(0.001)
        stop = stop_event_on_signals()
        self._loop = asyncio.get_running_loop()
        self.runner = runner = await asyncio.to_thread(self._load)
        self.nc = nc = await connect(self.nats_url, name=f"nitsum-worker-{self.slot}")
        svc = await register(
            nc, subjects.SERVICE_WORKER, "Nitsum worker: engine for one device slot", {"slot": str(self.slot)}
        )
        await svc.add_endpoint(
            name="submit", subject=subjects.worker_submit(self.slot), handler=self._on_submit
        )
        for phase in subjects.RECONFIG_PHASES:
            await svc.add_endpoint(
                name=phase,
                subject=subjects.worker_control(self.slot, phase),
                handler=self._control_handler(phase),
            )
        await nc.subscribe(subjects.worker_abort(self.slot), cb=self._on_abort)
        self._outbox = asyncio.Queue()
        self._thread = threading.Thread(target=runner.run, name=f"engine-{self.slot}", daemon=True)
        self._thread.start()
        kv = await topology.open_bucket(nc.jetstream())
        watcher = asyncio.create_task(topology.watch(kv, self._on_topology))
        publisher = asyncio.create_task(self._publisher())
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        pool = asyncio.create_task(self._join_pool()) if self.pool_size > 1 else None
        self.log.info("worker ready", worker_id=self.worker_id, pid=os.getpid(), pool_size=self.pool_size)
        await stop.wait()
        self.log.info("worker stopping")
        for task in (heartbeat, publisher, watcher, pool):
            if task is not None:
                task.cancel()
        runner.commands.put(None)
        await svc.stop()
        await nc.drain()

    async def _join_pool(self) -> None:
        """Rendezvous over NATS, then build the gloo world and every aligned communicator once.

        Slot 0 opens the torch.distributed store and publishes its address under
        ``pool-<pool id>``; the others read it. Until this finishes the slot serves at TP 1 and
        refuses switches that need TP > 1.
        """
        assert self.nc is not None and self.runner is not None
        js = self.nc.jetstream()
        bucket = await js.create_key_value(bucket=subjects.RENDEZVOUS_BUCKET, history=1)
        key = f"pool-{self.pool_id}"
        timeout = dt.timedelta(seconds=self.collective_timeout_s)
        t0 = time.perf_counter()
        try:
            if self.slot == 0:
                store = dist.TCPStore(
                    self.advertise_host, 0, self.pool_size, True, timeout=timeout, wait_for_workers=False
                )
                await bucket.put(key, f"{self.advertise_host}:{store.port}".encode())
            else:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        host, port = (await bucket.get(key)).value.decode().rsplit(":", 1)
                        break
                    except KeyNotFoundError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"slot 0 never published the pool address under {key}"
                            ) from None
                        await asyncio.sleep(0.2)
                store = await asyncio.to_thread(
                    dist.TCPStore, host, int(port), self.pool_size, False, timeout=timeout
                )
            groups = await asyncio.to_thread(
                join_pool, self.slot, self.pool_size, store, self.collective_timeout_s
            )
        except Exception as exc:
            self.log.error("could not join the TP pool; this slot serves at TP 1 only", error=str(exc))
            return
        self.runner.groups = groups
        self.log.info(
            "joined TP pool",
            pool_id=self.pool_id,
            world=self.pool_size,
            groups=[list(g) for g in groups],
            seconds=round(time.perf_counter() - t0, 2),
        )

    # ---- NATS handlers (asyncio side) ----------------------------------------------------
    def _on_topology(self, topo: Topology) -> None:
        assert self.runner is not None
        if not self.accepting:
            return  # mid-switch: the commit (not the bucket watch) moves this slot to the new epoch
        self.epoch = max(self.epoch, topo.epoch)
        inst = next((i for i in topo.instances if self.slot in i.slots), None)
        self.log.info(
            "topology",
            epoch=topo.epoch,
            instance=inst.slots if inst else None,
            reason=topo.reason,
        )
        # Written without a switch (a worker joined or died): the engine thread applies it,
        # recomputing any KV, or finds it already in that role. It decides, not this side: the
        # role read here can be stale while an earlier adopt is still queued, and a topology
        # dropped on that stale view (pool [1], then [0] [1]) left a slot with no engine for good.
        self.runner.commands.put(Control("adopt", topo))

    def _validate(self, req: WorkerSubmit) -> RequestParams:
        runner = self.runner
        assert runner is not None
        engine = runner.engine
        if not self.accepting or engine is None:
            raise Reconfiguring(
                f"slot {self.slot} is switching topology (or is not an instance leader); retry"
            )
        if req.request_id in self._owner:
            raise InvalidRequest(f"request {req.request_id} is already running on slot {self.slot}")
        if not req.prompt_ids:
            raise InvalidRequest("empty prompt")
        sp = req.sampling
        if sp.max_tokens <= 0:
            raise InvalidRequest("max_tokens must be positive")
        if req.tpot_s is not None and not req.tpot_s > 0:
            raise InvalidRequest(f"tpot_s must be a positive number of seconds, got {req.tpot_s}")
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
        assert self.runner is not None
        request_id = ""
        try:
            req = decode(WorkerSubmit, request.data)
            request_id = req.request_id
            params = self._validate(req)
        except NitsumError as exc:
            await request.respond(
                encode(SubmitAck(request_id=request_id, accepted=False, error=ErrorInfo.from_exc(exc)))
            )
            return
        self._owner[req.request_id] = req.router_id
        deadline = None if req.ttft_left_s is None else time.monotonic() + req.ttft_left_s
        self.runner.commands.put(
            Submit(req.request_id, req.router_id, req.prompt_ids, params, req.priority, deadline, req.tpot_s)
        )
        await request.respond(encode(SubmitAck(request_id=req.request_id, accepted=True)))

    async def _on_abort(self, msg) -> None:  # noqa: ANN001 - nats Msg
        assert self.runner is not None
        abort = decode_or_drop(self.log, WorkerAbort, msg.data, "abort")
        if abort is None:
            return
        if self._owner.pop(abort.request_id, None) is not None:
            self.runner.commands.put(Abort(abort.request_id))

    def _control_handler(self, phase: str) -> Callable:
        types = {
            "pause": ReconfigPause,
            "migrate": ReconfigMigrate,
            "commit": ReconfigCommit,
            "abort": ReconfigAbort,
        }

        async def handle(request: Request) -> None:
            assert self.runner is not None
            try:
                msg = decode(types[phase], request.data)
            except NitsumError as exc:
                await request.respond(
                    encode(ControlAck(slot=self.slot, ok=False, error=ErrorInfo.from_exc(exc)))
                )
                return
            if phase == "pause":
                self.accepting = False  # before queueing: every acked submit precedes the pause
            t0 = time.perf_counter()
            cmd = Control(phase, msg)
            self.runner.commands.put(cmd)
            try:
                reply = await asyncio.wrap_future(cmd.reply)
            except Exception as exc:
                err = exc if isinstance(exc, NitsumError) else NitsumError(f"{type(exc).__name__}: {exc}")
                reply = (PauseAck if phase == "pause" else ControlAck)(
                    slot=self.slot, ok=False, error=ErrorInfo.from_exc(err)
                )
            if phase == "pause":
                if not reply.ok:
                    self.accepting = True
                # Every token of the steps before the pause is on the wire before the ack: the
                # router must not see a late batch from this slot after it re-homes a request.
                await self._outbox.join()
                for st in reply.requests:
                    self._owner.pop(st.request_id, None)
            elif phase in ("commit", "abort"):
                if phase == "commit" and reply.ok:
                    self.epoch = msg.target.epoch
                    self._owner.update({rid: rt for rid, rt in self.runner.routers.items()})
                self.accepting = True
            self.log.info(
                "reconfiguration step",
                phase=phase,
                ok=reply.ok,
                plan=msg.plan_id,
                seconds=round(time.perf_counter() - t0, 4),
                error=reply.error.message if reply.error else None,
            )
            await request.respond(encode(reply))

        return handle

    async def _heartbeat_loop(self) -> None:
        runner = self.runner
        assert runner is not None and self.nc is not None
        while True:
            engine = runner.engine
            cap = runner.capacity_tokens()
            hb = WorkerHeartbeat(
                slot=self.slot,
                worker_id=self.worker_id,
                pid=os.getpid(),
                model=self.model_name,
                max_model_len=min(self.engine_config.max_model_len, cap),
                running=len(engine.scheduler.running) if engine else 0,
                waiting=engine.scheduler.num_waiting if engine else 0,
                free_blocks=engine.blocks.num_free() if engine else 0,
                total_blocks=engine.blocks.num_blocks if engine else 0,
                block_size=self.engine_config.block_size,
                steps=engine.steps if engine else 0,
                tokens_generated=runner.tokens_generated(),
                sent_at=time.time(),
                epoch=self.epoch,
                tp=runner.role.tp,
                rank=runner.role.rank,
                tokens_prefilled=runner.tokens_prefilled(),
                weight_bytes_moved=runner.weight_bytes_moved,
                pool_joined=runner.pool_ready,
            )
            try:
                await self.nc.publish(subjects.WORKER_HEARTBEAT, encode(hb))
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
            finally:
                self._outbox.task_done()

    async def _publish_step(
        self, step: int, by_router: dict[str, list[TokenItem]], kv_events: list[KvEvent]
    ) -> None:
        assert self.nc is not None
        for item_list in by_router.values():
            for item in item_list:
                if item.finished:
                    self._owner.pop(item.request_id, None)
        for router_id, items in by_router.items():
            await self.nc.publish(
                subjects.router_tokens(router_id),
                encode(TokenBatch(slot=self.slot, step=step, items=items)),
            )
        for ev in kv_events:
            await self.nc.publish(subjects.KV_EVENTS, encode(ev))

    def _emit(self, step: int, by_router: dict[str, list[TokenItem]], kv_events: list[KvEvent]) -> None:
        # Called on the engine thread. One FIFO consumer on the loop keeps the step order.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, (step, by_router, kv_events))
