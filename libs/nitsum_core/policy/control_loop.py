"""The controller's per-window decision (docs/architecture.md#controller-policy), shared by ``tp_controller`` and the simulator.

Pure and clock-free: the driver feeds it arrivals and finishes as they happen and calls
``window()`` once per control window. It estimates each tier's demand over the last few windows
and proposes a new cut only when it expects a clear gain that beats the switching cost. The
admission budgets it returns go to the router's ``LanePolicy``.

How a candidate plan is scored: with a ``replay`` scorer (``sim.replay.PlanReplay``, what both
drivers use), each candidate is run through the simulator for the next few windows, starting from
the requests in flight now and fed the last few windows' arrivals again at the times they arrived
(or, where the driver passes a ``forecast``, the requests it predicts for the next span),
repeating until every tier's TTFT deadlines have passed; its score is the requests that meet both
targets, per second, each tier counted over the arrivals whose outcome is decided by then (so work
a cut pushes past the span is charged: ``PlanReplay``).
The candidates of a window are independent replays: with a ``replay_map`` (a process pool's
``map``), they run side by side. Without a replay scorer, by the capacity model's roofline
prediction, which is cheap enough for any pool size but ranks plans less well; that score is
scaled by how each plan family actually did against it while it ran (per-family calibration).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from nitsum_core.config import Tier
from nitsum_core.perf.perf_model import PerfModel
from nitsum_core.policy.capacity import admission_caps, predicted_goodput
from nitsum_core.policy.cuts import candidate_plans
from nitsum_core.policy.plan import Assignment, Plan, Role, TierDemand, plan_family
from nitsum_core.policy.search import should_switch

WARMUP_WINDOWS = 2  # windows of a new plan before its goodput counts towards its calibration
REPLAY_WINDOWS = 5  # windows of requests a replay scores plans on
# Windows after the loop starts before the roofline's calibration learns anything. The pool fills
# from empty and a request takes seconds to finish, so the first windows finish far fewer than
# arrive: learned then, the boot plan's factor would read ~0.5.
BOOT_WINDOWS = REPLAY_WINDOWS + 1
# The gain a proposed cut must promise over the current one before the loop switches. Replay
# scores of a few seconds of bursty arrivals differ by 10-20 % between near-equal cuts, and the
# best of several noisy scores is biased upwards: at a 10 % margin the loop left the best static
# cut for ones that then did worse (70B at 40 req/s: 18.0 vs 21.2 staying put).
SWITCH_MARGIN = 0.2
# A cut that wins by less than SWITCH_MARGIN but at least CONFIRM_MARGIN is replayed again, with
# the current one, on the last CONFIRM_WINDOWS windows of arrivals (as many as have been seen, once
# that is at least twice REPLAY_WINDOWS): a longer sample, whose score moves less with one burst.
# The loop switches if that replay confirms the gain.
CONFIRM_MARGIN = 0.05
CONFIRM_WINDOWS = 15
# A per-tier cut that scores within this fraction of a pooled cut of the same instances (the same
# starts, degrees and roles; some instances serving several tiers) loses the tie. The replay
# scores the last few seconds only; an instance serving several tiers absorbs the next shift of the
# mix, a fenced one cannot. A fenced cut ahead by 1 % at 10 s held 8B at 1x saturation for the rest
# of the run, 1.7 % below the hybrid of the same instances (docs/simulator.md).
POOLED_TIE = 0.02


class Arrival(NamedTuple):
    tier: str
    prompt: int
    output: int  # actual output length where known (simulator), else the router's estimate
    # Seconds from the start of its window (as given to ``ControlLoop.arrival``); in the requests
    # a replay scores, from the start of the replayed span. None where the driver does not know.
    at_s: float | None = None


class InFlight(NamedTuple):
    """A request still in the pool when a window closes: what a warm-started replay starts from."""

    tier: str
    prompt: int
    output: int  # as for ``Arrival``
    age_s: float  # seconds since it arrived
    ttft_s: float | None = None  # its time to first token; None while it waits for it
    generated: int = 0  # output tokens produced so far


# A plan's expected goodput (req/s) on these requests, which arrived over this many seconds,
# starting from a pool that holds these in-flight requests.
ReplayScorer = Callable[[Plan, list[Arrival], float, list[InFlight]], float]
# The requests a replay scores plans on and the seconds they span, in place of the recent windows'
# arrivals: a forecast of the next span. The simulator's ``foresight_s`` passes the real future
# arrivals, to bound what any forecast could gain (benchmarks/dynamic_headroom.py --foresight).
Forecast = Callable[[], tuple[list[Arrival], float]]
# How the candidates' replays are run: ``map`` (one after another) or a process pool's ``map``.
ReplayMap = Callable[[Callable[[Plan], float], Iterable[Plan]], Iterator[float]]


@dataclass(frozen=True)
class _ReplayOf:
    """One window's replay with every input but the plan bound: picklable, for a process pool."""

    replay: ReplayScorer
    requests: list[Arrival]
    span_s: float
    backlog: list[InFlight]

    def __call__(self, plan: Plan) -> float:
        return self.replay(plan, self.requests, self.span_s, self.backlog)


