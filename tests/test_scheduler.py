"""Block manager and continuous-batching scheduler (pure Python, no model)."""

from __future__ import annotations

import pytest
from nitsum_core.kv_cache import BlockManager, blocks_needed
from nitsum_core.scheduler import Scheduler, SchedulerConfig, Sequence
from nitsum_core.step_cost import StepCost, StepCostFit


def test_block_manager_reserve_grow_release() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    first = bm.reserve("a", 5)
    assert first.block_table == [0, 1] and first.new_blocks == [0, 1]
    assert bm.reserve("a", 8).new_blocks == []  # still fits in two blocks
    assert bm.reserve("a", 9).new_blocks == [2]
    assert not bm.can_reserve("b", 5) and bm.can_reserve("b", 4)
    with pytest.raises(MemoryError):
        bm.reserve("b", 8)
    assert bm.release("a") == [0, 1, 2]
    assert bm.num_free() == 4 and bm.block_table("a") == []
    assert blocks_needed(0, 4) == 0 and blocks_needed(4, 4) == 1 and blocks_needed(5, 4) == 2


def _seq(name: str, n: int, priority: int = 0) -> Sequence:
    return Sequence(name, list(range(1, n + 1)), n, priority)


def test_new_requests_join_at_step_boundaries_and_priority_orders_admission() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=64), BlockManager(64, 4))
    sched.add(_seq("bg", 3, priority=2))
    sched.add(_seq("fast", 3, priority=0))
    plan = sched.schedule()
    assert [p.seq.seq_id for p in plan] == ["fast", "bg"]  # tier priority first
    for p in plan:
        p.seq.num_computed = p.start + p.num_new
        p.seq.token_ids.append(99)
    sched.add(_seq("late", 5))
    plan = sched.schedule()
    # Running sequences decode one token each; the newcomer prefills in the same step (planned in
    # rank order: priority, then arrival).
    assert [(p.seq.seq_id, p.num_new) for p in plan] == [("fast", 1), ("late", 5), ("bg", 1)]


def test_a_high_priority_prompt_chunks_ahead_of_a_lower_priority_one_admitted_first() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=8), BlockManager(64, 4))
    sched.add(_seq("best-effort", 40, priority=2))
    (first,) = sched.schedule()
    assert (first.seq.seq_id, first.num_new) == ("best-effort", 8)
    first.seq.num_computed = 8
    sched.add(_seq("feasible", 12, priority=0))
    plan = sched.schedule()
    # The newcomer takes the whole budget although the other prompt was admitted a step earlier.
    assert [(p.seq.seq_id, p.start, p.num_new) for p in plan] == [("feasible", 0, 8)]
    for p in plan:
        p.seq.num_computed = p.start + p.num_new
    plan = sched.schedule()
    assert [(p.seq.seq_id, p.start, p.num_new) for p in plan] == [("feasible", 8, 4), ("best-effort", 8, 4)]


def test_decodes_are_never_starved_and_prompts_share_what_they_leave() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=8), BlockManager(64, 4))
    low = _seq("low", 2, priority=2)
    sched.add(low)
    (item,) = sched.schedule()
    low.num_computed = 2
    low.token_ids.append(7)  # its first token is out: it decodes from now on
    sched.add(_seq("high", 30, priority=0))
    plan = sched.schedule()
    # The low-priority decode still runs; the high-priority prompt gets the other 7 tokens.
    assert sorted((p.seq.seq_id, p.num_new) for p in plan) == [("high", 7), ("low", 1)]
    assert sum(p.num_new for p in plan) == 8


