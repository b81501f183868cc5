"""The configurator driving the real services (tp_controller --auto): routers report traffic,
the controller re-cuts the pool with the switch protocol, requests in flight keep going.

The tiers are sized against the CPU roofline for this small Llama (perf_model: ~2.7 ms per
decode step at TP 1, ~2.0 ms at TP 2): an interactive TPOT target of 2.3 ms is reachable only
at TP 2. So the controller moves its four TP-1 instances to the boot cut before any traffic
(one TP-2 instance for every tier, two TP-1 ones for background), and, once an operator has cut
the pool back to TP 1 by hand, interactive traffic makes the configurator re-cut it into two TP-2
instances. The test checks the control path (reports -> decision -> switch -> budgets), not CPU
speed.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
from conftest import hf_greedy, load_hf
from nitsum_cli.stack import Stack, StackConfig
from nitsum_core.client import NitsumClient
from nitsum_core.config import Tier
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.errors import InvalidRequest
from nitsum_core.perf.perf_model import HARDWARE, PerfModel, model_spec
from nitsum_core.policy import reconfig
from nitsum_core.policy.control_loop import ControlLoop
from nitsum_core.policy.cuts import boot_plan
from nitsum_core.policy.plan import SHARED, Assignment, Plan, TierSet
from nitsum_core.wire import subjects
from nitsum_core.wire.bus import connect
from nitsum_core.wire.codec import decode
from nitsum_core.wire.control import AdmissionBudgets, InFlightRequest, RouterWindowStats, TierWindowStats
from nitsum_core.wire.cut import Topology, TopologyInstance
from nitsum_tp_controller.autopilot import AutoPilot, AutoPilotConfig, switch_cost
from nitsum_tp_controller.controller import Controller, static_tp1

TIERS = """
[tiers.interactive]
ttft_s = 30.0
tpot_s = 0.0023
priority = 0

