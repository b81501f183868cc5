"""The controller's automatic mode: the configurator re-cuts the pool every control window.

Routers report their traffic each window (RouterWindowStats); the shared ``ControlLoop`` -- the
same object the simulator drives -- turns it into demand, admission budgets for the routers'
lane policy, and, when a candidate cut replayed through the simulator on the recent requests at
the offsets the routers reported, starting from the requests they still had in flight
(``sim.replay.PlanReplay``, with this controller's performance model), beats the current one by
more than the switching cost, a new cut that the controller applies with the switch protocol. The
replay runs in a thread, off the event loop; with ``replay_workers`` the window's candidate replays
run side by side in that many processes. The switching cost it weighs is what its own
switches that moved slots have measured (EWMA), starting from ``initial_switch_s``; a switch that
only changes which tiers instances serve costs nothing (``switch_cost``).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Literal

from nats.aio.msg import Msg
from nitsum_core.config import Tier
from nitsum_core.errors import InvalidRequest
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy import reconfig
from nitsum_core.policy.control_loop import ControlLoop, InFlight
from nitsum_core.policy.cuts import boot_plan
from nitsum_core.policy.plan import SHARED, Assignment, Plan, only_tiers_change
from nitsum_core.sim.replay import PlanReplay
from nitsum_core.wire import subjects
from nitsum_core.wire.codec import encode
from nitsum_core.wire.control import AdmissionBudgets, RouterWindowStats
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.service import decode_or_drop

if TYPE_CHECKING:
    from nitsum_tp_controller.controller import Controller


@dataclass(frozen=True)
class AutoPilotConfig:
    perf: PerfModel
    tiers: dict[str, Tier]
    window_s: float = 1.0
    initial_switch_s: float = 1.0
    switch_timeout_s: float = 30.0
    score: Literal["replay", "roofline"] = "replay"  # how candidate cuts are ranked (control_loop)
    replay_workers: int = 0  # processes that replay a window's candidates side by side; 0: in-thread


class AutoPilot:
    def __init__(self, controller: Controller, config: AutoPilotConfig) -> None:
        self.controller, self.config = controller, config
        self.log = controller.log.bind(part="autopilot")
        self.loop: ControlLoop | None = None
        self.switch_s = config.initial_switch_s
        self.switches = 0
        self._boot: Plan | None = None  # the cut to move a freshly booted pool to, before any traffic
        self._boot_from: list[Assignment] = []  # the cut the pool booted on: the boot cut replaces only it
        self._boot_waits = False  # the boot cut waits for slots to join the TP world (logged once)
        # The live slots the loop's positions 0..n-1 stand for: the configurator cuts a pool of n,
        # and after a worker died mid-range the pool is, say, 0, 1, 3.
        self._slots: list[int] = []
        self._routers: set[str] = set()  # routers that reported this window
        # Stats wait here until the window closes: the loop's window runs in a thread (replaying
        # candidate plans through the simulator takes a while) and must not be fed meanwhile.
        self._stats: list[RouterWindowStats] = []
        self._task: asyncio.Task | None = None
        # Spawned, not forked: this process runs threads (the event loop's, the window's).
        self._pool = (
            ProcessPoolExecutor(config.replay_workers, mp_context=multiprocessing.get_context("spawn"))
            if config.replay_workers > 0 and config.score == "replay"
            else None
        )

    async def run(self) -> None:
        nc = self.controller.nc
        assert nc is not None
        await nc.subscribe(subjects.ROUTER_STATS, cb=self._on_stats)
        self.log.info(
            "configurator driving the topology",
            window_s=self.config.window_s,
            replay_workers=self.config.replay_workers,
        )
        try:
            while True:
                await asyncio.sleep(self.config.window_s)
                try:
                    await self._window()
                except Exception:  # a bad window must not stop the controller; the next one retries
                    self.log.exception("control window failed")
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)

    async def _on_stats(self, msg: Msg) -> None:
        stats = decode_or_drop(self.log, RouterWindowStats, msg.data, "router stats")
        if stats is not None:
            self._routers.add(stats.router_id)
            self._stats.append(stats)

    def _feed(self, loop: ControlLoop) -> None:
        """Hand the routers' reports since the last window to the loop, one loop window per
        router window: every window but the last is closed here, without a decision."""
        stats, self._stats = self._stats, []
        # A router reports once per its own window, not aligned with this one's, and a decision
        # that ran long (replays at high load take over a second) or a running switch leaves
        # several of its reports waiting. Added up as one window they read as that many times the
        # real rate, with their arrival times piled into one second. So each router's reports
        # fill the last windows in order (its latest in the window about to be decided), and what
        # is in flight, a snapshot, comes from its latest report only.
        by_router: dict[str, list[RouterWindowStats]] = {}
        for s in stats:
            by_router.setdefault(s.router_id, []).append(s)
        windows = max((len(reports) for reports in by_router.values()), default=1)
        if windows > 1:
            self.log.debug("several router windows handed over at once", windows=windows)
        for k in range(windows):
            if k:
                loop.window(lambda _: 0.0, decide=False)
            for reports in by_router.values():
                first = windows - len(reports)  # this router's reports fill the last windows
                if k >= first:
                    self._feed_report(loop, reports[k - first], latest=k == windows - 1)

    def _feed_report(self, loop: ControlLoop, report: RouterWindowStats, latest: bool) -> None:
        """One router window's arrivals and finishes; its in-flight list only if ``latest``."""
        for name, t in report.tiers.items():
            if name not in self.config.tiers:
                self.log.warning("stats for an unknown tier dropped", tier=name, router=report.router_id)
                continue
            # Offsets are optional (an older router sends none): the replay then re-spaces.
            offsets: list[float | None] = list(t.arrival_offsets_s)
            if len(offsets) != len(t.prompt_tokens):
                offsets = [None] * len(t.prompt_tokens)
            for prompt, output, offset in zip(t.prompt_tokens, t.output_tokens, offsets, strict=False):
                loop.arrival(name, prompt, output, offset)
            for i in range(t.finished):
                loop.finished(name, i < t.good)
            for f in t.in_flight if latest else ():
                loop.in_flight(
                    InFlight(name, f.prompt_tokens, f.output_tokens, f.age_s, f.ttft_s, f.generated)
                )

    def _sync_plan(self) -> Plan | None:
        """The loop follows the written topology (a hand-made switch or a pool change moves it too)."""
        current = self.controller.current
        if current is None or not current.instances:
            return None
        slots = current.slots
        plan = reconfig.topology_plan(current, slots)
        pool = len(slots)
        if self.loop is None or slots != self._slots:
            self._slots = slots
            # The controller boots the pool, and re-boots it when the live workers change, as one
            # TP-1 instance per worker serving every tier: a default no one chose.
            placeholder = all(a.tp == 1 and a.tier == SHARED for a in plan.assignments)
            self.loop = ControlLoop(
                pool,
                self.config.perf,
                self.config.tiers,
                plan,
                self.config.window_s,
                roles=("mixed",),  # prefill->decode hand-off is not in the serving path yet
                replay=PlanReplay(self.config.perf, pool, self.config.tiers, self.config.window_s)
                if self.config.score == "replay"
                else None,
                replay_map=self._pool.map if self._pool is not None else map,
                # The loop may leave it without the debounce, as the simulator's boot cut.
                placeholder=placeholder,
                # A cut the pool cannot take now is not scored, so the loop picks among the cuts it
                # can apply: with a gap in the live slots some aligned cuts of n positions land a
                # TP-k instance across it, and a slot outside the TP world runs TP 1 only.
                fits=partial(self._fits, slots=slots),
            )
            # Where TP 1 cannot decode a tier at all, the pool moves at once to the cut the tier
            # targets suggest (``boot_plan``), rather than serve that tier nothing until traffic
            # has shown the loop the way; that cut is a placeholder for the loop too.
            boot = boot_plan(pool, self.config.perf, self.config.tiers) if placeholder else None
            gap = reconfig.placement_error(boot, slots) if boot is not None else None
            if boot is not None and gap is not None:
                self.log.warning("boot cut not applied", plan=boot.describe(), slots=slots, error=gap)
                boot = None
            self._boot = boot if boot is not None and boot.assignments != plan.assignments else None
            self._boot_from = plan.assignments
            self._boot_waits = False
        self.loop.plan = plan
        return plan

    def _fits(self, plan: Plan, slots: list[int]) -> bool:
        """The loop's ``fits`` check: whether the pool can take ``plan`` now."""
        return reconfig.placement_error(plan, slots, self.controller.pool_joined) is None

    def _boot_now(self) -> Plan | None:
        """The boot cut, once the pool can take it, if the pool still runs the cut it booted on."""
        if self._boot is None or self.loop is None or self.loop.plan.assignments != self._boot_from:
            self._boot = None  # the loop or a hand-made switch has moved the pool since
            return None
        why = reconfig.placement_error(self._boot, self._slots, self.controller.pool_joined)
        if why is None:
            boot, self._boot = self._boot, None
            return boot
        if not self._boot_waits:  # say it once; the loop serves on meanwhile
            self._boot_waits = True
            self.log.info("boot cut waits", plan=self._boot.describe(), why=why)
        return None

    async def _window(self) -> None:
        if self._sync_plan() is None or self.loop is None:
            self._stats.clear()  # no pool to cut yet: this traffic says nothing about a plan
            return
        if self._task is not None and not self._task.done():
            return  # a switch is still running: its window's decision waits
        boot = self._boot_now()
        if boot is not None:
            self._start_switch(boot, "boot cut from the tier targets: TP 1 cannot decode every tier")
            return  # this window's traffic is fed to the loop once the pool has moved
        self._feed(self.loop)
        decision = await asyncio.to_thread(self.loop.window, switch_cost(self.loop.plan, self.switch_s))
        routers, self._routers = max(1, len(self._routers)), set()
        nc, current = self.controller.nc, self.controller.current
        assert nc is not None and current is not None
        if decision.budgets is not None:
            share = {t: rps / routers for t, rps in decision.budgets.items()}
            await nc.publish(
                subjects.CONTROLLER_BUDGETS, encode(AdmissionBudgets(epoch=current.epoch, budgets=share))
            )
        if decision.switch_to is None:
            return
        self._start_switch(
            decision.switch_to,
            f"configurator: predicted {decision.switch_to.predicted_goodput_rps:.2f} req/s "
            f"vs {decision.predicted_current_rps:.2f} now",
        )

    def _start_switch(self, plan: Plan, reason: str) -> None:
        """Switch to ``plan`` in the background (the next windows wait for it)."""
        current = self.controller.current
        assert current is not None
        try:
            target = reconfig.plan_topology(plan, current.epoch + 1, reason, self._slots)
        except InvalidRequest as exc:  # a cut that the gap in the live slots does not allow
            self.log.warning("cut not applied", plan=plan.describe(), slots=self._slots, error=str(exc))
            return
        self.log.info("switching", plan=plan.describe(), slots=self._slots, reason=reason)
        self._task = asyncio.create_task(self._apply(target))

    async def _apply(self, target: Topology) -> None:
        assert self.controller.current is not None
        moves = bool(reconfig.changed_slots(self.controller.current, target))
        t0 = time.perf_counter()
        result = await self.controller.switch_to(target, self.config.switch_timeout_s)
        took = time.perf_counter() - t0
        if result.ok:
            self.switches += 1
            if moves:  # a tier-only switch takes no time and says nothing about the next move
                self.switch_s = 0.7 * self.switch_s + 0.3 * took
            self.log.info("switched", epoch=result.epoch, seconds=round(took, 3))
        else:
            self.log.warning("switch not applied", error=result.error.message if result.error else None)


def switch_cost(current: Plan, measured_s: float) -> Callable[[Plan], float]:
    """Seconds a switch from ``current`` pauses: none when it only changes which tiers instances
    serve (the controller just rewrites the topology), else ``measured_s``, what this
    controller's switches have taken."""
    return lambda plan: 0.0 if only_tiers_change(current.assignments, plan.assignments) else measured_s