def test_a_prompt_sure_to_miss_its_ttft_goes_after_those_that_can_still_meet_theirs() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=8), BlockManager(64, 4))
    sched.observe_step(100, 1.0)  # the engine's measured steps: 10 ms a token
    doomed = Sequence("doomed", list(range(1, 21)), 20, priority=0, ttft_deadline=10.1)
    sched.add(doomed)
    (first,) = sched.schedule(now=10.0)  # 20 tokens need 0.2 s alone: late, but nothing else waits
    assert (first.seq.seq_id, first.num_new) == ("doomed", 8)
    doomed.num_computed = 8
    sched.add(Sequence("on-time", list(range(1, 13)), 12, priority=2, ttft_deadline=11.0))
    plan = sched.schedule(now=10.05)
    # A lower-priority, later request takes the budget: the earlier one can no longer count.
    assert doomed.late and [(p.seq.seq_id, p.num_new) for p in plan] == [("on-time", 8)]
    for p in plan:
        p.seq.num_computed = p.start + p.num_new
    plan = sched.schedule(now=10.1)
    assert [(p.seq.seq_id, p.num_new) for p in plan] == [("on-time", 4), ("doomed", 4)]  # still served
    # Without a clock (or a deadline) the scheduler ranks by priority and arrival alone.
    plain = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=8), BlockManager(64, 4))
    plain.add(Sequence("a", [1] * 20, 20, priority=0, ttft_deadline=0.0))
    plain.add(Sequence("b", [1] * 20, 20, priority=1, ttft_deadline=99.0))
    assert [p.seq.seq_id for p in plain.schedule()] == ["a"]


def test_a_waiting_prompt_turns_late_in_the_queue_and_moves_behind() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_batched_tokens=4), BlockManager(64, 4))
    sched.add(_seq("busy", 2))
    sched.schedule(now=0.0)  # takes the only seat
    sched.add(Sequence("first", [1] * 4, 4, priority=0, ttft_deadline=1.0))
    sched.add(Sequence("second", [1] * 4, 4, priority=0, ttft_deadline=5.0))
    assert [s.seq_id for s in sched.waiting_in_order()] == ["first", "second"]
    sched.schedule(now=2.0)  # "first" is past its deadline while it waits
    assert [s.seq_id for s in sched.waiting_in_order()] == ["second", "first"]


def _timed(sched: Scheduler, base_s: float, per_token_s: float) -> Scheduler:
    for tokens in (1, 10, 100, 50, 5, 200, 20, 80):  # steps as the engine would measure them
        sched.observe_step(tokens, base_s + per_token_s * tokens)
    return sched


def test_steps_stay_within_the_strictest_tpot_target_of_the_batch() -> None:
    # 10 ms a step plus 1 ms a token: a 50 ms TPOT target allows 40 tokens a step.
    sched = _timed(
        Scheduler(
            SchedulerConfig(max_num_seqs=8, max_batched_tokens=512, min_prefill_chunk=8), BlockManager(256, 4)
        ),
        0.01,
        0.001,
    )
    chat = Sequence("chat", [1] * 4, 4, tpot_target=0.05)
    sched.add(chat)
    sched.schedule()
    chat.num_computed = 4
    chat.token_ids.append(9)  # decoding from now on
    sched.add(Sequence("long", [1] * 300, 300, priority=1, tpot_target=1.0))
    plan = sched.schedule()
    assert [(p.seq.seq_id, p.num_new) for p in plan] == [("chat", 1), ("long", 39)]
    # A batch with no TPOT target gets the whole token budget.
    free = _timed(
        Scheduler(
            SchedulerConfig(max_num_seqs=8, max_batched_tokens=512, min_prefill_chunk=8), BlockManager(256, 4)
        ),
        0.01,
        0.001,
    )
    free.add(Sequence("long", [1] * 300, 300))
    assert [p.num_new for p in free.schedule()] == [300]


