"""The controller: watches worker heartbeats and writes the topology with compare-and-set.

Two ways to a new epoch. (1) The pool changes (a worker joins or dies): one TP-1 instance per
live worker, applied by the workers without migration. (2) A switch, by hand (``reconfigure``)
or by the configurator every control window (``--auto``, ``autopilot.py``): the full protocol in
``switch.py`` -- requests keep their KV and continue on their new instances. A restarted
controller resumes from the bucket.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request
from nitsum_core.errors import InvalidRequest, NitsumError
from nitsum_core.logs import setup_logging
from nitsum_core.policy import reconfig
from nitsum_core.wire import subjects, topology
from nitsum_core.wire.bus import connect
from nitsum_core.wire.codec import ErrorInfo, decode, encode
from nitsum_core.wire.control import ReconfigureRequest, ReconfigureResult
from nitsum_core.wire.cut import Topology, TopologyInstance
from nitsum_core.wire.service import decode_or_drop, register, stop_event_on_signals
from nitsum_core.wire.worker import WorkerHeartbeat
from nitsum_tp_controller.autopilot import AutoPilot, AutoPilotConfig
from nitsum_tp_controller.switch import SwitchDriver


def static_tp1(slots: list[int], epoch: int, reason: str) -> Topology:
    """One mixed-role TP-1 instance per slot, serving every tier."""
    return Topology(
        epoch=epoch,
        instances=[TopologyInstance(instance_id=i, slots=[s]) for i, s in enumerate(sorted(slots))],
        written_at=time.time(),
        reason=reason,
    )


class Controller:
    def __init__(
        self,
        nats_url: str,
        worker_timeout_s: float = 2.0,
        settle_s: float = 0.5,
        autopilot: AutoPilotConfig | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.autopilot = autopilot
        self.worker_timeout_s = worker_timeout_s
        self.settle_s = settle_s
        self.log = setup_logging("tp_controller")
        self.nc: Client | None = None
        self.last_seen: dict[int, float] = {}
        # Slots whose latest heartbeat says they hold the pool's TP communicators: only those can
        # run in a TP > 1 instance (a worker restarted after the pool formed never joins it).
        self.pool_joined: set[int] = set()
        self.current: Topology | None = None
        self.revision = 0
        self.kv = None
        self.known_routers: set[str] = set()  # routers that answered a hold (a dead one costs a 2 s wait)
        self._switch_lock = asyncio.Lock()  # one switch at a time; the pool-change loop waits too

    async def run(self) -> None:
        stop = stop_event_on_signals()
        self.nc = nc = await connect(self.nats_url, name="nitsum-tp-controller")
        self.kv = kv = await topology.open_bucket(nc.jetstream(), create=True)
        self.current, self.revision = await topology.read(kv)
        if self.current is not None:
            self.log.info("resumed topology from bucket", epoch=self.current.epoch, revision=self.revision)
        await nc.subscribe(subjects.WORKER_HEARTBEAT, cb=self._on_heartbeat)
        svc = await register(nc, subjects.SERVICE_CONTROLLER, "Nitsum TP controller: owns the topology")
        await svc.add_endpoint(
            name="topology", subject=subjects.CONTROLLER_TOPOLOGY, handler=self._on_topology_request
        )
        await svc.add_endpoint(
            name="reconfigure", subject=subjects.CONTROLLER_RECONFIGURE, handler=self._on_reconfigure
        )
        loop_task = asyncio.create_task(self._reconcile_loop(kv))
        pilot = AutoPilot(self, self.autopilot) if self.autopilot else None
        pilot_task = asyncio.create_task(pilot.run()) if pilot else None
        self.log.info("controller ready", auto=pilot is not None)
        await stop.wait()
        loop_task.cancel()
        if pilot_task is not None:
            pilot_task.cancel()
        await svc.stop()
        await nc.drain()

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode_or_drop(self.log, WorkerHeartbeat, msg.data, "heartbeat")
        if hb is None:
            return
        self.last_seen[hb.slot] = time.monotonic()
        if hb.pool_joined:
            self.pool_joined.add(hb.slot)
        else:
            self.pool_joined.discard(hb.slot)

    def _live_slots(self) -> list[int]:
        now = time.monotonic()
        return sorted(s for s, t in self.last_seen.items() if now - t <= self.worker_timeout_s)

    async def _reconcile_loop(self, kv) -> None:  # noqa: ANN001 - nats KeyValue
        while True:
            await asyncio.sleep(self.settle_s)
            if self._switch_lock.locked():
                continue
            live = self._live_slots()
            have = self._topology_slots() if self.current else None
            if not live or live == have:
                continue
            epoch = (self.current.epoch + 1) if self.current else 1
            reason = f"live workers changed: {have} -> {live}" if have is not None else f"initial pool {live}"
            topo = static_tp1(live, epoch, reason)
            try:
                self.revision = await topology.write_cas(kv, topo, self.revision)
                self.current = topo
                self.log.info(
                    "topology written", epoch=epoch, slots=live, reason=reason, revision=self.revision
                )
            except topology.TopologyConflict as exc:
                # Another controller wrote first: adopt its view and decide again next tick.
                self.current, self.revision = await topology.read(kv)
                self.log.warning(
                    "topology CAS lost; re-read", error=str(exc), epoch=self.current and self.current.epoch
                )

    async def _on_topology_request(self, request: Request) -> None:
        topo = self.current or Topology(epoch=0, instances=[], written_at=0.0, reason="no topology yet")
        await request.respond(encode(topo))

    def _topology_slots(self) -> list[int]:
        assert self.current is not None
        return self.current.slots

    def _settled_pool(self) -> list[int]:
        """The live slots, provided they are exactly the topology's (no pool change under way)."""
        if self.current is None:
            raise InvalidRequest("no topology yet: wait until the workers are up")
        live, have = self._live_slots(), self._topology_slots()
        if live != have:
            raise InvalidRequest(f"the pool is changing (live {live}, topology {have}); retry in a moment")
        return live

    def _refused(self, exc: NitsumError) -> ReconfigureResult:
        epoch = self.current.epoch if self.current else 0
        return ReconfigureResult(ok=False, epoch=epoch, error=ErrorInfo.from_exc(exc))

    def _target(self, req: ReconfigureRequest) -> Topology:
        """The topology a ReconfigureRequest asks for, validated against the live pool."""
        live = self._settled_pool()
        assert self.current is not None
        epoch = self.current.epoch + 1
        reason = f"reconfigure: {req.reason}"
        if req.tp is not None:
            return reconfig.aligned_topology(req.tp, live, epoch, reason)
        if not req.instances:
            raise InvalidRequest("give either tp (degrees in slot order) or instances")
        used: set[int] = set()
        for i, inst in enumerate(req.instances):
            if not reconfig.is_aligned_block(inst.slots):
                raise InvalidRequest(
                    f"instance {i} {inst.slots} is not an aligned block [j*k, (j+1)*k), k a power of two"
                )
            if used & set(inst.slots) or not set(inst.slots) <= set(live):
                raise InvalidRequest(
                    f"instance {i} {inst.slots} overlaps another or uses a slot outside {live}"
                )
            used |= set(inst.slots)
        instances = [
            TopologyInstance(instance_id=n, slots=i.slots, role=i.role, tiers=i.tiers)
            for n, i in enumerate(req.instances)
        ]
        return Topology(epoch=epoch, instances=instances, written_at=time.time(), reason=reason)

    async def reconfigure(self, req: ReconfigureRequest) -> ReconfigureResult:
        async with self._switch_lock:
            try:
                target = self._target(req)
            except NitsumError as exc:
                return self._refused(exc)
            return await self._switch(target, req.timeout_s)

    async def switch_to(self, target: Topology, timeout_s: float = 30.0) -> ReconfigureResult:
        """Move to ``target`` (built on the current epoch + 1) unless the pool or topology moved on."""
        async with self._switch_lock:
            try:
                live = self._settled_pool()
                assert self.current is not None
                if target.epoch != self.current.epoch + 1:
                    raise InvalidRequest("the topology changed since the plan was made")
                # A plan made for another pool (a worker died or joined since) would put an
                # instance on a dead worker or leave a live one out.
                planned = target.slots
                if planned != live:
                    raise InvalidRequest(
                        f"the plan covers slots {planned} but the live pool is {live}; "
                        "it was made for another pool: make it again for the live slots"
                    )
            except NitsumError as exc:
                return self._refused(exc)
            return await self._switch(target, timeout_s)

    async def _switch(self, target: Topology, timeout_s: float) -> ReconfigureResult:
        assert self.nc is not None and self.current is not None

        async def write(topo: Topology) -> None:
            self.revision = await topology.write_cas(self.kv, topo, self.revision)
            self.current = topo

        if not reconfig.changed_slots(self.current, target):
            # Only which tiers an instance serves changes: nothing pauses, routers follow the bucket.
            if [i.tiers for i in target.instances] == [i.tiers for i in self.current.instances]:
                return ReconfigureResult(ok=True, epoch=self.current.epoch, phases={"total": 0.0})
            await write(target)
            self.log.info("topology written", epoch=target.epoch, reason=target.reason)
            return ReconfigureResult(ok=True, epoch=target.epoch, phases={"total": 0.0})
        driver = SwitchDriver(self.nc, self.log, self.known_routers)
        return await driver.run(self.current, target, write, migrate_timeout_s=timeout_s)

    async def _on_reconfigure(self, request: Request) -> None:
        try:
            req = decode(ReconfigureRequest, request.data)
        except NitsumError as exc:
            await request.respond(encode(ReconfigureResult(ok=False, epoch=0, error=ErrorInfo.from_exc(exc))))
            return
        result = await self.reconfigure(req)
        await request.respond(encode(result))
