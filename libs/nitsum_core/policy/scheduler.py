"""Continuous-batching scheduler: pure Python, clock-free, shared by the engine and tests.

Each ``schedule()`` call plans one engine step: every running sequence past its prompt decodes
one token, and prompt chunks (running ones and newly admitted waiting ones) share the rest of a
token budget in rank order (``batching.prefill_rank``): priority (the router's lane), then TTFT
deadline, then arrival. New requests therefore join the running batch at the next step boundary
and finished ones leave it as soon as they finish.

The rules are the simulator's, stated once in ``batching``; this module keeps the engine's
bookkeeping (waiting heap, KV blocks, preemption) around them.

A prompt that can no longer meet its TTFT deadline (``batching.late_prompts``: its own remaining
prefill and that of the on-time prompts ranked ahead of it do not fit before it, at the measured
``prefill_s_per_token``) ranks after every prompt that still can: it cannot count toward goodput
any more, and ahead of them it would make them miss too. Where a longer prompt ahead of it has to
give way for it to fit, that one goes instead. Late prompts still run, after the others, so
nothing is dropped.

SLO-sized steps (docs/architecture.md#engine). Given a ``StepTimePredictor`` (the engine
learns one from its own steps), a step's prompt tokens are cut (``batching.largest_chunk``) so
that the step is predicted to take no longer than the tightest bound of the sequences decoding in
it: their tier's TPOT target, less the time any of them is behind it, paid back over
``TPOT_REPAY_TOKENS`` tokens (``batching.repay_bound``). A prompt chunk never shrinks below
``min_prefill_chunk`` tokens, so prompts always progress. Without a predictor, or without TPOT
targets, steps take the whole token budget.

TPOT-gated seats, as the simulator's (``batching.seat_fits``): with a predictor and a TPOT target,
a waiting sequence takes a seat only if a step over the batch, itself included, plus a
``min_prefill_chunk`` prompt chunk, is predicted to stay within the strictest reachable TPOT
target of the seated sequences and the newcomer (lowered while one of them pays back time it is
behind). The study's results rest on that rule, so the engine follows it rather than keep seats
ungated: an ungated engine admits batches whose every step overruns the tightest tier's TPOT,
which the simulator never shows. Two differences, both for liveness: an empty batch always
takes its first sequence (a step over it is as small as the engine can take), and a step time the
predictor does not know yet (its first steps) gates nothing. Sequences that arrive with their KV
(``add_running``, a migration) are not gated: their seat moved with them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from enum import Enum

from nitsum_core.policy.batching import (
    LATE,
    TPOT_REPAY_TOKENS,
    StepTimePredictor,
    largest_chunk,
    late_prompts,
    prefill_rank,
    repay_bound,
    seat_fits,
    strictest_reachable,
    ttft_settled_late,
)
from nitsum_core.policy.kv_cache import BlockManager


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class EngineSequence:
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

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class ScheduledSeq:
    """``seq`` runs ``num_new`` tokens this step, starting at position ``start``."""

    seq: EngineSequence
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


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        # Seconds one prompt token takes to prefill, for ``batching.late_prompts``: the engine
        # keeps it measured; 0 (unknown) makes the rule a plain deadline check.
        self.prefill_s_per_token = 0.0
        # Step-time prediction for SLO-sized steps (module docstring); None: fixed token budget.
        self.step_time: StepTimePredictor | None = None
        self._waiting: list[tuple[tuple[int, float, int], EngineSequence]] = []
        self.running: list[EngineSequence] = []
        self._counter = itertools.count()
        self.num_preempted = 0

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting or self.running)

    def add(self, seq: EngineSequence) -> None:
        seq.arrival = next(self._counter)
        seq.status = SeqStatus.WAITING
        heapq.heappush(self._waiting, (_rank(seq), seq))

    def add_running(self, seq: EngineSequence) -> None:
        """Join the running batch directly: the sequence arrives with its KV blocks already filled."""
        seq.arrival = next(self._counter)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def waiting_in_order(self) -> list[EngineSequence]:
        """The waiting queue in admission order (rank: late last, then priority, deadline, arrival)."""
        return [seq for _, seq in sorted(self._waiting, key=lambda e: e[0])]

    def remove(self, seq_id: str) -> EngineSequence | None:
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

    def _preempt(self, seq: EngineSequence) -> None:
        # Recompute preemption: the KV is dropped and the sequence re-prefills later with the
        # tokens it already generated, so no output is lost or repeated.
        self.blocks.release(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        heapq.heappush(self._waiting, (_rank(seq), seq))
        self.num_preempted += 1

    def _mark_late(self, now: float) -> None:
        """Flag the prompts that can no longer meet their TTFT deadline (once late, always late):
        ``batching.late_prompts`` over the on-time prompts, running and waiting, in rank order."""
        prompts = [seq for seq in self.running if not _is_decoding(seq)]
        prompts += [seq for _, seq in self._waiting]
        settled = [seq for seq in prompts if not seq.late and _settled_late(seq)]
        for seq in settled:  # re-prefilling after a preemption with its TTFT already missed
            seq.late = True
        on_time = sorted((seq for seq in prompts if not seq.late), key=_rank)
        late, _, _ = late_prompts(
            (
                # A prompt re-prefilling after a preemption has its TTFT settled: no deadline.
                (
                    seq.ttft_deadline if seq.num_generated == 0 else None,
                    len(seq.token_ids) - seq.num_computed,
                    i,
                    seq,
                )
                for i, seq in enumerate(on_time)
            ),
            now,
            self.prefill_s_per_token,
        )
        if late or settled:
            for seq in late:
                seq.late = True
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
        scheduled: list[EngineSequence] = []
        admitting = True
        while running or (admitting and self._waiting):
            if admitting and self._waiting and (not running or self._waiting[0][0] < _rank(running[0])):
                admitted = self._admit(plan, scheduled, running, budget, tpot)
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

    def _admit(
        self,
        plan: list[ScheduledSeq],
        scheduled: list[EngineSequence],
        unplanned: list[EngineSequence],
        budget: int,
        tpot: _TpotBound,
    ) -> int:
        """Admit the best-ranked waiting sequence with a first prompt chunk, if budget, a seat (TPOT
        gated: ``_seat_free``) and KV blocks allow: the chunk's tokens, or 0 (stop admitting this step)."""
        if budget <= 0 or len(scheduled) + len(unplanned) >= self.config.max_num_seqs:
            return 0
        _, seq = self._waiting[0]
        if not self._seat_free(seq, [*scheduled, *unplanned], tpot):
            return 0
        num_new = min(len(seq.token_ids) - seq.num_computed, budget)
        if not self.blocks.can_reserve(seq.seq_id, seq.num_computed + num_new):
            return 0
        heapq.heappop(self._waiting)
        self.blocks.reserve(seq.seq_id, seq.num_computed + num_new)
        seq.status = SeqStatus.RUNNING
        scheduled.append(seq)
        plan.append(ScheduledSeq(seq, seq.num_computed, num_new))
        return num_new

    def _seat_free(self, seq: EngineSequence, seated: list[EngineSequence], tpot: _TpotBound) -> bool:
        """Whether ``seq`` may join ``seated`` by the simulator's TPOT seat rule (module docstring):
        ``batching.seat_fits`` at the strictest reachable TPOT target among them, lowered by what
        a decoding one is paying back."""
        step = self.step_time
        if step is None or not seated:  # no predictor: ungated; an empty batch always seats one
            return True
        floor = step(0, 1, 0)
        if floor is None:
            return True
        target = strictest_reachable((s.tpot_s for s in (*seated, seq) if s.tpot_s is not None), floor)
        if target is None:
            return True
        if tpot.owed is not None:
            target = min(target, tpot.owed)
        least = self.config.min_prefill_chunk
        ctx = sum(len(s.token_ids) for s in seated) + len(seq.token_ids)
        return seat_fits(step, len(seated) + 1, ctx, target, least, step(least, 1, 0))


