"""Continuous-batching scheduler: pure Python, clock-free, shared by the engine and tests.

Each ``schedule()`` call plans one engine step: every running sequence decodes one token, then
waiting sequences are admitted (by priority, then arrival) with chunked prefill under a token
budget. New requests therefore join the running batch at the next step boundary and finished ones
leave it as soon as they finish.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from enum import Enum

from nitsum_core.kv_cache import BlockManager


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


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self._waiting: list[tuple[int, int, Sequence]] = []
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
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, seq))

    def add_running(self, seq: Sequence) -> None:
        """Join the running batch directly: the sequence arrives with its KV blocks already filled."""
        seq.arrival = next(self._counter)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def waiting_in_order(self) -> list[Sequence]:
        """The waiting queue in admission order (priority, then arrival)."""
        return [seq for _, _, seq in sorted(self._waiting, key=lambda e: e[:2])]

    def remove(self, seq_id: str) -> Sequence | None:
        """Drop a sequence wherever it is (abort or finish) and free its blocks."""
        self.blocks.release(seq_id)
        for i, seq in enumerate(self.running):
            if seq.seq_id == seq_id:
                seq.status = SeqStatus.FINISHED
                return self.running.pop(i)
        for i, (_, _, seq) in enumerate(self._waiting):
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
        heapq.heappush(self._waiting, (seq.priority, seq.arrival, seq))
        self.num_preempted += 1

    def schedule(self) -> list[ScheduledSeq]:
        plan: list[ScheduledSeq] = []
        budget = self.config.max_batched_tokens
        # 1. Running sequences: decode one token, or continue a chunked prefill.
        still_running: list[Sequence] = []
        queue = list(self.running)
        while queue:
            seq = queue.pop(0)
            remaining = len(seq.token_ids) - seq.num_computed
            num_new = min(remaining, budget) if remaining > 1 else 1
            if num_new <= 0:
                still_running.append(seq)
                continue
            while not self.blocks.can_reserve(seq.seq_id, seq.num_computed + num_new):
                # Out of KV: evict the most recently admitted sequence (maybe this one).
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.WAITING:
                continue
            self.blocks.reserve(seq.seq_id, seq.num_computed + num_new)
            plan.append(ScheduledSeq(seq, seq.num_computed, num_new))
            budget -= num_new
            still_running.append(seq)
        self.running = still_running
        # 2. Admit waiting sequences while the token budget, seat count and KV blocks allow.
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            _, _, seq = self._waiting[0]
            num_new = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self.blocks.can_reserve(seq.seq_id, seq.num_computed + num_new):
                break
            heapq.heappop(self._waiting)
            self.blocks.reserve(seq.seq_id, seq.num_computed + num_new)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            plan.append(ScheduledSeq(seq, seq.num_computed, num_new))
            budget -= num_new
        return plan