@dataclass
class Decision:
    """One window's outcome: the demand seen, the admission budgets, and maybe a new plan."""

    demands: dict[str, TierDemand]
    budgets: dict[str, float] | None  # None: no demand this window, keep the old budgets
    switch_to: Plan | None = None  # its predicted_goodput_rps: the score it won with
    pause_s: float = 0.0
    predicted_current_rps: float = 0.0  # the current plan's score (dynamic loops)


def _roofline_score(plan: Plan) -> float:
    return plan.predicted_goodput_rps


def _layout(plan: Plan) -> list[tuple[int, int, str]]:
    return [(a.start, a.tp, a.role) for a in plan.assignments]


def pooled_on_a_tie(best: Plan, candidates: Sequence[Plan], score: Callable[[Plan], float]) -> Plan:
    """``best``, or where it is a per-tier cut, the best-scoring pooled cut of the same instances
    if that scores within ``POOLED_TIE`` of it (see ``POOLED_TIE``)."""
    if not plan_family(best.assignments).startswith("per-tier"):
        return best
    layout = _layout(best)
    same = [
        c
        for c in candidates
        if not plan_family(c.assignments).startswith("per-tier") and _layout(c) == layout
    ]
    if not same:
        return best
    pooled = max(same, key=score)
    return pooled if score(pooled) >= (1 - POOLED_TIE) * score(best) else best


