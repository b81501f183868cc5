"""Continuous-batching scheduler: pure Python, clock-free, shared by the engine and tests.

Each ``schedule()`` call plans one engine step: every running sequence past its prompt decodes
one token, and prompt chunks (running ones and newly admitted waiting ones) share the rest of a
token budget in rank order: priority (the router's lane), then TTFT deadline, then arrival. New
requests therefore join the running batch at the next step boundary and finished ones leave it
as soon as they finish.

A prompt that can no longer meet its TTFT deadline (``misses_ttft``: its own remaining prefill
and that of the on-time prompts ranked ahead of it do not fit before it) ranks after every prompt
that still can: it cannot count toward goodput any more, and ahead of them it would make them
miss too. Where a longer prompt ahead of it has to give way for it to fit, that one goes instead.
Late prompts still run, after the others, so nothing is dropped.

SLO-sized steps (DESIGN §1: "sized to stay SLO-safe"). Given a ``StepTimePredictor`` (the engine
learns one from its own steps), a step's prompt tokens are cut so that the step is predicted to
take no longer than the tightest bound of the sequences decoding in it: their tier's TPOT target,
less the time any of them is behind it, paid back over ``TPOT_REPAY_TOKENS`` tokens
(``tpot_step_bound``). A prompt chunk never shrinks below ``min_prefill_chunk`` tokens, so
prompts always progress. Without a predictor, or without TPOT targets, steps take the whole
token budget. Seats are not gated by TPOT here, unlike the simulator: on the CPU stack that cost
6 % of goodput, as interactive prompts waited for seats and missed their TTFT
(docs/simulator.md, round 15).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from nitsum_core.policy.kv_cache import BlockManager


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request inside a worker: prompt + generated ids and how many of them have KV cached."""

    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    priority: int = 0
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    arrival: int = 0
    # Clock time (the ``now`` passed to ``schedule``) its first token is due by; None: no target.
    ttft_deadline: float | None = None
    late: bool = False  # sure to miss ttft_deadline: ranked after every prompt that can still meet its own
    tpot_s: float | None = None  # its tier's mean time-per-output-token target; None: no target
    first_token_at: float | None = None  # clock time (as ``now``) its first output token came out
    max_tokens: int | None = None  # most output tokens it may generate (bounds how long it can repay)
    extra: dict = field(default_factory=dict)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class ScheduledSeq:
    """``seq`` runs ``num_new`` tokens this step, starting at position ``start``."""

    seq: Sequence
    start: int
    num_new: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens, so a new token is sampled."""
        return self.start + self.num_new == len(self.seq.token_ids)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    max_model_len: int = 2048
    # Smallest prompt chunk a TPOT bound may cut a step to: prompts always make progress, even
    # beside a batch whose decode steps alone take the whole bound.
    min_prefill_chunk: int = 32


# Predicted seconds of a step that prefills ``prefill_tokens`` prompt tokens and decodes
# ``decodes`` sequences holding ``decode_ctx_tokens`` tokens of KV between them; None while the
# predictor does not know yet (then steps are not sized by TPOT).
StepTimePredictor = Callable[[int, int, int], float | None]


# Tokens over which a sequence that fell behind its TPOT target (a re-cut's pause, a long step)
# pays the time back: each of its next steps is bounded below the target by debt / this. Short
# enough that a request ending sooner than expected has mostly paid, long enough that the bound
# stays above a decode-only step (a 60 ms pause at a 12 ms target: 10.1 ms steps).
TPOT_REPAY_TOKENS = 32


def tpot_step_bound(tpot_s: float, generated: int, since_first_s: float, horizon: int) -> float | None:
    """The longest step that keeps a sequence on course for its mean-TPOT target: one that has
    ``generated`` tokens out, the first ``since_first_s`` seconds before the next step starts,
    and pays back any time it is behind over its next ``horizon`` tokens. Never above
    ``tpot_s`` (time it is ahead is not spent); None when it has no tokens to go."""
    if horizon <= 0 or generated < 1:
        return None
    behind_s = since_first_s - tpot_s * (generated - 1)
    return tpot_s - max(0.0, behind_s) / horizon


def misses_ttft(now: float, deadline: float, prefill_left_s: float) -> bool:
    """True when a prompt cannot produce its first token by ``deadline``: ``prefill_left_s`` is
    what it still waits for from ``now`` (its own remaining prefill, plus the prompts that
    prefill before it where the caller counts them)."""
    return now + prefill_left_s > deadline


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        # Seconds one prompt token takes to prefill, for ``misses_ttft``: the engine keeps it
        # measured; 0 (unknown) makes the rule a plain deadline check.
        self.prefill_s_per_token = 0.0
        # Step-time prediction for SLO-sized steps (module docstring); None: fixed token budget.
        self.step_time: StepTimePredictor | None = None
        self._waiting: list[tuple[tuple[int, int, float, int], Sequence]] = []
        self.running: list[Sequence] = []
        self._counter = itertools.count()
        self.num_preempted = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._counter)
        seq.status = SeqStatus.WAITING
        heapq.heappush(self._waiting, (_rank(seq), seq))

    def add_running(self, seq: Sequence) -> None:
        """Join the running batch directly: the sequence arrives with its KV blocks already filled."""
        seq.arrival = next(self._counter)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def waiting_in_order(self) -> list[Sequence]:
        """The waiting queue in admission order (rank: late last, then priority, deadline, arrival)."""
        return [seq for _, seq in sorted(self._waiting, key=lambda e: e[0])]

    def remove(self, seq_id: str) -> Sequence | None:
        """Drop a sequence wherever it is (abort or finish) and free its blocks."""
        self.blocks.release(seq_id)
        for i, seq in enumerate(self.running):
            if seq.seq_id == seq_id:
                seq.status = SeqStatus.FINISHED
                return self.running.pop(i)
        for i, (_, seq) in enumerate(self._waiting):
            if seq.seq_id == seq_id:
                self._waiting.pop(i)
                heapq.heapify(self._waiting)
                seq.status = SeqStatus.FINISHED
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        # Recompute preemption: the KV is dropped and the sequence re-prefills later with the
        # tokens it already generated, so no output is lost or repeated.
        self.blocks.release(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        heapq.heappush(self._waiting, (_rank(seq), seq))
        self.num_preempted += 1

    def _mark_late(self, now: float) -> None:
        """Flag the prompts that can no longer meet their TTFT deadline (once late, always late).

        A prompt's first token waits for its own remaining prefill and for that of every on-time
        prompt ranked ahead of it: prompts prefill in rank order. Counting only its own (the
        lower bound) let prompts take seats and prefill chunks they were bound to miss with
        (8B at 400 req/s in the simulator: 258.5 -> 269.6 req/s, docs/simulator.md round 12).
        When a prompt would miss, the longest prompt ahead of it goes late instead if that one has
        more prefill left and the prompt then fits (Moore-Hodgson's rule for the most jobs meeting
        their deadlines on one machine): one long prompt gives way to several short ones.
        """
        prompts = [seq for seq in self.running if not _is_decoding(seq)]
        prompts += [seq for _, seq in self._waiting]
        ahead_s = 0.0
        changed = False
        # The on-time prompts counted so far that could give way, longest first.
        counted: list[tuple[float, int, Sequence]] = []
        tiebreak = itertools.count()
        for seq in sorted(prompts, key=_rank):
            if seq.late:
                continue  # ranked after every on-time prompt: what follows does not wait for it
            left_s = (len(seq.token_ids) - seq.num_computed) * self.prefill_s_per_token
            deadline = seq.ttft_deadline if seq.num_generated == 0 else None  # None: TTFT settled
            if deadline is not None and misses_ttft(now, deadline, ahead_s + left_s):
                changed = True
                longest_s = -counted[0][0] if counted else 0.0
                if longest_s <= left_s or misses_ttft(now, deadline, ahead_s - longest_s + left_s):
                    seq.late = True
                    continue
                heapq.heappop(counted)[2].late = True  # the longest prompt ahead gives way
                ahead_s -= longest_s
            ahead_s += left_s
            if deadline is not None:
                heapq.heappush(counted, (-left_s, next(tiebreak), seq))
        if changed:
            self._waiting = [(_rank(seq), seq) for _, seq in self._waiting]
            heapq.heapify(self._waiting)

    def schedule(self, now: float | None = None) -> list[ScheduledSeq]:
        """Plan one step: every running sequence past its prompt decodes one token; the rest of the
        token budget goes to prompt chunks in rank order (priority, deadline, arrival) across running
        and waiting sequences, so a high-priority prompt never chunks behind a lower-priority one
        that happened to be admitted first (it would miss its TTFT behind it). With ``now`` (the
        clock the TTFT deadlines are on), prompts sure to miss their deadline rank last."""
        if now is not None:
            self._mark_late(now)
        plan: list[ScheduledSeq] = []
        running = sorted(self.running, key=_rank)
        tpot = _TpotBound(self.step_time, running, now)
        budget = self.config.max_batched_tokens - tpot.decodes
        if tpot.bound is not None:
            budget = min(budget, tpot.prefill_budget(budget, self.config.min_prefill_chunk))
        scheduled: list[Sequence] = []
        admitting = True
        while running or (admitting and self._waiting):
            if admitting and self._waiting and (not running or self._waiting[0][0] < _rank(running[0])):
                admitted = self._admit(plan, scheduled, len(running), budget)
                admitting, budget = admitted > 0, budget - admitted
                continue
            seq = running.pop(0)
            num_new = 1 if _is_decoding(seq) else min(len(seq.token_ids) - seq.num_computed, budget)
            if num_new <= 0:  # a prompt whose chunk did not fit this step's budget
                scheduled.append(seq)
                continue
            while not self.blocks.can_reserve(seq.seq_id, seq.num_computed + num_new):
                # Out of KV: evict the lowest-ranked running sequence not yet planned (maybe this one).
                victim = running.pop() if running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.WAITING:
                continue
            self.blocks.reserve(seq.seq_id, seq.num_computed + num_new)
            plan.append(ScheduledSeq(seq, seq.num_computed, num_new))
            if not _is_decoding(seq):
                budget -= num_new
            scheduled.append(seq)
        self.running = scheduled
        return plan

    def _admit(self, plan: list[ScheduledSeq], scheduled: list[Sequence], unplanned: int, budget: int) -> int:
        """Admit the best-ranked waiting sequence with a first prompt chunk, if budget, a seat and
        KV blocks allow: the chunk's tokens, or 0 (stop admitting this step)."""
        if budget <= 0 or len(scheduled) + unplanned >= self.config.max_num_seqs:
            return 0
        _, seq = self._waiting[0]
        num_new = min(len(seq.token_ids) - seq.num_computed, budget)
        if not self.blocks.can_reserve(seq.seq_id, seq.num_computed + num_new):
            return 0
        heapq.heappop(self._waiting)
        self.blocks.reserve(seq.seq_id, seq.num_computed + num_new)
        seq.status = SeqStatus.RUNNING
        scheduled.append(seq)
        plan.append(ScheduledSeq(seq, seq.num_computed, num_new))
        return num_new


