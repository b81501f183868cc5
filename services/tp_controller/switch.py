"""One topology switch, epoch e -> e+1: hold -> pause -> plan -> migrate -> commit -> resume.

Any failure before the compare-and-set write aborts: paused workers drop their staging and resume
epoch e, routers get their requests' old homes back and stop holding. Nothing is dropped or
restarted in either path; every phase's time and the bytes moved are returned.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nitsum_core.errors import NitsumError, ReconfigFailed
from nitsum_core.policy import reconfig
from nitsum_core.wire import subjects
from nitsum_core.wire.codec import ErrorInfo, T, decode, encode
from nitsum_core.wire.control import ReconfigureResult, RouterHold, RouterHoldAck
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.kv import KvPlan, KvPlanRequest, RequestState
from nitsum_core.wire.reconfiguration import (
    ControlAck,
    PauseAck,
    ReconfigAbort,
    ReconfigCommit,
    ReconfigMigrate,
    ReconfigPause,
)

PAUSE_TIMEOUT_S = 10.0
COMMIT_TIMEOUT_S = 10.0
ABORT_TIMEOUT_S = 5.0


class SwitchDriver:
    def __init__(self, nc: Client, log, known_routers: set[str] | None = None) -> None:  # noqa: ANN001
        self.nc = nc
        self.log = log
        # Routers that answered earlier holds: once all of them answered, stop waiting for more.
        self.known_routers = known_routers if known_routers is not None else set()

    async def _ask(self, subject: str, msg: msgspec.Struct, reply: type[T], timeout: float) -> T:
        try:
            resp = await self.nc.request(subject, encode(msg), timeout=timeout)
        except NoRespondersError:
            raise ReconfigFailed(f"nobody answers on {subject} (worker or service down)") from None
        except NatsTimeout:
            raise ReconfigFailed(f"no answer on {subject} within {timeout:.0f}s") from None
        return decode(reply, resp.data)

    async def _all_slots(
        self, slots: list[int], phase: str, msg: msgspec.Struct, reply: type[T], timeout: float
    ) -> list[T]:
        """Ask every slot; fail as soon as one fails (a dead peer must not cost the full timeout)."""
        tasks = {
            asyncio.create_task(self._ask(subjects.worker_control(s, phase), msg, reply, timeout)): s
            for s in slots
        }
        failed: list[str] = []
        try:
            for done in asyncio.as_completed(list(tasks)):
                try:
                    ack = await done
                except NitsumError as exc:
                    failed.append(exc.message)
                    break
                if not ack.ok:
                    failed.append(f"slot {ack.slot}: {ack.error.message if ack.error else 'refused'}")
                    break
        finally:
            for task in tasks:
                task.cancel()
        if failed:
            raise ReconfigFailed(f"{phase} failed: " + "; ".join(failed))
        return [t.result() for t in tasks]

    async def _routers(self, hold: RouterHold, wait_s: float = 2.0) -> int:
        """Tell every router (plain subscription, no queue group); return how many answered."""
        inbox = self.nc.new_inbox()
        got: list[RouterHoldAck] = []
        first = asyncio.Event()

        async def on_reply(msg) -> None:  # noqa: ANN001
            got.append(decode(RouterHoldAck, msg.data))
            if {a.router_id for a in got} >= self.known_routers:
                first.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        await self.nc.publish(subjects.ROUTER_HOLD, encode(hold), reply=inbox)
        try:
            await asyncio.wait_for(first.wait(), wait_s)
            if not self.known_routers:
                await asyncio.sleep(0.02)  # first switch: give other routers a round trip to answer
        except TimeoutError:
            self.log.warning(
                "not every known router answered the hold; continuing",
                plan=hold.plan_id,
                answered=len(got),
                known=len(self.known_routers),
            )
            self.known_routers.clear()  # forget routers that are gone
        await sub.unsubscribe()
        self.known_routers |= {a.router_id for a in got}
        return len(got)

    async def run(
        self,
        old: Topology,
        new: Topology,
        write: Callable[[Topology], Awaitable[None]],
        migrate_timeout_s: float = 30.0,
    ) -> ReconfigureResult:
        plan_id = uuid.uuid4().hex[:10]
        affected = reconfig.changed_slots(old, new)
        log = self.log.bind(plan=plan_id, epoch=new.epoch)
        phases: dict[str, float] = {}
        t_start = time.perf_counter()
        if not affected:
            return ReconfigureResult(ok=True, epoch=old.epoch, phases={"total": 0.0})
        log.info(
            "switch starting", old=[i.slots for i in old.instances], new=[i.slots for i in new.instances]
        )
        t = time.perf_counter()
        await self._routers(RouterHold(plan_id=plan_id, hold=True))
        phases["hold"] = time.perf_counter() - t
        paused: list[int] = []
        states: list[RequestState] = []
        try:
            t = time.perf_counter()
            pause = ReconfigPause(plan_id=plan_id, target=new)
            raw = await asyncio.gather(
                *(
                    self._ask(subjects.worker_control(s, "pause"), pause, PauseAck, PAUSE_TIMEOUT_S)
                    for s in affected
                ),
                return_exceptions=True,
            )
            paused = [s for s, a in zip(affected, raw, strict=True) if isinstance(a, PauseAck) and a.ok]
            bad = [
                f"slot {s}: {a.message if isinstance(a, NitsumError) else a.error.message if a.error else a}"
                for s, a in zip(affected, raw, strict=True)
                if not (isinstance(a, PauseAck) and a.ok)
            ]
            if bad:
                raise ReconfigFailed("pause failed: " + "; ".join(bad))
            acks: list[PauseAck] = raw  # type: ignore[assignment]
            states = [r for a in acks for r in a.requests]
            paused_at = time.perf_counter()  # the moved requests are held from here to the commit
            phases["pause"] = paused_at - t

            t = time.perf_counter()
            plan_req = KvPlanRequest(
                old=old,
                new=new,
                requests=states,
                kv_units={a.slot: a.kv_units for a in acks},
                num_kv_heads=acks[0].num_kv_heads,
                block_size=acks[0].block_size,
            )
            plan = await self._ask(subjects.KV_PLAN, plan_req, KvPlan, 5.0)
            if plan.error is not None:
                raise ReconfigFailed(f"kv_broker could not plan the migration: {plan.error.message}")
            phases["plan"] = time.perf_counter() - t

            t = time.perf_counter()
            migrate = ReconfigMigrate(plan_id=plan_id, target=new, plan=plan, requests=states)
            moved_acks = await self._all_slots(affected, "migrate", migrate, ControlAck, migrate_timeout_s)
            phases["migrate"] = time.perf_counter() - t

            t = time.perf_counter()
            # Re-home the requests at the routers while every old leader is still paused.
            await self._routers(
                RouterHold(
                    plan_id=plan_id, hold=True, moved={a.request_id: a.leader for a in plan.assignments}
                )
            )
            await write(new)  # compare-and-set: a second controller cannot fork the topology
        except Exception as exc:
            err = exc if isinstance(exc, NitsumError) else ReconfigFailed(f"{type(exc).__name__}: {exc}")
            log.warning("switch aborted; resuming the old epoch", error=err.message, paused=paused)
            await self._abort(plan_id, affected, err.message)  # harmless where not paused
            await self._routers(
                RouterHold(plan_id=plan_id, hold=False, moved={r.request_id: r.slot for r in states})
            )
            phases["total"] = time.perf_counter() - t_start
            return ReconfigureResult(ok=False, epoch=old.epoch, error=ErrorInfo.from_exc(err), phases=phases)

        commit = ReconfigCommit(plan_id=plan_id, target=new, held_s=time.perf_counter() - paused_at)
        error = None
        weight_bytes = 0
        try:
            commit_acks = await self._all_slots(affected, "commit", commit, ControlAck, COMMIT_TIMEOUT_S)
            weight_bytes = sum(a.weight_bytes_moved for a in commit_acks)
        except ReconfigFailed as exc:  # past the CAS there is no going back: report it loudly
            log.error("commit failed on some slots after the topology was written", error=exc.message)
            error = ErrorInfo.from_exc(exc)
        phases["commit"] = time.perf_counter() - t
        t = time.perf_counter()
        await self._routers(RouterHold(plan_id=plan_id, hold=False))
        phases["resume"] = time.perf_counter() - t
        phases["total"] = time.perf_counter() - t_start
        result = ReconfigureResult(
            ok=error is None,
            epoch=new.epoch,
            error=error,
            phases=phases,
            requests_moved=len(plan.assignments),
            requests_recomputed=len(plan.recomputed),
            transfers=len(plan.transfers),
            kv_bytes_moved=sum(a.bytes_sent for a in moved_acks),
            weight_bytes_moved=weight_bytes,
        )
        log.info(
            "switch done",
            **{f"{k}_ms": round(v * 1000, 2) for k, v in phases.items()},
            requests_moved=result.requests_moved,
            kv_bytes=result.kv_bytes_moved,
        )
        return result

    async def _abort(self, plan_id: str, slots: list[int], reason: str) -> None:
        msg = ReconfigAbort(plan_id=plan_id, reason=reason)
        acks = await asyncio.gather(
            *(
                self._ask(subjects.worker_control(s, "abort"), msg, ControlAck, ABORT_TIMEOUT_S)
                for s in slots
            ),
            return_exceptions=True,
        )
        for s, a in zip(slots, acks, strict=True):
            if isinstance(a, BaseException):
                # Still blocked in a transfer to a dead peer: it resumes the old epoch once the
                # collective timeout fires, because the abort is already queued behind it.
                self.log.warning("slot did not ack the abort yet", slot=s, error=str(a))