class _TpotBound:
    """One step's TPOT bound (the tightest of its decoding sequences') and the prompt tokens it allows."""

    def __init__(
        self, step_time: StepTimePredictor | None, running: list[EngineSequence], now: float | None
    ) -> None:
        self.step_time = step_time
        decoding = [seq for seq in running if _is_decoding(seq)]
        self.decodes = len(decoding)
        self.bound: float | None = None
        self.owed: float | None = None  # the tightest bound a decoding sequence is paying back with
        if step_time is None or now is None:
            return
        self.ctx = sum(len(seq.token_ids) for seq in decoding)
        decode_only = step_time(0, self.decodes, self.ctx)
        if decode_only is None:
            return
        # A target below the smallest decode step cannot be met at any batch: bounding steps by it
        # would shrink every step to the smallest chunk, so those sequences run best-effort and
        # the steps are sized for the others (``batching.strictest_reachable``, as the simulator).
        floor = step_time(0, 1, 0)
        for seq in decoding:
            if seq.tpot_s is None or (
                floor is not None and strictest_reachable((seq.tpot_s,), floor) is None
            ):
                continue
            bound = seq.tpot_s
            if seq.first_token_at is not None:
                left = TPOT_REPAY_TOKENS if seq.max_tokens is None else seq.max_tokens - seq.num_generated
                # A sequence that cannot get back on course even with decode-only steps is held to
                # its target but no tighter: paying back for it would cost the others their TTFT,
                # and dropping its bound altogether let whole-budget steps stretch it further
                # (benchmarks/tpot_steps.py: 474 ms against a 157 ms target).
                owed = repay_bound(seq.tpot_s, seq.num_generated, now - seq.first_token_at, left, decode_only)
                if owed is not None:
                    bound = owed
                    if self.owed is None or owed < self.owed:
                        self.owed = owed
            if self.bound is None or bound < self.bound:
                self.bound = bound

    def prefill_budget(self, most: int, least: int) -> int:
        """The most prompt tokens (up to ``most``, at least ``least``) a step fits within the bound."""
        step_time, bound = self.step_time, self.bound
        assert step_time is not None and bound is not None
        return largest_chunk(lambda n: step_time(n, self.decodes, self.ctx), bound, most, least)


def _settled_late(seq: EngineSequence) -> bool:
    """A sequence past its first token whose TTFT came after its deadline (``batching.ttft_settled_late``)."""
    return seq.num_generated > 0 and ttft_settled_late(seq.first_token_at, seq.ttft_deadline)


def _rank(seq: EngineSequence) -> tuple[int, float, int]:
    # ``batching.prefill_rank``: the priority is the router's lane, a late prompt is in Lane.LATE;
    # a prompt without a deadline goes after those with one in its lane.
    due = math.inf if seq.ttft_deadline is None else seq.ttft_deadline
    return prefill_rank(LATE if seq.late else seq.priority, due, seq.arrival, seq.arrival)


def _is_decoding(seq: EngineSequence) -> bool:
    """Past its prompt: the next step feeds its one newest token."""
    return len(seq.token_ids) - seq.num_computed <= 1