class _TpotBound:
    """One step's TPOT bound (the tightest of its decoding sequences') and the prompt tokens it allows."""

    def __init__(
        self, step_time: StepTimePredictor | None, running: list[Sequence], now: float | None
    ) -> None:
        self.step_time = step_time
        decoding = [seq for seq in running if _is_decoding(seq)]
        self.decodes = len(decoding)
        self.bound: float | None = None
        if step_time is None or now is None:
            return
        self.ctx = sum(len(seq.token_ids) for seq in decoding)
        decode_only = step_time(0, self.decodes, self.ctx)
        if decode_only is None:
            return
        for seq in decoding:
            if seq.tpot_s is None:
                continue
            bound = seq.tpot_s
            if seq.first_token_at is not None:
                left = TPOT_REPAY_TOKENS if seq.max_tokens is None else seq.max_tokens - seq.num_generated
                owed = tpot_step_bound(
                    seq.tpot_s, seq.num_generated, now - seq.first_token_at, min(TPOT_REPAY_TOKENS, left)
                )
                # A sequence that cannot get back on course even with decode-only steps is held to
                # its target but no tighter: paying back for it would cost the others their TTFT,
                # and dropping its bound altogether let whole-budget steps stretch it further
                # (benchmarks/tpot_steps.py: 474 ms against a 157 ms target, docs/simulator.md round 15).
                if owed is not None and owed >= decode_only:
                    bound = min(bound, owed)
            if self.bound is None or bound < self.bound:
                self.bound = bound

    def prefill_budget(self, most: int, least: int) -> int:
        """The most prompt tokens (up to ``most``, at least ``least``) a step fits within the bound."""
        assert self.step_time is not None and self.bound is not None
        lo, hi = 0, most
        while lo < hi:  # the step time grows with its prompt tokens
            mid = (lo + hi + 1) // 2
            t = self.step_time(mid, self.decodes, self.ctx)
            if t is not None and t <= self.bound:
                lo = mid
            else:
                hi = mid - 1
        return max(lo, min(least, most))


def _rank(seq: Sequence) -> tuple[int, int, float, int]:
    # Late prompts keep arrival order among themselves, whatever their priority. On-time ones go
    # by priority (the router's lane), then earliest TTFT deadline: a prompt with 1 s to spare
    # waits for one with 0.3 s (docs/simulator.md round 12). No deadline: after those with one.
    if seq.late:
        return (1, 0, 0.0, seq.arrival)
    due = math.inf if seq.ttft_deadline is None else seq.ttft_deadline
    return (0, seq.priority, due, seq.arrival)


def _is_decoding(seq: Sequence) -> bool:
    """Past its prompt: the next step feeds its one newest token."""
    return len(seq.token_ids) - seq.num_computed <= 1
