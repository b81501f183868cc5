"""The control loop's window decisions (``control_loop.ControlLoop``): when it re-cuts the pool,
the debounce and margins against noisy scores, the pooled cut on a near tie, and the calibration
of the roofline score. Its replay scorer against the simulator is in test_policies_replay.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import HARDWARE, PerfModel, model_spec
from nitsum_core.policy import control_loop
from nitsum_core.policy.control_loop import (
    POOLED_TIE,
    REPLAY_WINDOWS,
    Arrival,
    ControlLoop,
    InFlight,
    pooled_on_a_tie,
)
from nitsum_core.policy.plan import SHARED, Assignment, Plan, TierSet, plan_family
from test_policies import TIERS, shared_plan


def _loop(plan: Plan) -> ControlLoop:
    # An interactive TPOT of 4 ms: an 8B decode step at TP 1 on an H100 takes ~4.5 ms in the
    # roofline (16 GB of weights per step), at TP 2 ~2.8 ms -- only TP >= 2 can serve the tier.
    tiers = dict(TIERS, interactive=Tier("interactive", 0.3, 0.004, 0))
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    return ControlLoop(8, perf, tiers, plan, window_s=1.0, roles=("mixed",))


def test_control_loop_switches_when_demand_appears_and_holds_when_nothing_gains() -> None:
    loop = _loop(Plan([Assignment(s, 1, "mixed", SHARED) for s in range(8)]))
    assert loop.window(lambda _: 0.1).budgets is None  # no traffic: no budgets, no switch
    for _ in range(40):
        loop.arrival("interactive", 500, 200)
    d = loop.window(lambda _: 0.1)
    assert d.budgets == {"interactive": 0.0}  # TP 1 cannot serve it: every request best-effort
    assert d.demands["interactive"].arrival_rps == 20.0  # 40 arrivals over two windows seen (1 empty)
    assert d.switch_to is None  # debounce: one window is not enough to re-cut the pool
    for _ in range(40):
        loop.arrival("interactive", 500, 200)
    d = loop.window(lambda _: 0.1)
    # The 4 ms interactive TPOT is out of reach at TP 1: the loop proposes more TP.
    assert d.switch_to is not None and min(a.tp for a in d.switch_to.assignments) > 1
    loop.plan = d.switch_to
    for _ in range(40):
        loop.arrival("interactive", 500, 200)
    d = loop.window(lambda _: 0.1)
    assert d.switch_to is None  # already on the best plan: hysteresis holds
    assert d.budgets is not None and d.budgets["interactive"] > 0  # and the tier is feasible there


def test_control_loop_switches_only_when_the_gain_beats_the_pause() -> None:
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    only_background = Plan([Assignment(s, 1, "mixed", TierSet.of("background")) for s in range(8)])
    decisions = []
    for pause in (1e6, 0.1):
        loop = ControlLoop(8, perf, TIERS, only_background, window_s=1.0, roles=("mixed",))
        for _ in range(2):  # two windows: a cut must win twice running
            for _ in range(20):
                loop.arrival("interactive", 500, 200)
                loop.arrival("background", 500, 200)
                loop.finished("background", good=True)  # the current plan does what it predicts
            d = loop.window(lambda _, p=pause: p)
        decisions.append(d)
    # Current plan: only background is served (20 req/s); the proposal serves both (40 req/s).
    assert decisions[0].predicted_current_rps == pytest.approx(20.0)
    assert decisions[0].switch_to is None  # a pause that long costs more than the gain
    assert decisions[1].switch_to is not None  # a short one does not
    assert decisions[1].switch_to.predicted_goodput_rps == pytest.approx(40.0)
    assert decisions[0].budgets["interactive"] == 0.0  # not servable now: best-effort, not feasible


def test_a_plan_family_that_underdelivers_is_discounted_and_left() -> None:
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    tp2 = Plan([Assignment(s, 2, "mixed", SHARED) for s in range(0, 8, 2)])
    loop = ControlLoop(8, perf, TIERS, tp2, window_s=1.0, roles=("mixed",))
    loop.calibration["shared-tp1"] = 0.9  # TP 1 has run before and did about what it predicted
    switched = None
    for _ in range(8):
        for _ in range(30):
            loop.arrival("interactive", 500, 200)
            loop.finished("interactive", good=False)  # TP 2 serves nothing within SLO here
        d = loop.window(lambda _: 0.05)
        if d.switch_to is not None:
            switched = d.switch_to
            break
    assert loop.calibration["shared-tp2"] < 0.5
    assert switched is not None and {a.tp for a in switched.assignments} != {2}


def _scripted_switches(
    scores: list[dict[str, float]], pause_s: float = 0.01, placeholder: bool = False
) -> list[Plan | None]:
    """Each window's switch of a replay-scored loop whose replay returns, in window i,
    ``scores[i]`` for a plan family (50 for families not named); the current plan, shared TP 1,
    always scores 100. The loop applies each switch."""
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    this_window: dict[str, float] = {}

    def replay(plan: Plan, requests: list[Arrival], span: float, backlog: list[InFlight]) -> float:
        family = plan_family(plan.assignments)
        return 100.0 if family == "shared-tp1" else this_window.get(family, 50.0)

    loop = ControlLoop(
        8, perf, TIERS, shared_plan(1), window_s=1.0, roles=("mixed",), replay=replay, placeholder=placeholder
    )
    switches: list[Plan | None] = []
    for window_scores in scores:
        this_window.clear()
        this_window.update(window_scores)
        for _ in range(40):
            loop.arrival("interactive", 500, 200)
            loop.finished("interactive", good=False)  # not serving everything: candidates are scored
        switch = loop.window(lambda _: pause_s).switch_to
        if switch is not None:
            loop.plan = switch
        switches.append(switch)
    return switches


def test_a_gain_seen_two_windows_running_switches_even_when_the_leader_changes() -> None:
    # TP 2 and TP 4 both beat the current plan by ~50 % in both windows and trade the lead: the
    # loop switches in the second window, to that window's leader (waiting for one family to lead
    # twice running held a bad plan while every alternative beat it).
    switches = _scripted_switches(
        [{"shared-tp2": 150, "shared-tp4": 145}, {"shared-tp2": 145, "shared-tp4": 150}]
    )
    assert switches[0] is None  # one window is never enough
    assert switches[1] is not None and plan_family(switches[1].assignments) == "shared-tp4"


def test_a_boot_placeholder_is_left_in_the_first_window_a_cut_clearly_beats_it() -> None:
    # A cut the pool booted on by default (placeholder) is left as soon as a candidate beats it
    # by the switch margin; a cut that was chosen waits for the gain to show in a second window.
    # Once the loop has switched, the debounce applies again.
    clear_win = [{"shared-tp2": 150.0}] * 2
    assert [s is not None for s in _scripted_switches(clear_win, placeholder=True)][:1] == [True]
    assert [s is not None for s in _scripted_switches(clear_win)] == [False, True]
    # Away from the placeholder (now shared TP 2, scoring 50 by the script) the loop again needs
    # a gain seen two windows running before it switches back to TP 1's family.
    assert _scripted_switches([{"shared-tp2": 150.0}, {"shared-tp2": 50.0}], placeholder=True)[1] is None
    # A placeholder does not lower the margin: a 10 % gain does not leave it in the first window.
    assert _scripted_switches([{"shared-tp2": 110.0}], placeholder=True) == [None]


def test_a_placeholder_kept_through_a_whole_replay_span_needs_the_debounce_to_be_left() -> None:
    # Kept for REPLAY_WINDOWS windows in which nothing beat it, the boot cut has been weighed on
    # a full replay span and kept: a cut that wins one window only (a noisy replay) does not move
    # the loop off it any more, while the same win in the first window of the run does.
    quiet = [{}] * REPLAY_WINDOWS
    one_win = [{"shared-tp2": 150.0}]
    assert _scripted_switches(quiet + one_win, placeholder=True) == [None] * (REPLAY_WINDOWS + 1)
    assert _scripted_switches(one_win, placeholder=True)[0] is not None
    # A gain seen two windows running still moves it.
    assert _scripted_switches(quiet + one_win * 2, placeholder=True)[-1] is not None


# TP 2 interactive + six TP 1 instances, fenced one tier each or pooled for the two looser tiers.
FENCED = Plan(
    [Assignment(0, 2, "mixed", TierSet.of("interactive"))]
    + [Assignment(s, 1, "mixed", TierSet.of("agent" if s < 6 else "background")) for s in range(2, 8)]
)


POOLED = Plan(
    [Assignment(0, 2, "mixed", SHARED)]
    + [Assignment(s, 1, "mixed", TierSet.of("agent", "background")) for s in range(2, 8)]
)


def test_a_fenced_cut_loses_a_near_tie_to_the_pooled_cut_of_the_same_instances() -> None:
    shared_tp1 = Plan([Assignment(s, 1, "mixed", SHARED) for s in range(8)])  # other instances
    assert plan_family(FENCED.assignments) == "per-tier"
    candidates = [FENCED, POOLED, shared_tp1]

    def scored(scores: dict[int, float]) -> Callable[[Plan], float]:
        return lambda plan: scores[id(plan)]

    near = scored({id(FENCED): 100.0, id(POOLED): 100.0 * (1 - POOLED_TIE) + 0.01, id(shared_tp1): 99.5})
    assert pooled_on_a_tie(FENCED, candidates, near) is POOLED
    # A clear lead keeps the fenced cut; so does a near tie with a cut of other instances only.
    clear = scored({id(FENCED): 100.0, id(POOLED): 100.0 * (1 - POOLED_TIE) - 0.01, id(shared_tp1): 99.5})
    assert pooled_on_a_tie(FENCED, candidates, clear) is FENCED
    assert pooled_on_a_tie(FENCED, [FENCED, shared_tp1], near) is FENCED
    # A pooled winner is never traded for a fenced cut, however close.
    flipped = scored({id(FENCED): 99.9, id(POOLED): 100.0, id(shared_tp1): 0.0})
    assert pooled_on_a_tie(POOLED, candidates, flipped) is POOLED


@pytest.mark.parametrize(("fenced_score", "winner"), [(130.0, POOLED), (135.0, FENCED)])
def test_the_loop_switches_to_the_pooled_cut_where_the_fenced_one_leads_by_under_the_tie(
    monkeypatch: pytest.MonkeyPatch, fenced_score: float, winner: Plan
) -> None:
    # The loop on shared TP 1 (100) is offered the two cuts of the same instances; the pooled one
    # scores 128: 1.5 % behind a fenced 130 (a tie), 5 % behind a fenced 135 (not one).
    monkeypatch.setattr(control_loop, "candidate_plans", lambda *_, **__: [FENCED, POOLED])
    hybrid = plan_family(POOLED.assignments)
    switches = _scripted_switches([{"per-tier": fenced_score, hybrid: 128.0}] * 2)
    assert switches[0] is None  # one window is never enough
    assert switches[1] is not None and switches[1].assignments == winner.assignments


def test_a_gain_seen_in_one_window_only_does_not_switch() -> None:
    # TP 2 beats the current plan only in the second window (a burst): no switch until it has
    # beaten it two windows running.
    switches = _scripted_switches([{"shared-tp2": 101}, {"shared-tp2": 150}, {"shared-tp2": 150}])
    assert switches[:2] == [None, None]
    assert switches[2] is not None and plan_family(switches[2].assignments) == "shared-tp2"


def test_a_small_gain_is_confirmed_on_a_longer_replay_and_pays_its_pause_over_that_span() -> None:
    # TP 2 beats the current plan by 8 % in every window: below the 20 % switch margin, so the
    # loop waits until it has twice the replayed windows to confirm it on (10), and switches
    # then. 8 % of 100 req/s over one second would not pay a 0.1 s pause of the whole pool
    # (10 requests); over the 10 s the gain was measured on, it does.
    switches = _scripted_switches([{"shared-tp2": 108}] * 12, pause_s=0.1)
    assert switches[:9] == [None] * 9
    assert switches[9] is not None and plan_family(switches[9].assignments) == "shared-tp2"


def test_a_plan_meeting_every_target_is_not_rescored() -> None:
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    scored: list[Plan] = []

    def replay(plan: Plan, requests: list[Arrival], span: float, backlog: list[InFlight]) -> float:
        scored.append(plan)
        return len(requests) / span

    loop = ControlLoop(8, perf, TIERS, shared_plan(1), window_s=1.0, roles=("mixed",), replay=replay)
    for _ in range(3):  # every request that arrives finishes within its targets
        for _ in range(20):
            loop.arrival("interactive", 500, 200)
            loop.finished("interactive", good=True)
        assert loop.window(lambda _: 0.05).switch_to is None
    assert scored == []  # goodput already equals arrivals: nothing to score
    for _ in range(20):
        loop.arrival("interactive", 500, 200)
        loop.finished("interactive", good=False)  # now some miss
    loop.window(lambda _: 0.05)
    assert scored  # the candidates are replayed again


def test_the_first_windows_after_a_start_teach_calibration_nothing() -> None:
    # The pool starts empty and requests take seconds: the first windows finish few of those that
    # arrive. Learned then, the boot cut would look like it underdelivers and be left for nothing.
    from nitsum_core.policy.control_loop import BOOT_WINDOWS

    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    loop = ControlLoop(8, perf, TIERS, shared_plan(1), window_s=1.0, roles=("mixed",))  # roofline scoring
    for w in range(BOOT_WINDOWS + 3):
        for _ in range(40):
            loop.arrival("interactive", 500, 200)
            if w >= 3:  # nothing finishes in the first three seconds, then everything does
                loop.finished("interactive", good=True)
        assert loop.window(lambda _: 0.05).switch_to is None
        if w < BOOT_WINDOWS:
            assert loop.calibration == {}
    assert loop.calibration["shared-tp1"] == pytest.approx(1.0)


@pytest.mark.parametrize("long_gain, switches", [(1.10, True), (1.0, False)])
def test_a_small_gain_switches_only_if_a_longer_replay_confirms_it(long_gain: float, switches: bool) -> None:
    # TP 2 scores 10 % above the current TP 1 on the usual five-window replay: under the 20 %
    # margin. The loop replays both again on a longer span (every window seen, once that is twice
    # the usual replay, up to 15) and switches if the gain holds.
    perf = PerfModel(model_spec("llama-3.1-8b"), HARDWARE["h100-sxm"])
    spans: list[float] = []

    def replay(plan: Plan, requests: list[Arrival], span: float, backlog: list[InFlight]) -> float:
        spans.append(span)
        if all(a.tp == 1 for a in plan.assignments):
            return 100.0
        if all(a.tp == 2 for a in plan.assignments):
            return 100.0 * (1.10 if span <= 5.0 else long_gain)
        return 50.0

    loop = ControlLoop(8, perf, TIERS, shared_plan(1), window_s=1.0, roles=("mixed",), replay=replay)
    decisions = []
    for _ in range(17):
        for _ in range(20):
            loop.arrival("interactive", 500, 200)
            loop.finished("interactive", good=False)
        decisions.append(loop.window(lambda _: 0.05))
    # No longer replay before 10 windows have been seen; then every window with a small gain.
    assert all(d.switch_to is None for d in decisions[:9])
    assert 10.0 in spans and max(spans) == 15.0
    assert (decisions[9].switch_to is not None) == switches  # confirmed on the first longer replay
    switched = [d.switch_to for d in decisions if d.switch_to is not None]
    assert bool(switched) == switches
    if switches:
        assert all(a.tp == 2 for a in switched[0].assignments)
