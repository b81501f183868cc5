"""The pure policies the router, the controller and the simulator share: routing (``LanePolicy``,
the fallback rule), the plan vocabulary (typed tier sets, tier-only switches), the goodput rule,
and the plan <-> topology mapping the controller uses. The control loop's decisions are in
test_policies_loop.py, its replay scorer in test_policies_replay.py."""

from __future__ import annotations

import pickle

import pytest
from nitsum_core.config import Tier, load_tiers
from nitsum_core.perf.perf_model import HARDWARE, PerfModel, model_spec
from nitsum_core.policy.capacity import admission_caps, predicted_goodput
from nitsum_core.policy.cuts import hybrid_plans, tight_and_rest
from nitsum_core.policy.goodput import RequestRecord, mean_tpot, meets_slo, meets_targets
from nitsum_core.policy.plan import (
    SHARED,
    Assignment,
    Plan,
    TierDemand,
    TierSet,
    only_tiers_change,
    plan_family,
    serves,
)
from nitsum_core.policy.reconfig import plan_topology, topology_plan
from nitsum_core.policy.routing import Candidate, Lane, LanePolicy, leaders_for, route_targets
from nitsum_core.wire.codec import decode, encode
from nitsum_core.wire.cut import Topology

TIERS = {
    "interactive": Tier("interactive", 0.3, 0.012, 0),
    "agent": Tier("agent", 1.0, 0.03, 1),
    "background": Tier("background", 10.0, 0.1, 2),
}


def shared_plan(tp: int) -> Plan:
    """Eight slots cut into TP-``tp`` instances, each serving every tier."""
    return Plan([Assignment(s, tp, "mixed", SHARED) for s in range(0, 8, tp)])


TIERS = {
    "interactive": Tier("interactive", 0.3, 0.012, 0),
    "agent": Tier("agent", 1.0, 0.03, 1),
    "background": Tier("background", 10.0, 0.1, 2),
}


def test_lanes_admit_up_to_the_budget_then_best_effort_and_background_apart() -> None:
    lanes = LanePolicy(TIERS, window_s=1.0)
    # No budget yet: nothing is limited; the lowest-priority tier always queues as background.
    assert [lanes.classify("interactive") for _ in range(5)] == [Lane.FEASIBLE] * 5
    assert lanes.classify("background") == Lane.BACKGROUND
    lanes.new_window({"interactive": 2.0})
    got = [lanes.classify("interactive") for _ in range(4)]
    assert got == [Lane.FEASIBLE, Lane.FEASIBLE, Lane.BEST_EFFORT, Lane.BEST_EFFORT]
    assert lanes.classify("agent") == Lane.FEASIBLE  # a tier without a budget is not limited
    lanes.new_window(None)  # a window without demand keeps the budget and resets the count
    assert lanes.classify("interactive") == Lane.FEASIBLE


def test_budgets_shrink_while_feasible_requests_miss_ttft_and_regrow_after() -> None:
    lanes = LanePolicy(TIERS)
    lanes.new_window({"interactive": 100.0})
    for _ in range(20):
        lanes.first_token(Lane.FEASIBLE, within_ttft=False)
    lanes.new_window({"interactive": 100.0})
    assert lanes.budgets["interactive"] == 80.0  # multiplicative decrease
    for _ in range(20):
        lanes.first_token(Lane.FEASIBLE, within_ttft=True)
    lanes.first_token(Lane.BEST_EFFORT, within_ttft=False)  # best-effort misses are expected
    lanes.new_window({"interactive": 100.0})
    assert lanes.budgets["interactive"] == pytest.approx(85.0)  # additive increase


def test_pick_least_loaded_for_feasible_round_robin_for_best_effort() -> None:
    lanes = LanePolicy(TIERS)
    cands = [Candidate(0, 5), Candidate(2, 1), Candidate(4, 1)]
    assert lanes.pick(cands, Lane.FEASIBLE) == 2  # least loaded, lowest slot on ties
    assert [lanes.pick(cands, Lane.BEST_EFFORT) for _ in range(4)] == [0, 2, 4, 0]
    assert lanes.pick([], Lane.FEASIBLE) is None


def test_plan_topology_round_trip() -> None:
    plan = Plan(
        [
            Assignment(0, 2, "mixed", TierSet.of("interactive")),
            Assignment(2, 1, "mixed", SHARED),
            Assignment(3, 1, "prefill", TierSet.of("agent")),
            Assignment(4, 1, "mixed", TierSet.of("agent", "background")),
        ]
    )
    topo = plan_topology(plan, epoch=7, reason="test")
    assert [i.slots for i in topo.instances] == [[0, 1], [2], [3], [4]]
    assert [i.tiers for i in topo.instances] == [["interactive"], [], ["agent"], ["agent", "background"]]
    assert topology_plan(topo).assignments == plan.assignments


def test_a_tier_without_an_instance_goes_best_effort_anywhere_not_refused() -> None:
    plan = Plan(
        [
            Assignment(0, 2, "mixed", TierSet.of("interactive")),
            Assignment(2, 1, "mixed", TierSet.of("agent")),
            Assignment(3, 1, "decode", TierSet.of("agent")),
        ]
    )
    topo = plan_topology(plan, epoch=1, reason="test")
    assert leaders_for(topo, "interactive", {0, 1, 2, 3}) == ([0], False)
    # Background has no instance in this cut: any mixed/prefill leader, flagged as a fallback.
    assert leaders_for(topo, "background", {0, 1, 2, 3}) == ([0, 2], True)
    assert leaders_for(topo, "background", set()) == ([], False)