def test_a_tight_tpot_target_caps_the_seats_and_never_stops_prompts() -> None:
    config = SchedulerConfig(max_num_seqs=16, max_batched_tokens=64, min_prefill_chunk=8)
    sched = _timed(Scheduler(config, BlockManager(256, 4)), 0.01, 0.001)
    for i in range(7):
        sched.add(Sequence(f"r{i}", [1] * 2, 2, tpot_target=0.015))
    # 10 ms + 1 ms a sequence: a decode step over 5 stays within 15 ms, over 6 it would not.
    assert [p.seq.seq_id for p in sched.schedule()] == ["r0", "r1", "r2", "r3", "r4"]
    assert sched.num_waiting == 2

    sched = _timed(Scheduler(config, BlockManager(256, 4)), 0.01, 0.001)
    for name, n in [("r0", 2), ("r1", 2), ("r2", 2), ("r3", 2), ("prompt", 200)]:
        sched.add(Sequence(name, [1] * n, n, tpot_target=0.015))
    plan = sched.schedule()
    assert [(p.seq.seq_id, p.num_new) for p in plan][-1] == ("prompt", 56)
    for p in plan:
        p.seq.num_computed = p.start + p.num_new
        if p.seq.seq_id != "prompt":
            p.seq.token_ids.append(9)
    # Four decodes nearly fill the 15 ms; the prompt still gets min_prefill_chunk.
    plan = sched.schedule()
    assert [(p.seq.seq_id, p.num_new) for p in plan] == [
        ("r0", 1),
        ("r1", 1),
        ("r2", 1),
        ("r3", 1),
        ("prompt", 8),
    ]


def test_chunked_prefill_respects_token_budget() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=8), BlockManager(64, 4))
    sched.add(_seq("long", 20))
    chunks = []
    while True:
        plan = sched.schedule()
        (item,) = plan
        chunks.append((item.start, item.num_new, item.samples))
        item.seq.num_computed = item.start + item.num_new
        if item.samples:
            break
    assert chunks == [(0, 8, False), (8, 8, False), (16, 4, True)]


def test_preemption_when_kv_runs_out_keeps_generated_tokens() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=64), BlockManager(3, 4))
    a, b = _seq("a", 4), _seq("b", 4)
    sched.add(a)
    sched.add(b)
    for p in sched.schedule():
        p.seq.num_computed = p.start + p.num_new
        p.seq.token_ids.append(7)
    # Each now needs a second block; only one is free: the newest ('b') is preempted.
    plan = sched.schedule()
    assert [p.seq.seq_id for p in plan] == ["a"]
    assert sched.num_preempted == 1 and b.num_computed == 0 and b.token_ids[-1] == 7
    sched.remove("a")
    plan = sched.schedule()
    assert [(p.seq.seq_id, p.start, p.num_new) for p in plan] == [("b", 0, 5)]  # re-prefill incl. its token


def test_remove_frees_blocks_everywhere() -> None:
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    sched.add(_seq("x", 6))
    sched.schedule()
    sched.add(_seq("y", 2))
    assert sched.remove("x") is not None and sched.remove("y") is not None
    assert bm.num_free() == 8 and not sched.has_work()
    assert sched.remove("nope") is None


def test_the_step_cost_fit_learns_base_and_per_token_time_from_measured_steps() -> None:
    fit = StepCostFit(min_steps=4)
    assert fit.cost() is None  # nothing measured: the SLO rules stay off
    fit.observe(100, 0.2)
    assert fit.cost() == StepCost(0.0, 0.002)  # too few steps for a slope: all of it per token
    for tokens in (1, 50, 200, 400, 10, 300):
        fit.observe(tokens, 0.02 + 0.0005 * tokens)
    for tokens in (1, 50, 200, 400, 10, 300) * 40:  # older steps fade: it follows the machine now
        fit.observe(tokens, 0.01 + 0.0001 * tokens)
    cost = fit.cost()
    assert cost is not None
    assert cost.base_s == pytest.approx(0.01, rel=0.05) and cost.per_token_s == pytest.approx(
        0.0001, rel=0.05
    )
    assert cost.tokens_within(0.02) in (99, 100) and cost.tokens_within(0.005) == 0
    assert cost.prefill_s(250, chunk=100) == pytest.approx(3 * cost.base_s + 250 * cost.per_token_s)
