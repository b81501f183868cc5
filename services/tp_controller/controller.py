"""The controller: watches worker heartbeats and writes the topology with compare-and-set.

For now the cut is static -- one TP-1 instance per live worker; a new epoch is written when the
set of live workers changes (a worker joins or dies). A restarted controller resumes from the
bucket: it reads the last epoch and only writes when the pool actually differs.
"""

from __future__ import annotations

import asyncio
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request
from nitsum_core import messages as m
from nitsum_core import subjects, topology
from nitsum_core.bus import connect
from nitsum_core.logs import setup_logging
from nitsum_core.service import decode_or_drop, register, stop_event_on_signals


def static_tp1(slots: list[int], epoch: int, reason: str) -> m.Topology:
    """One mixed-role TP-1 instance per slot, serving every tier."""
    return m.Topology(
        epoch=epoch,
        instances=[m.Instance(instance_id=i, slots=[s]) for i, s in enumerate(sorted(slots))],
        written_at=time.time(),
        reason=reason,
    )


class Controller:
    def __init__(self, nats_url: str, worker_timeout_s: float = 2.0, settle_s: float = 0.5) -> None:
        self.nats_url = nats_url
        self.worker_timeout_s = worker_timeout_s
        self.settle_s = settle_s
        self.log = setup_logging("tp_controller")
        self.nc: Client | None = None
        self.last_seen: dict[int, float] = {}
        self.current: m.Topology | None = None
        self.revision = 0

    async def run(self) -> None:
        stop = stop_event_on_signals()
        self.nc = nc = await connect(self.nats_url, name="nitsum-tp-controller")
        kv = await topology.open_bucket(nc.jetstream(), create=True)
        self.current, self.revision = await topology.read(kv)
        if self.current is not None:
            self.log.info("resumed topology from bucket", epoch=self.current.epoch, revision=self.revision)
        await nc.subscribe(subjects.WORKER_HEARTBEAT, cb=self._on_heartbeat)
        svc = await register(nc, subjects.SERVICE_CONTROLLER, "Nitsum TP controller: owns the topology")
        await svc.add_endpoint(
            name="topology", subject=subjects.CONTROLLER_TOPOLOGY, handler=self._on_topology_request
        )
        loop_task = asyncio.create_task(self._reconcile_loop(kv))
        self.log.info("controller ready")
        await stop.wait()
        loop_task.cancel()
        await svc.stop()
        await nc.drain()

    async def _on_heartbeat(self, msg: Msg) -> None:
        hb = decode_or_drop(self.log, m.WorkerHeartbeat, msg.data, "heartbeat")
        if hb is None:
            return
        self.last_seen[hb.slot] = time.monotonic()

    def _live_slots(self) -> list[int]:
        now = time.monotonic()
        return sorted(s for s, t in self.last_seen.items() if now - t <= self.worker_timeout_s)

    async def _reconcile_loop(self, kv) -> None:  # noqa: ANN001 - nats KeyValue
        while True:
            await asyncio.sleep(self.settle_s)
            live = self._live_slots()
            have = sorted(s for inst in self.current.instances for s in inst.slots) if self.current else None
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
        topo = self.current or m.Topology(epoch=0, instances=[], written_at=0.0, reason="no topology yet")
        await request.respond(m.encode(topo))