[tiers.background]
ttft_s = 60.0
tpot_s = 2.0
priority = 2
"""
PROMPTS = [f"Question {i}: what comes next in " + "one two three " * (1 + i % 4) for i in range(12)]
N_TOKENS = 48


async def test_configurator_recuts_the_pool_and_requests_survive(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    tiers = tmp_path / "tiers.toml"
    tiers.write_text(TIERS)
    s = Stack(
        StackConfig(
            workers=4,
            model=str(tiny_llama_dir),
            home=tmp_path / "home",
            kv_cache_mb=16,
            threads_per_worker=1,
            tiers_file=str(tiers),
            auto=True,
            replay_workers=1,  # the window's replays in a spawned process, as a deployment runs them
        )
    )
    await s.start()
    try:
        nc = await connect(s.nats_url, name="test-autopilot")
        budgets: list[AdmissionBudgets] = []

        async def on_budgets(msg) -> None:  # noqa: ANN001
            budgets.append(decode(AdmissionBudgets, msg.data))

        await nc.subscribe(subjects.CONTROLLER_BUDGETS, cb=on_budgets)
        async with NitsumClient(s.nats_url) as c:
            booted = None
            for _ in range(200):  # no traffic yet: the boot cut comes from the tier file alone
                topo = decode(Topology, (await nc.request(subjects.CONTROLLER_TOPOLOGY, b"", timeout=2)).data)
                if topo.reason.startswith("boot cut"):
                    booted = topo
                    break
                await asyncio.sleep(0.1)
            assert booted is not None, "the controller never left its TP-1 boot topology"
            assert [(i.slots, i.tiers) for i in booted.instances] == [
                ([0, 1], []),
                ([2], ["background"]),
                ([3], ["background"]),
            ]
            # An operator's cut that cannot decode interactive at all; the traffic below re-cuts it.
            await c.reconfigure(tp=[1, 1, 1, 1], reason="by hand")
            start = await c.status()
            assert len(start.workers) == 4

            async def run(i: int) -> list[int]:
                await asyncio.sleep(0.4 * i)  # a steady trickle: the controller sees demand each window
                done = await c.complete(PROMPTS[i], max_tokens=N_TOKENS, tier="interactive", timeout_s=120)
                return done.token_ids

            tasks = [asyncio.create_task(run(i)) for i in range(len(PROMPTS))]
            switched = None
            for _ in range(200):
                reply = await nc.request(subjects.CONTROLLER_TOPOLOGY, b"", timeout=2)
                topo = decode(Topology, reply.data)
                if topo.reason.startswith("configurator"):
                    switched = topo
                    break
                await asyncio.sleep(0.1)
            outputs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)
            after = await c.status()
        await nc.close()
    finally:
        s.stop()

    assert switched is not None, "the configurator never re-cut the pool"
    assert [i.slots for i in switched.instances] == [[0, 1], [2, 3]], switched
    assert switched.epoch > start.epoch
    assert budgets and "interactive" in budgets[-1].budgets  # the controller sent budgets ...
    assert "interactive" in after.budgets  # ... and the router runs its lanes with them
    # Every request completed, token for token the model's greedy output, across the switch.
    hf = load_hf(tiny_llama_dir)
    tok = Tokenizer(tiny_llama_dir)
    for prompt, got in zip(PROMPTS, outputs, strict=True):
        assert got == hf_greedy(hf, tok.encode_prompt(prompt), N_TOKENS)
    assert after.failed == start.failed
    assert sum(w.weight_bytes_moved for w in after.workers) == 0


@pytest.mark.parametrize("bad", ["[tiers.x]\nttft_s = 1\n", "not toml ["])
def test_controller_refuses_a_bad_tier_file(tmp_path: Path, bad: str) -> None:
    import subprocess
    import sys

    path = tmp_path / "tiers.toml"
    path.write_text(bad)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nitsum_tp_controller",
            "--auto",
            "--model",
            "llama-3.1-8b",
            "--tiers",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert str(path) in out.stderr  # the error names the file


def test_a_switch_that_only_changes_tiers_is_weighed_as_free() -> None:
    # The controller applies a tier-only switch by rewriting the topology (nothing pauses), so
    # the loop must not hold such a re-cut to the cost of one that moves slots.
    shared = Plan([Assignment(0, 1, "mixed", SHARED), Assignment(1, 1, "mixed", SHARED)])
    cost = switch_cost(shared, measured_s=2.5)
    assert (
        cost(
            Plan(
                [
                    Assignment(0, 1, "mixed", TierSet.of("interactive")),
                    Assignment(1, 1, "mixed", TierSet.of("agent")),
                ]
            )
        )
        == 0.0
    )
    assert cost(Plan([Assignment(0, 2, "mixed", SHARED)])) == 2.5
    assert cost(Plan([Assignment(0, 1, "prefill", SHARED), Assignment(1, 1, "decode", SHARED)])) == 2.5


def test_reports_waiting_from_several_router_windows_go_to_a_loop_window_each() -> None:
    # A router's windows are not aligned with the controller's, and a long decision leaves several
    # of its reports waiting: two of router a's land in one controller window. Each goes to its
    # own loop window (added up, they read as twice a's rate, their arrival times piled into one
    # second), router b's one report to the latest; only each router's latest in-flight snapshot
    # counts (both would replay its backlog twice).
    tiers = {"interactive": Tier("interactive", 1.0, 0.05, 0)}
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    pilot = AutoPilot(
        SimpleNamespace(log=structlog.get_logger(), pool_joined={0, 1}), AutoPilotConfig(perf, tiers)
    )  # type: ignore[arg-type]
    loop = ControlLoop(
        2, perf, tiers, Plan([Assignment(0, 1, "mixed", SHARED), Assignment(1, 1, "mixed", SHARED)])
    )

    def report(router: str, age: float) -> RouterWindowStats:
        flight = InFlightRequest(prompt_tokens=10, output_tokens=20, age_s=age)
        stats = TierWindowStats(
            prompt_tokens=[10], output_tokens=[20], arrival_offsets_s=[0.5], in_flight=[flight]
        )
        return RouterWindowStats(router_id=router, window_s=1.0, tiers={"interactive": stats})

    pilot._stats = [report("a", 1.0), report("b", 3.0), report("a", 2.0)]
    pilot._feed(loop)
    assert loop._windows_run == 1 and len(loop._recent[-1]) == 1  # a's first window, closed
    assert len(loop.arrivals) == 2  # a's second and b's: the window about to be decided
    assert sorted(f.age_s for f in loop._in_flight) == [2.0, 3.0]
    decision = loop.window(lambda _: 0.0)
    # Demand over the two windows seen: three arrivals in two seconds, not three in one.
    assert decision.demands["interactive"].arrival_rps == pytest.approx(1.5)


@pytest.mark.parametrize(("tpot_s", "boots"), [(0.004, True), (0.05, False)])
def test_a_pool_booted_on_tp1_moves_to_the_tier_files_boot_cut(tpot_s: float, boots: bool) -> None:
    # 8B on H100 decodes no faster than ~4.5 ms a step at TP 1: a 4 ms tier needs the boot cut
    # (one TP-2 instance for every tier, TP 1 for the rest); at 50 ms TP 1 serves every tier.
    tiers = {"interactive": Tier("interactive", 1.0, tpot_s, 0), "batch": Tier("batch", 10.0, 0.1, 1)}
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    controller = SimpleNamespace(
        log=structlog.get_logger(),
        current=static_tp1([0, 1, 2, 3], 1, "pool changed"),
        pool_joined={0, 1, 2, 3},
    )
    pilot = AutoPilot(controller, AutoPilotConfig(perf, tiers, score="roofline"))  # type: ignore[arg-type]
    assert pilot._sync_plan() is not None
    if not boots:
        assert pilot._boot is None
        return
    assert pilot._boot is not None
    assert pilot._boot.assignments == [
        Assignment(0, 2, "mixed", SHARED),
        Assignment(2, 1, "mixed", TierSet.of("batch")),
        Assignment(3, 1, "mixed", TierSet.of("batch")),
    ]
    # Only a loop built on a new pool boots it: a TP-1 cut written later on the same pool (by
    # hand) is left to the traffic.
    pilot._boot = None
    pilot.controller.current = static_tp1([0, 1, 2, 3], 1, "pool changed")
    pilot._sync_plan()
    assert pilot._boot is None


def test_the_autopilot_cuts_a_pool_with_a_gap_onto_its_live_slots() -> None:
    # Slot 4's worker died and the controller re-booted the pool on slots 0-3, 5, 6. The loop
    # cuts a pool of six; the autopilot places its positions on the live slots in order, so the
    # boot cut's TP-2 instance lands on slots 0-1 and its TP-1 ones on 2, 3, 5 and 6: exactly the
    # live pool, which the controller accepts.
    tiers = {"interactive": Tier("interactive", 1.0, 0.004, 0), "batch": Tier("batch", 10.0, 0.1, 1)}
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    live = [0, 1, 2, 3, 5, 6]
    controller = SimpleNamespace(
        log=structlog.get_logger(), current=static_tp1(live, 3, "slot 4 died"), pool_joined=set(live)
    )
    pilot = AutoPilot(controller, AutoPilotConfig(perf, tiers, score="roofline"))  # type: ignore[arg-type]
    plan = pilot._sync_plan()
    assert plan is not None and pilot.loop is not None and pilot.loop.pool == 6
    assert [a.start for a in plan.assignments] == [0, 1, 2, 3, 4, 5]  # positions, not slot ids
    assert pilot._boot is not None
    target = reconfig.plan_topology(pilot._boot, 4, "boot", pilot._slots)
    assert [i.slots for i in target.instances] == [[0, 1], [2], [3], [5], [6]]
    # With slot 1 dead instead, positions 0-1 are slots 0 and 2, not an aligned block (the
    # weight and KV slices of a TP-2 instance live on a pair [2j, 2j+1]): the boot cut is refused
    # with what to do, so the autopilot neither proposes it nor starts a switch.
    pilot.controller.current = static_tp1([0, 2, 3, 4, 5, 6], 5, "slot 1 died")
    pilot._sync_plan()
    boot = boot_plan(6, perf, tiers)
    assert boot is not None and boot.assignments[0].tp == 2
    with pytest.raises(InvalidRequest, match=r"slots \[0, 2\], not an aligned block"):
        reconfig.plan_topology(boot, 6, "boot", pilot._slots)
    assert pilot._boot is None
    pilot._start_switch(boot, "boot")
    assert pilot._task is None


def _first_switch(live: list[int], joined: set[int] | None = None) -> Plan | None:
    """The first cut the autopilot's loop proposes on the live slots ``live`` (of which ``joined``
    hold TP communicators; default: all) under traffic that only TP >= 2 can decode within its
    TPOT target (roofline scoring)."""
    tiers = {"interactive": Tier("interactive", 1.0, 0.004, 0), "batch": Tier("batch", 10.0, 0.1, 1)}
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    controller = SimpleNamespace(
        log=structlog.get_logger(),
        current=static_tp1(live, 3, "pool changed"),
        pool_joined=set(live) if joined is None else joined,
    )
    pilot = AutoPilot(controller, AutoPilotConfig(perf, tiers, score="roofline"))  # type: ignore[arg-type]
    pilot._sync_plan()
    assert pilot.loop is not None
    for _ in range(4):
        for i in range(60):
            pilot.loop.arrival("interactive", 500, 200, i / 60)
            pilot.loop.arrival("batch", 1000, 300, i / 60)
            pilot.loop.finished("interactive", good=False)
        switch = pilot.loop.window(lambda _: 0.1).switch_to
        if switch is not None:
            return switch
    return None


def test_the_loop_scores_only_the_cuts_a_gap_in_the_live_slots_allows() -> None:
    # On six contiguous slots the loop re-cuts to 3 x TP 2. With slot 4 dead (live 0-3, 5, 6),
    # positions 4-5 are slots 5 and 6, where a TP-2 instance cannot run: that cut would be refused
    # every window. The loop scores only the cuts it can place, and picks one with TP 2 where the
    # live slots allow it and TP 1 across the gap.
    contiguous = _first_switch([0, 1, 2, 3, 4, 5])
    assert contiguous is not None and [a.tp for a in contiguous.assignments] == [2, 2, 2]
    live = [0, 1, 2, 3, 5, 6]
    gapped = _first_switch(live)
    assert gapped is not None and reconfig.placement_error(gapped, live) is None
    assert any(a.tp == 2 for a in gapped.assignments)
    placed = reconfig.plan_topology(gapped, 4, "configurator", live)
    assert sorted(s for i in placed.instances for s in i.slots) == live


def test_the_loop_keeps_tp_above_1_to_slots_in_the_tp_world() -> None:
    # Slot 5's worker was restarted after the pool formed: it serves, but holds no TP
    # communicators (its heartbeat says pool_joined=False), so a TP-2 instance on slots 4-5 would
    # be refused by the worker at every switch. The loop scores only cuts with TP 1 there.
    cut = _first_switch([0, 1, 2, 3, 4, 5], joined={0, 1, 2, 3, 4})
    assert cut is not None and any(a.tp == 2 for a in cut.assignments)
    assert all(a.tp == 1 for a in cut.assignments if 5 in a.slots)


def test_the_boot_cut_waits_for_the_tp_world_and_only_replaces_the_cut_booted_on() -> None:
    # Workers join the pool's TP world a few seconds after they start serving: until they have,
    # a boot cut with TP 2 waits (said once), and the loop serves on meanwhile.
    tiers = {"interactive": Tier("interactive", 1.0, 0.004, 0), "batch": Tier("batch", 10.0, 0.1, 1)}
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    controller = SimpleNamespace(
        log=structlog.get_logger(), current=static_tp1([0, 1, 2, 3], 1, "pool changed"), pool_joined=set()
    )
    pilot = AutoPilot(controller, AutoPilotConfig(perf, tiers, score="roofline"))  # type: ignore[arg-type]
    pilot._sync_plan()
    assert pilot._boot is not None and pilot._boot_now() is None and pilot._boot_waits
    controller.pool_joined = {0, 1, 2, 3}
    boot = pilot._boot_now()
    assert boot is not None and boot.assignments[0] == Assignment(0, 2, "mixed", SHARED)
    # A cut written meanwhile (by hand, or by the loop) is not overridden by a late boot cut.
    pilot._boot = boot
    controller.current = Topology(
        epoch=2,
        instances=[TopologyInstance(instance_id=0, slots=[0, 1, 2, 3])],
        written_at=0.0,
        reason="by hand",
    )
    pilot._sync_plan()
    assert pilot._boot_now() is None and pilot._boot is None


async def test_the_controller_refuses_a_plan_that_does_not_cover_the_live_pool() -> None:
    # Slot 2's worker died: the pool is 0, 1, 3. A plan made for slots 0..2 (before the pool
    # changed) would put an instance on a dead worker; it is refused with what to do, and nothing
    # is written.
    controller = Controller("nats://127.0.0.1:1")  # never connects: the refusal comes first
    controller.last_seen = {s: time.monotonic() for s in (0, 1, 3)}
    controller.current = static_tp1([0, 1, 3], 3, "pool changed")
    target = reconfig.plan_topology(
        Plan([Assignment(0, 2, "mixed", SHARED), Assignment(2, 1, "mixed", SHARED)]), 4, "configurator"
    )
    result = await controller.switch_to(target)
    assert not result.ok and result.error is not None
    assert "live pool is [0, 1, 3]" in result.error.message
    assert controller.current.epoch == 3


@pytest.mark.parametrize(("tps", "placeholder"), [((1, 1, 1, 1), True), ((2, 1, 1), False)])
def test_the_loop_treats_the_controllers_boot_topology_as_a_placeholder(
    tps: tuple[int, ...], placeholder: bool
) -> None:
    # The controller's own TP-1-per-worker topology (at boot, or after the pool changed) was not
    # chosen by anyone: the loop may leave it in its first window. A cut made by hand or by an
    # earlier switch keeps the debounce.
    tiers = {"interactive": Tier("interactive", 1.0, 0.05, 0)}
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    starts = [sum(tps[:i]) for i in range(len(tps))]
    current = Topology(
        epoch=1,
        instances=[
            TopologyInstance(instance_id=i, slots=list(range(s, s + tp)))
            for i, (s, tp) in enumerate(zip(starts, tps, strict=True))
        ],
        written_at=0.0,
        reason="test",
    )
    controller = SimpleNamespace(log=structlog.get_logger(), current=current, pool_joined={0, 1, 2, 3})
    pilot = AutoPilot(controller, AutoPilotConfig(perf, tiers, score="roofline"))  # type: ignore[arg-type]
    assert pilot._sync_plan() is not None and pilot.loop is not None
    assert pilot.loop._placeholder is placeholder