def test_tier_sets_are_typed_and_describe_as_before() -> None:
    both = TierSet.of("background", "agent")
    assert str(SHARED) == "*" and str(both) == "agent+background" and str(TierSet.of("agent")) == "agent"
    assert serves(SHARED, "anything") and serves(both, "agent") and not serves(both, "interactive")
    assert both == TierSet(frozenset({"agent", "background"})) and hash(both) == hash(
        TierSet.of("agent", "background")
    )
    assert both.sole is None and both.several and not both.every
    assert TierSet.of("agent").sole == "agent" and SHARED.every and SHARED.sole is None
    assert both.to_wire() == ["agent", "background"] and SHARED.to_wire() == []
    assert TierSet.from_wire([]) == SHARED and TierSet.from_wire(["background", "agent"]) == both
    assert pickle.loads(pickle.dumps(both)) == both  # replays run in a process pool
    with pytest.raises(TypeError):
        TierSet("agent")  # type: ignore[arg-type]  # a string is one name, not a set of letters
    with pytest.raises(ValueError):
        TierSet.of()
    with pytest.raises(TypeError):
        Assignment(0, 1, "mixed", "*")  # type: ignore[arg-type]  # no encoded strings


def test_tier_names_may_hold_any_character(tmp_path) -> None:  # noqa: ANN001
    # Tier sets were once strings ("*" for every tier, names joined by "+"), so such names were
    # refused; typed, a tier may be called anything.
    odd = "a+b*c"
    f = tmp_path / "t.toml"
    f.write_text(f'[tiers."{odd}"]\nttft_s = 1.0\ntpot_s = 0.05\n[tiers."*"]\nttft_s = 10\ntpot_s = 0.1\n')
    tiers = load_tiers(f)
    assert set(tiers) == {odd, "*"}
    tight, rest = tight_and_rest({name: t.tpot_s for name, t in tiers.items()})
    assert (tight, rest) == (odd, TierSet.of("*"))
    assert not serves(rest, odd) and serves(rest, "*") and not rest.every
    plan = Plan([Assignment(0, 1, "mixed", TierSet.of(odd)), Assignment(1, 1, "mixed", rest)])
    topo = plan_topology(plan, epoch=1, reason="test")
    assert [i.tiers for i in topo.instances] == [[odd], ["*"]]
    decoded = decode(Topology, encode(topo))
    assert topology_plan(decoded).assignments == plan.assignments
    assert leaders_for(decoded, odd, {0, 1}) == ([0], False)
    assert leaders_for(decoded, "*", {0, 1}) == ([1], False)
    # The capacity model budgets each by name.
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    demands = {name: TierDemand(t, 5.0, 500, 100) for name, t in tiers.items()}
    caps = admission_caps(perf, plan.assignments, demands)
    assert set(caps) == {odd, "*"} and caps[odd] > 0 and caps["*"] > 0
    assert predicted_goodput(perf, plan.assignments, demands) > 0
    assert all(not p.assignments[-1].tier.every for p in hybrid_plans(8, perf, demands))
    assert plan_family(plan.assignments) == "per-tier"


def test_only_a_tier_change_is_a_free_switch() -> None:
    tp1 = shared_plan(1).assignments
    fenced = [Assignment(s, 1, "mixed", TierSet.of("agent")) for s in range(8)]
    assert only_tiers_change(tp1, fenced) and only_tiers_change(tp1, tp1)
    assert not only_tiers_change(tp1, shared_plan(2).assignments)
    prefill = [Assignment(0, 1, "prefill", SHARED), *tp1[1:]]
    assert not only_tiers_change(tp1, prefill)  # a role change re-forms the instance


def test_route_targets_falls_back_to_every_taker_only_where_no_instance_serves_the_tier() -> None:
    instances = [("mixed", TierSet.of("agent")), ("decode", TierSet.of("interactive")), ("prefill", SHARED)]

    def takes(i: tuple[str, TierSet]) -> bool:
        return i[0] in ("mixed", "prefill")

    def route(tier: str) -> tuple[list[int], bool]:
        got, fallback = route_targets(instances, takes, lambda i: serves(i[1], tier))
        return [instances.index(i) for i in got], fallback

    assert route("agent") == ([0, 2], False)
    assert route("interactive") == ([2], False)  # a decode instance takes no new requests
    only = [("mixed", TierSet.of("agent")), ("prefill", TierSet.of("agent"))]
    assert route_targets(only, takes, lambda i: serves(i[1], "background")) == (only, True)
    assert route_targets([], takes, lambda i: True) == ([], False)


def test_meeting_both_targets_is_one_rule() -> None:
    tier = Tier("chat", 1.0, 0.05, 0)
    assert mean_tpot(2.0, 4.0, 41) == pytest.approx(0.05) and mean_tpot(2.0, 2.0, 1) == 0.0
    assert meets_targets(1.0, 0.05, tier) and not meets_targets(1.01, 0.0, tier)
    assert not meets_targets(0.5, 0.051, tier)
    assert meets_slo(RequestRecord("chat", 0.0, 10, 41, 1.0, mean_tpot(2.0, 4.0, 41)), tier)
    # One output token has no TPOT: whatever was recorded, only the TTFT counts.
    assert meets_slo(RequestRecord("chat", 0.0, 10, 1, 0.9, 9.0), tier)
    assert not meets_slo(RequestRecord("chat", 0.0, 10, 0, None, None, error="x"), tier)


def test_reconfig_needs_only_the_plan_vocabulary() -> None:
    # The workers and the kv_broker import reconfig; the capacity model and the searches are the
    # controller's and the simulator's business.
    import subprocess
    import sys

    code = (
        "import sys\nimport nitsum_core.policy.reconfig\n"
        "print(sorted(m for m in sys.modules if m.startswith('nitsum_core.policy.')))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(
        ["nitsum_core.policy.kv_cache", "nitsum_core.policy.plan", "nitsum_core.policy.reconfig"]
    )
