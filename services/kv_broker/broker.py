"""The KV directory: fed by workers' KvEvent messages, answered by KV_LOOKUP / KV_LIST.

Plans for migration and prefill->decode hand-off will be computed from this directory; bytes
never pass through the broker.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.msg import Msg
from nats.micro.request import Request
from nitsum_core.errors import NitsumError, ProtocolError, ReconfigFailed
from nitsum_core.logs import setup_logging
from nitsum_core.policy import reconfig
from nitsum_core.wire import subjects
from nitsum_core.wire.bus import connect
from nitsum_core.wire.codec import ErrorInfo, decode, encode
from nitsum_core.wire.kv import (
    KvEvent,
    KvListReply,
    KvListRequest,
    KvLocation,
    KvLookup,
    KvPlan,
    KvPlanRequest,
)
from nitsum_core.wire.service import decode_or_drop, register, stop_event_on_signals
from nitsum_core.wire.worker import WorkerHeartbeat


class KvDirectory:
    """request id -> where its KV lives. Pure state, no I/O (unit-testable)."""

    def __init__(self) -> None:
        self.entries: dict[str, KvLocation] = {}

    def apply(self, ev: KvEvent) -> None:
        if ev.kind == "free":
            cur = self.entries.get(ev.request_id)
            if cur is not None and cur.slot == ev.slot:
                del self.entries[ev.request_id]
            return
        self.entries[ev.request_id] = KvLocation(
            request_id=ev.request_id,
            found=True,
            slot=ev.slot,
            block_ids=list(ev.block_ids),
            head_start=ev.head_start,
            head_end=ev.head_end,
            num_tokens=ev.num_tokens,
        )

    def lookup(self, request_id: str) -> KvLocation:
        return self.entries.get(request_id) or KvLocation(request_id=request_id, found=False)

    def on_slot(self, slot: int | None) -> list[KvLocation]:
        return [e for e in self.entries.values() if slot is None or e.slot == slot]

    def drop_slot(self, slot: int) -> int:
        gone = [k for k, e in self.entries.items() if e.slot == slot]
        for k in gone:
            del self.entries[k]
        return len(gone)


class KvBroker:
    def __init__(self, nats_url: str, worker_timeout_s: float = 2.0) -> None:
        self.nats_url = nats_url
        self.worker_timeout_s = worker_timeout_s
        self.directory = KvDirectory()
        self.last_seen: dict[int, float] = {}
        self.log = setup_logging("kv_broker")

    async def run(self) -> None:
        stop = stop_event_on_signals()
        nc = await connect(self.nats_url, name="nitsum-kv-broker")
        await nc.subscribe(subjects.KV_EVENTS, cb=self._on_event)
        await nc.subscribe(subjects.WORKER_HEARTBEAT, cb=self._on_heartbeat)
        svc = await register(nc, subjects.SERVICE_KV_BROKER, "Nitsum KV broker: KV block directory")
        await svc.add_endpoint(name="lookup", subject=subjects.KV_LOOKUP, handler=self._on_lookup)
        await svc.add_endpoint(name="list", subject=subjects.KV_LIST, handler=self._on_list)
        await svc.add_endpoint(name="plan", subject=subjects.KV_PLAN, handler=self._on_plan)
        reaper = asyncio.create_task(self._reap_dead_workers())
        self.log.info("kv broker ready")
        await stop.wait()
        reaper.cancel()
        await svc.stop()
        await nc.drain()

    async def _on_event(self, msg: Msg) -> None:
        ev = decode_or_drop(self.log, KvEvent, msg.data, "kv event")
        if ev is not None:
            self.directory.apply(ev)

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode_or_drop(self.log, WorkerHeartbeat, msg.data, "heartbeat")
        if hb is not None:
            self.last_seen[hb.slot] = time.monotonic()

    async def _reap_dead_workers(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for slot, seen in list(self.last_seen.items()):
                if now - seen > self.worker_timeout_s:
                    del self.last_seen[slot]
                    dropped = self.directory.drop_slot(slot)
                    self.log.warning("worker gone; its KV entries dropped", slot=slot, entries=dropped)

    async def _on_lookup(self, request: Request) -> None:
        try:
            q = decode(KvLookup, request.data)
        except ProtocolError as exc:
            await request.respond_error("400", exc.message)
            return
        await request.respond(encode(self.directory.lookup(q.request_id)))

    async def _on_list(self, request: Request) -> None:
        try:
            q = decode(KvListRequest, request.data) if request.data else KvListRequest()
        except ProtocolError as exc:
            await request.respond_error("400", exc.message)
            return
        await request.respond(encode(KvListReply(entries=self.directory.on_slot(q.slot))))

    async def _on_plan(self, request: Request) -> None:
        """Migration plan for a topology switch, from the paused leaders' exact block tables.

        The directory (fed by alloc/free events) lags by up to a step; the paused inventory does
        not, so the plan is computed from it and the directory is then moved to the new homes.
        """
        try:
            req = decode(KvPlanRequest, request.data)
            plan = reconfig.plan_migration(req)
        except NitsumError as exc:
            await request.respond(encode(KvPlan(error=ErrorInfo.from_exc(exc))))
            return
        except Exception as exc:  # a bug here must reach the controller as an error, not silence
            self.log.exception("migration planning failed")
            err = ReconfigFailed(f"kv_broker could not plan the switch: {type(exc).__name__}: {exc}")
            await request.respond(encode(KvPlan(error=ErrorInfo.from_exc(err))))
            return
        stale = [
            r.request_id
            for r in req.requests
            if r.num_computed and not self.directory.lookup(r.request_id).found
        ]
        for a in plan.assignments:
            if a.block_table:
                inst = reconfig.instance_of(req.new, a.leader)
                self.directory.apply(
                    KvEvent(
                        slot=a.leader,
                        request_id=a.request_id,
                        kind="alloc",
                        block_ids=a.block_table,
                        head_start=0,
                        head_end=req.num_kv_heads if inst else 0,
                    )
                )
        self.log.info(
            "migration plan",
            requests=len(req.requests),
            transfers=len(plan.transfers),
            recomputed=len(plan.recomputed),
            not_in_directory=len(stale),
        )
        await request.respond(encode(plan))
