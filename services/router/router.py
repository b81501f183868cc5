"""The router service.

Clients send a GenerateRequest to ROUTER_GENERATE with a reply inbox; the router validates it,
tokenises, routes it to the least-loaded live instance leader that serves its tier, and streams
StreamChunk messages back to the inbox (seq 0 = accepted, then text, then one final chunk with
usage). Worker liveness comes from heartbeats; a worker silent for ``worker_timeout_s`` is
declared dead and its requests are re-run elsewhere with prompt + tokens generated so far, so
the client sees one continuous stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.micro.request import Request
from nitsum_core.config import Tier
from nitsum_core.engine.checkpoints import resolve_checkpoint
from nitsum_core.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from nitsum_core.errors import NitsumError, NoWorkers, RequestTimeout, WorkerLost
from nitsum_core.logs import setup_logging
from nitsum_core.policy.goodput import mean_tpot, meets_targets
from nitsum_core.policy.routing import Candidate, Lane, LanePolicy, fallback_lane, leaders_for
from nitsum_core.wire import subjects, topology
from nitsum_core.wire.bus import connect
from nitsum_core.wire.client import CancelRequest, GenerateRequest, StreamChunk, Usage
from nitsum_core.wire.codec import ErrorInfo, decode, encode
from nitsum_core.wire.control import (
    AdmissionBudgets,
    RouterHold,
    RouterHoldAck,
    RouterStatus,
    RouterWindowStats,
)
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.service import decode_or_drop, register, stop_event_on_signals
from nitsum_core.wire.worker import (
    SamplingParams,
    SubmitAck,
    TokenBatch,
    WorkerAbort,
    WorkerHeartbeat,
    WorkerSubmit,
)
from nitsum_router.admission import admit
from nitsum_router.flight import Flight
from nitsum_router.hold import DispatchHold
from nitsum_router.window import TrafficWindow
from nitsum_router.workers import WorkerState


@dataclass(frozen=True)
class RouterConfig:
    worker_timeout_s: float = 2.0
    submit_timeout_s: float = 2.0
    max_in_flight: int = 4096
    max_reroutes: int = 2
    # A hold from a controller that then died must not stall dispatch forever.
    max_hold_s: float = 30.0
    # Control window: the router reports its traffic to the controller and starts a new lane
    # budget this often (the controller's window, docs/architecture.md#controller-policy).
    window_s: float = 1.0


class Router:
    def __init__(
        self, nats_url: str, model: str, tiers: dict[str, Tier], config: RouterConfig | None = None
    ) -> None:
        self.nats_url = nats_url
        self.model = model
        self.tiers = tiers
        self.config = config or RouterConfig()
        self.router_id = uuid.uuid4().hex[:10]
        self.log = setup_logging("router").bind(router_id=self.router_id)
        self.nc: Client | None = None
        self.tokenizer: Tokenizer | None = None
        self.workers: dict[int, WorkerState] = {}
        self.flights: dict[str, Flight] = {}
        self.topology: Topology | None = None
        self.completed = 0
        self.failed = 0
        self.rerouted = 0
        self._tasks: set[asyncio.Task] = set()
        self.dispatch_hold = DispatchHold(self.config.max_hold_s)
        self.lanes = LanePolicy(tiers, self.config.window_s)
        self._budgets: dict[str, float] | None = None  # the controller's latest, applied next window
        self.window = TrafficWindow()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        stop = stop_event_on_signals()
        self.tokenizer = await asyncio.to_thread(Tokenizer, resolve_checkpoint(self.model))
        self.nc = nc = await connect(self.nats_url, name=f"nitsum-router-{self.router_id}")
        await nc.subscribe(subjects.WORKER_HEARTBEAT, cb=self._on_heartbeat)
        await nc.subscribe(subjects.router_tokens(self.router_id), cb=self._on_tokens)
        await nc.subscribe(subjects.ROUTER_CANCEL, cb=self._on_cancel)
        # Not a queue group: every router must hold during a switch.
        await nc.subscribe(subjects.ROUTER_HOLD, cb=self._on_hold)
        await nc.subscribe(subjects.CONTROLLER_BUDGETS, cb=self._on_budgets)
        kv = await topology.open_bucket(nc.jetstream())
        watcher = asyncio.create_task(topology.watch(kv, self._on_topology))
        monitor = asyncio.create_task(self._monitor())
        windows = asyncio.create_task(self._window_loop())
        svc = await register(nc, subjects.SERVICE_ROUTER, "Nitsum router: admission, routing, streaming")
        await svc.add_endpoint(name="generate", subject=subjects.ROUTER_GENERATE, handler=self._on_generate)
        await svc.add_endpoint(name="status", subject=subjects.ROUTER_STATUS, handler=self._on_status)
        self.log.info("router ready", tiers=sorted(self.tiers))
        await stop.wait()
        self.log.info("router stopping", in_flight=len(self.flights))
        for f in list(self.flights.values()):
            await self._fail(f, NitsumError("the router is shutting down; retry against another router"))
        watcher.cancel()
        monitor.cancel()
        windows.cancel()
        await svc.stop()
        await nc.drain()

    def _spawn(self, coro) -> None:  # noqa: ANN001
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- reconfiguration hold (docs/architecture.md#switch-protocol) --------------------------------------------------------
    async def _on_hold(self, msg: Msg) -> None:
        hold = decode_or_drop(self.log, RouterHold, msg.data, "hold")
        if hold is None:
            return
        # Re-home migrated requests first: their old leader is paused (its last tokens are already
        # here), and the new one may stream as soon as it resumes.
        for request_id, slot in hold.moved.items():
            f = self.flights.get(request_id)
            if f is None or f.finished:
                # Cancelled, timed out or failed while paused: it lands on ``slot`` at commit.
                self.dispatch_hold.abort_after[request_id] = slot
                continue
            if f.slot is not None and f.slot in self.workers:
                self.workers[f.slot].in_flight.discard(request_id)
            f.slot = slot
            if slot in self.workers:
                self.workers[slot].in_flight.add(request_id)
        orphans = None
        if hold.hold:
            self.dispatch_hold.hold(hold.plan_id)
        else:
            orphans = self.dispatch_hold.release(hold.plan_id)
        for request_id, slot in (orphans or {}).items():
            await self.nc.publish(subjects.worker_abort(slot), encode(WorkerAbort(request_id)))
        if orphans:
            self.log.info("aborted requests that finished here during the switch", count=len(orphans))
        waiting = sum(1 for t in self._tasks if not t.done())
        self.log.info("hold" if hold.hold else "release", plan=hold.plan_id, moved=len(hold.moved))
        if msg.reply:
            await self.nc.publish(msg.reply, encode(RouterHoldAck(router_id=self.router_id, held=waiting)))

    # ---- control windows (docs/architecture.md#controller-policy) ------------------------------------------------------------
    async def _on_budgets(self, msg: Msg) -> None:
        budgets = decode_or_drop(self.log, AdmissionBudgets, msg.data, "budgets")
        if budgets is not None:
            self._budgets = budgets.budgets

    async def _window_loop(self) -> None:
        """Each window: report the traffic to the controller, start the lanes' next budget."""
        while True:
            await asyncio.sleep(self.config.window_s)
            stats = self.window.close(self.flights.values())
            self.lanes.new_window(self._budgets)
            self._budgets = None
            if not stats:
                continue
            report = RouterWindowStats(router_id=self.router_id, window_s=self.config.window_s, tiers=stats)
            try:
                await self.nc.publish(subjects.ROUTER_STATS, encode(report))
            except Exception as exc:  # a reconnecting client: the controller misses one window
                self.log.warning("window stats not sent", error=str(exc))

    # ---- topology and liveness ---------------------------------------------------------------
    async def _on_topology(self, topo: Topology) -> None:
        self.topology = topo
        self.log.info(
            "topology", epoch=topo.epoch, instances=[i.slots for i in topo.instances], reason=topo.reason
        )

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode_or_drop(self.log, WorkerHeartbeat, msg.data, "heartbeat")
        if hb is None:
            return
        w = self.workers.get(hb.slot)
        now = time.monotonic()
        if w is None or w.heartbeat.worker_id != hb.worker_id:
            if w is not None and w.alive:
                # Same slot, new process: the old one's requests are gone with it.
                await self._worker_died(w, "replaced by a new worker process")
            self.workers[hb.slot] = WorkerState(hb.slot, hb, now)
            self.log.info("worker joined", slot=hb.slot, worker_id=hb.worker_id)
            return
        w.heartbeat, w.last_seen = hb, now
        if not w.alive:
            w.alive = True
            self.log.info("worker back", slot=hb.slot)

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.alive and now - w.last_seen > self.config.worker_timeout_s:
                    await self._worker_died(w, f"no heartbeat for {now - w.last_seen:.1f}s")
            for f in list(self.flights.values()):
                if not f.finished and now > f.deadline:
                    await self._abort_on_worker(f)
                    await self._fail(f, RequestTimeout(f"request exceeded its timeout of {f.req.timeout_s}s"))

    async def _worker_died(self, w: WorkerState, why: str) -> None:
        w.alive = False
        lost = [self.flights[r] for r in w.in_flight if r in self.flights]
        w.in_flight.clear()
        self.log.warning("worker lost", slot=w.slot, why=why, in_flight=len(lost))
        for f in lost:
            # Best effort: a worker declared dead may only be slow (a loaded host). Abort the old
            # copy so it stops generating tokens nobody reads and accepts the request id again.
            await self._abort_on_worker(f)
            f.slot = None
            if f.reroutes >= self.config.max_reroutes:
                await self._fail(
                    f, WorkerLost(f"worker slot {w.slot} died ({why}) and the reroute limit was hit")
                )
                continue
            f.reroutes += 1
            self.rerouted += 1
            self._spawn(self._dispatch(f, exclude={w.slot}, why=f"worker slot {w.slot} died ({why})"))

    # ---- admission -----------------------------------------------------------------------------
    def _max_model_len(self) -> int | None:
        lens = [w.heartbeat.max_model_len for w in self.workers.values() if w.alive]
        return min(lens) if lens else None

    async def _on_generate(self, request: Request) -> None:
        # nats.micro exposes no public reply subject; the stream goes to the request's inbox.
        reply = request._msg.reply
        request_id = ""
        try:
            req = decode(GenerateRequest, request.data)
            request_id = req.request_id
            assert self.tokenizer is not None
            tier, ids = admit(
                req,
                self.tiers,
                self.tokenizer,
                len(self.flights),
                self.config.max_in_flight,
                req.request_id in self.flights,
                self._max_model_len(),
            )
        except NitsumError as exc:
            self.failed += 1
            self.log.info("rejected", request_id=request_id, code=exc.code, reason=exc.message)
            if reply:
                chunk = StreamChunk(
                    request_id=request_id,
                    seq=0,
                    finished=True,
                    finish_reason="error",
                    error=ErrorInfo.from_exc(exc),
                )
                await self.nc.publish(reply, encode(chunk))
            return
        if not reply:
            self.log.warning("generate request without a reply inbox dropped", request_id=request_id)
            return
        assert self.tokenizer is not None
        flight = Flight(
            req=req,
            reply=reply,
            tier=tier,
            prompt_ids=ids,
            detok=IncrementalDetokenizer(self.tokenizer),
            deadline=time.monotonic() + req.timeout_s,
        )
        flight.lane = int(self.lanes.classify(tier.name))
        self.window.arrival(tier.name, len(ids), req.max_tokens)
        self.flights[req.request_id] = flight
        await self.nc.publish(reply, encode(StreamChunk(request_id=req.request_id, seq=0)))
        self._spawn(self._dispatch(flight))

    async def _dispatch(self, f: Flight, exclude: set[int] | None = None, why: str = "") -> None:
        """Send the request (or its remainder, after a worker loss) to the best live worker."""
        assert self.nc is not None
        exclude = set(exclude or ())
        remaining = f.req.max_tokens - len(f.generated)
        submit = WorkerSubmit(
            request_id=f.req.request_id,
            router_id=self.router_id,
            prompt_ids=f.prompt_ids + f.generated,
            sampling=SamplingParams(
                max_tokens=remaining,
                temperature=f.req.temperature,
                top_p=f.req.top_p,
                seed=f.req.seed,
                ignore_eos=f.req.ignore_eos,
            ),
            priority=f.lane,
            epoch=self.topology.epoch if self.topology else 0,
            tpot_s=f.tier.tpot_s,
        )
        while not f.finished:
            if (expired := await self.dispatch_hold.wait()) is not None:
                self.log.warning("hold expired without a release; dispatching again", plan=expired)
            alive = {s for s, w in self.workers.items() if w.alive} - exclude
            leaders, fallback = leaders_for(self.topology, f.tier.name, alive)
            f.lane = fallback_lane(f.lane, fallback)  # no instance is dedicated to its tier right now
            submit.priority = f.lane
            # Its TTFT clock keeps running across re-dispatches; once the first token is out the
            # target is met or missed and the worker need not know it.
            submit.ttft_left_s = (
                f.tier.ttft_s - (time.monotonic() - f.arrived) if f.first_token_at is None else None
            )
            payload = encode(submit)
            slot = self.lanes.pick(
                [
                    Candidate(s, len(self.workers[s].in_flight) + self.workers[s].heartbeat.waiting)
                    for s in leaders
                ],
                Lane(f.lane),
            )
            if slot is None:
                await self._fail(
                    f, NoWorkers(f"no live worker serves tier {f.tier.name!r}" + (f" ({why})" if why else ""))
                )
                return
            # Count the request against the worker before the round trip, so that a burst of
            # concurrent submissions spreads out instead of all picking the same "idle" worker.
            # f.slot is set now too: the worker may stream the first token before its ack lands.
            worker = self.workers[slot]
            worker.in_flight.add(f.req.request_id)
            f.slot = slot
            try:
                resp = await self.nc.request(
                    subjects.worker_submit(slot), payload, timeout=self.config.submit_timeout_s
                )
                ack = decode(SubmitAck, resp.data)
            except (NoRespondersError, NatsTimeout) as exc:
                worker.in_flight.discard(f.req.request_id)
                f.slot = None
                self.log.warning("worker did not take the request", slot=slot, error=type(exc).__name__)
                exclude.add(slot)
                continue
            if not ack.accepted:
                worker.in_flight.discard(f.req.request_id)
                f.slot = None
                if (
                    ack.error is not None
                    and ack.error.code == "reconfiguring"
                    and time.monotonic() < f.deadline
                ):
                    await asyncio.sleep(0.05)  # the slot is mid-switch: ask again after the hold
                    continue
                err = ack.error.to_exc() if ack.error else NitsumError("worker refused the request")
                await self._fail(f, err)
                return
            if f.finished:  # cancelled or timed out while the submit was in the air
                worker.in_flight.discard(f.req.request_id)
                await self.nc.publish(subjects.worker_abort(slot), encode(WorkerAbort(f.req.request_id)))
                return
            if why:
                self.log.info(
                    "rerouted", request_id=f.req.request_id, slot=slot, why=why, generated=len(f.generated)
                )
            return

    # ---- token stream ---------------------------------------------------------------------------
    async def _on_tokens(self, msg: Msg) -> None:
        batch = decode_or_drop(self.log, TokenBatch, msg.data, "token batch")
        if batch is None:
            return
        now = time.monotonic()
        for item in batch.items:
            f = self.flights.get(item.request_id)
            if f is None or f.finished or f.slot != batch.slot:
                continue  # finished, cancelled, or a late batch from a worker we gave up on
            if item.token_ids:
                if f.first_token_at is None:
                    f.first_token_at = now
                    self.lanes.first_token(f.lane, now - f.arrived <= f.tier.ttft_s)
                f.last_token_at = now
                f.generated.extend(item.token_ids)
                f.detok.add(item.token_ids)
            if item.error is not None:
                await self._fail(f, item.error.to_exc())
                continue
            stop_at = f.find_stop() if f.req.stop else None
            if stop_at is not None:
                f.detok.text = f.detok.text[:stop_at]
                await self._abort_on_worker(f)
                await self._finish(f, "stop", item.token_ids)
            elif item.finished:
                await self._finish(f, item.finish_reason or "stop", item.token_ids)
            else:
                text = f.releasable_text(final=False)
                if text or item.token_ids:
                    chunk = StreamChunk(
                        request_id=f.req.request_id, seq=f.next_seq(), text=text, token_ids=item.token_ids
                    )
                    await self.nc.publish(f.reply, encode(chunk))

    def _release(self, f: Flight) -> None:
        f.finished = True
        self.flights.pop(f.req.request_id, None)
        if f.slot is not None and f.slot in self.workers:
            self.workers[f.slot].in_flight.discard(f.req.request_id)

    async def _finish(self, f: Flight, reason: str, token_ids: list[int] | None = None) -> None:
        """Send the final chunk (rest of the text, the last step's tokens, usage)."""
        self._release(f)
        self.completed += 1
        now = time.monotonic()
        first = f.first_token_at or now
        n = len(f.generated)
        usage = Usage(
            prompt_tokens=len(f.prompt_ids),
            completion_tokens=n,
            ttft_s=first - f.arrived,
            tpot_s=mean_tpot(first, f.last_token_at or first, n),
            e2e_s=now - f.arrived,
            worker_slot=f.slot if f.slot is not None else -1,
            reroutes=f.reroutes,
        )
        self.window.finished(f.tier.name, n, meets_targets(usage.ttft_s, usage.tpot_s, f.tier))
        chunk = StreamChunk(
            request_id=f.req.request_id,
            seq=f.next_seq(),
            text=f.releasable_text(final=True),
            token_ids=token_ids or [],
            finished=True,
            finish_reason=reason,
            usage=usage,
        )
        await self.nc.publish(f.reply, encode(chunk))

    async def _fail(self, f: Flight, exc: NitsumError) -> None:
        if f.finished:
            return
        self._release(f)
        self.failed += 1
        self.log.warning("request failed", request_id=f.req.request_id, code=exc.code, reason=exc.message)
        chunk = StreamChunk(
            request_id=f.req.request_id,
            seq=f.next_seq(),
            finished=True,
            finish_reason="error",
            error=ErrorInfo.from_exc(exc),
        )
        await self.nc.publish(f.reply, encode(chunk))

    async def _abort_on_worker(self, f: Flight) -> None:
        if f.slot is not None:
            await self.nc.publish(subjects.worker_abort(f.slot), encode(WorkerAbort(f.req.request_id)))
            if self.dispatch_hold.held:  # mid-switch: its state may already be on its way elsewhere
                self.dispatch_hold.abort_after[f.req.request_id] = f.slot

    async def _on_cancel(self, msg: Msg) -> None:
        cancel = decode_or_drop(self.log, CancelRequest, msg.data, "cancel")
        if cancel is None:
            return
        f = self.flights.get(cancel.request_id)
        if f is None or f.finished:
            return
        await self._abort_on_worker(f)
        await self._finish(f, "cancelled")

    # ---- status ---------------------------------------------------------------------------------
    async def _on_status(self, request: Request) -> None:
        now = time.monotonic()
        by_tier: dict[str, int] = dict.fromkeys(self.tiers, 0)
        for f in self.flights.values():
            by_tier[f.tier.name] = by_tier.get(f.tier.name, 0) + 1
        status = RouterStatus(
            router_id=self.router_id,
            epoch=self.topology.epoch if self.topology else -1,
            workers=[w.view(now) for w in sorted(self.workers.values(), key=lambda w: w.slot)],
            in_flight_by_tier=by_tier,
            completed=self.completed,
            failed=self.failed,
            rerouted=self.rerouted,
            tiers=sorted(self.tiers),
            budgets=dict(self.lanes.budgets),
            budget_scale=self.lanes.scale,
        )
        await request.respond(encode(status))