class ControlLoop:
    def __init__(
        self,
        pool: int,
        perf: PerfModel,
        tiers: dict[str, Tier],
        plan: Plan,
        window_s: float = 1.0,
        dynamic: bool = True,
        history: int = 3,
        roles: Sequence[Role] = ("mixed", "prefill", "decode"),
        replay: ReplayScorer | None = None,
        replay_windows: int = REPLAY_WINDOWS,
        forecast: Forecast | None = None,
        replay_map: ReplayMap = map,
        confirm_windows: int = CONFIRM_WINDOWS,
        placeholder: bool = False,
        fits: Callable[[Plan], bool] | None = None,
    ) -> None:
        """``placeholder``: ``plan`` is a default the pool booted on, not a cut anyone chose (the
        tier file's boot cut, the controller's TP 1 per worker), so a switch away
        from it within the first ``replay_windows`` windows skips the debounce.

        ``fits``: which cuts the driver can apply (None: every aligned cut of the pool). The
        serving path passes it (a gap in the live slots, slots outside the TP world): a cut it
        cannot place is then not scored at all, rather than win a window and be refused
        (``reconfig.placement_error``)."""
        self.pool, self.perf, self.tiers = pool, perf, tiers
        self.plan, self.window_s, self.dynamic, self.roles = plan, window_s, dynamic, roles
        self.replay, self.forecast, self.replay_map = replay, forecast, replay_map
        # Demand over the last ``history`` windows: one second of a bursty trace is a noisy
        # estimate, and the controller should follow the load, not its noise. Replay scores a plan
        # on ``replay_windows`` of them (more: a few seconds rank plans by that burst, and every
        # re-cut on noise pays a pause); one deque keeps the longer of the two.
        self.history, self.replay_windows, self.confirm_windows = history, replay_windows, confirm_windows
        self._recent: deque[list[Arrival]] = deque(maxlen=max(history, replay_windows, confirm_windows))
        self._outcomes: deque[tuple[int, int, int]] = deque(maxlen=history)  # (arrived, finished, good)
        self.arrivals: list[Arrival] = []  # this window's, in arrival order
        self._in_flight: list[InFlight] = []  # the pool's backlog as this window closes
        self._finished: dict[str, int] = {}
        self._good = 0  # requests finished within both targets this window
        # Plan family -> EWMA of observed goodput / predicted goodput while it ran (roofline
        # scoring only). The capacity model is a roofline estimate; each family's own track record
        # corrects its predictions (a family never run gets the mean factor of those that have).
        self.calibration: dict[str, float] = {}
        self._last_prediction: float | None = None  # for the current plan, made a window ago
        # Plan families whose best cut beat the current plan by CONFIRM_MARGIN in last window's
        # scoring (debounce: a switch needs the gain seen in two windows running).
        self._beat_last: set[str] = set()
        self._family_seen: str | None = None
        self._warm = 0  # windows the current plan family has run
        self._windows_run = 0
        self._placeholder = placeholder
        self.fits = fits

    def arrival(self, tier: str, prompt: int, output: int, offset_s: float | None = None) -> None:
        """One request arrived, ``offset_s`` seconds into this window (None: not known)."""
        at = None if offset_s is None else min(max(0.0, offset_s), self.window_s)
        self.arrivals.append(Arrival(tier, prompt, output, at))

    def in_flight(self, request: InFlight) -> None:
        """A request still queued or decoding as this window closes (reported just before ``window``)."""
        self._in_flight.append(request)

    def finished(self, tier: str, good: bool) -> None:
        self._finished[tier] = self._finished.get(tier, 0) + 1
        self._good += good

    def demands(self, arrivals: list[Arrival], spans: int = 1) -> dict[str, TierDemand]:
        out = {}
        w = self.window_s * spans
        for name, tier in self.tiers.items():
            rs = [r for r in arrivals if r.tier == name]
            if not rs:
                continue
            out[name] = TierDemand(
                tier,
                arrival_rps=len(rs) / w,
                mean_prompt=sum(r.prompt for r in rs) / len(rs),
                mean_output=sum(r.output for r in rs) / len(rs),
                served_rps=self._finished.get(name, 0) / self.window_s,
            )
        return out

    def window(self, switch_cost: Callable[[Plan], float], decide: bool = True) -> Decision:
        """Close the window: demand, budgets for the current plan, and a switch if it pays.

        The driver applies ``switch_to`` and then sets ``plan`` (a failed switch keeps the old one).
        ``decide=False`` closes it without scoring any cut: a driver that has several windows'
        traffic to hand over at once (its last decision ran long) closes all but the last this
        way, so that each window keeps its own length and arrival times.
        """
        window, self.arrivals = self.arrivals, []
        backlog, self._in_flight = self._in_flight, []  # what this window's replays start from
        self._recent.append(window)
        family = plan_family(self.plan.assignments)
        # Requests finish windows after they arrive: right after a (re)start or a change of plan
        # family, the goodput seen lags the plan's real rate, so those first windows teach nothing.
        if family != self._family_seen:  # re-cuts within a family keep learning about it
            self._family_seen, self._warm = family, 0
        self._warm += 1
        self._windows_run += 1
        if self._windows_run > self.replay_windows:
            # A placeholder kept through a whole replay span has been weighed against every
            # candidate on that span and kept: it is now a cut the loop chose, and leaving it needs
            # the debounce like any other. Left undebounced, one noisy replay moved 8B off its
            # best cut (uniform TP 1 at a 10 ms target) at 12 s and back at 23 s: 375.5 -> 355.5
            # req/s (docs/simulator.md).
            self._placeholder = False
        # The roofline's calibration compares this window's goodput with last window's prediction
        # (a replay needs no calibration: see ``_replay_scores``).
        predicted, self._last_prediction = self._last_prediction, None
        learning = self.replay is None and self._warm > WARMUP_WINDOWS and self._windows_run > BOOT_WINDOWS
        if learning and predicted:
            seen = min(2.0, (self._good / self.window_s) / predicted)
            prev = self.calibration.get(family)
            self.calibration[family] = seen if prev is None else 0.7 * prev + 0.3 * seen
        self._outcomes.append((len(window), sum(self._finished.values()), self._good))
        self._good = 0
        recent = list(self._recent)[-self.history :]
        demands = self.demands([r for w in recent for r in w], len(recent))
        self._finished.clear()
        if not demands:
            return Decision(demands, None)
        decision = Decision(demands, admission_caps(self.perf, self.plan.assignments, demands))
        current = predicted_goodput(self.perf, self.plan.assignments, demands)
        self._last_prediction = current  # what the roofline's calibration compares next window with
        decision.predicted_current_rps = current
        # No re-cut in a window without arrivals, nor in one the driver closes without a decision.
        if not self.dynamic or not window or not decide:
            return decision
        if self._serving_everything():
            # Goodput cannot exceed arrivals: a plan that meets every target for all that arrives
            # has nothing to gain from a re-cut, so the candidates are not scored (at light load,
            # most windows; a replay of every candidate costs a good part of a second).
            self._beat_last = set()
            return decision

        candidates = candidate_plans(self.pool, self.perf, demands, self.roles, tiers=self.tiers)
        if self.fits is not None:
            candidates = [c for c in candidates if self.fits(c)]
            if not candidates:
                self._beat_last = set()
                return decision
        now = Plan(self.plan.assignments, current)
        # ``span_s``: the seconds of arrivals the scores were measured on (for the roofline, the
        # demand it predicts from).
        if self.replay is not None:
            expected, span_s = self._replay_scores(backlog, [now, *candidates])
        else:
            expected, span_s = self._calibrated(family, _roofline_score), self.window_s * len(recent)
        now_rps = expected(now)
        decision.predicted_current_rps = now_rps
        best = pooled_on_a_tie(max(candidates, key=expected), candidates, expected)
        proposed = Plan(best.assignments, expected(best))
        # Debounce: the proposed cut's family must also have beaten the current plan last window.
        # One second of a bursty trace often favours a plan the next second does not, and every
        # switch pauses the moved slots. It is the family that must have won, not the exact cut: a
        # per-tier cut changes shape with every window's demand. Nor need it have been last
        # window's best: near-equal families trade the lead from window to window, and asking for
        # the same winner twice running held a bad boot plan for windows while every one of them
        # beat it by 40 % (14B at 2x saturation). A boot placeholder
        # has no such standing in its first replay span: it was never the best of anything, and
        # every window on it is spent on a cut that may not serve a tier at all (the first
        # window's switch: 8B at 1x 173.3 -> 178.4 req/s, relaxed 14B at 2x 189.3 -> 191.9).
        beat_last, self._beat_last = (
            self._beat_last,
            {plan_family(c.assignments) for c in candidates if expected(c) > now_rps * (1 + CONFIRM_MARGIN)},
        )
        if proposed.assignments == self.plan.assignments or (
            plan_family(proposed.assignments) not in beat_last and not self._placeholder
        ):
            return decision
        pause = switch_cost(proposed)
        # The gain must pay for the pause within the span it was measured over (the replayed
        # windows): it is expected to last that long, not one window. Paid back over one window, a
        # pause of over 0.065 s outweighed the 5-6 % gain five confirming replays in a row gave
        # another cut (8B at 2x saturation).
        if should_switch(now_rps, proposed.predicted_goodput_rps, pause, span_s, SWITCH_MARGIN):
            decision.switch_to, decision.pause_s = proposed, pause
            self._beat_last = set()  # measured against the plan being left
        elif self._confirmable() and should_switch(
            now_rps, proposed.predicted_goodput_rps, pause, span_s, CONFIRM_MARGIN
        ):
            longer, longer_s = self._replay_scores(backlog, [now, proposed], self.confirm_windows)
            if should_switch(longer(now), longer(proposed), pause, longer_s, CONFIRM_MARGIN):
                decision.switch_to, decision.pause_s = Plan(proposed.assignments, longer(proposed)), pause
                self._beat_last = set()
        if decision.switch_to is not None:
            self._placeholder = False  # the next cut is one the loop chose
        return decision

    def _confirmable(self) -> bool:
        """Whether a small gain can be checked on a longer replay: replay scoring of the recent
        past (not a forecast), with at least twice the windows a replay scores seen."""
        return (
            self.replay is not None
            and self.forecast is None
            and self.confirm_windows > self.replay_windows
            and len(self._recent) >= 2 * self.replay_windows
        )

    def _serving_everything(self) -> bool:
        """Every request that finished over the recent windows met both targets, and as many
        finished as arrived, up to Poisson noise (three standard deviations): a plan falling
        behind finishes far fewer and is not 'serving everything'."""
        arrived, finished, good = (sum(o[i] for o in self._outcomes) for i in range(3))
        return finished > 0 and good == finished and finished >= arrived - 3 * math.sqrt(arrived)

    def _replay_scores(
        self, backlog: list[InFlight], plans: list[Plan], windows: int | None = None
    ) -> tuple[Callable[[Plan], float], float]:
        """Each of ``plans``' goodput over the next span, simulated (each distinct cut once, all
        through ``replay_map``), and the span's length in seconds.

        The span is the last ``replay_windows`` of arrivals replayed, or the ``forecast`` where the
        driver gives one. The replay starts from ``backlog``, what the driver reported in flight,
        and counts what meets both targets (``PlanReplay`` runs on until it is decided): a plan
        that is falling behind carries its backlog into its own replay and scores what it will
        really deliver. (Replays that started from an empty pool and ran every request to its end
        scored such a plan as if it kept up, by up to 2x, and needed a per-family calibration that
        then stuck to a family after one bad stint.)
        """
        assert self.replay is not None
        replay = self.replay
        if self.forecast is not None:
            requests, span = self.forecast()
        else:
            replayed = list(self._recent)[-(windows or self.replay_windows) :]
            # Arrival times move from their window's start to the span's, so the replay sees the
            # recent bursts where they happened.
            requests = [
                r if r.at_s is None else r._replace(at_s=i * self.window_s + r.at_s)
                for i, w in enumerate(replayed)
                for r in w
            ]
            span = self.window_s * len(replayed)
        distinct = {tuple(plan.assignments): plan for plan in plans}
        scores = self.replay_map(_ReplayOf(replay, requests, span, backlog), distinct.values())
        seen: dict[tuple[Assignment, ...], float] = dict(zip(distinct, scores, strict=True))
        return (lambda plan: seen[tuple(plan.assignments)]), span

    def _calibrated(self, family: str, raw: Callable[[Plan], float]) -> Callable[[Plan], float]:
        """Each plan's roofline score times its family's observed / predicted factor: the roofline
        over-predicts by a different factor per family (docs/simulator.md)."""
        # A family never run is assumed as far off as the *other* families run so far are on
        # average: the error is largely shared, and an optimistic 1.0 would send the loop through
        # every family ranked low, one costly exploration at a time. The current family's own
        # factor is left out, or a bad first family would look like the norm and the loop would
        # never leave it.
        others = [c for f, c in self.calibration.items() if f != family]
        prior = sum(others) / len(others) if others else 1.0

        def expected(plan: Plan) -> float:
            return raw(plan) * self.calibration.get(plan_family(plan.assignments), prior)

        return expected
