"""Block manager and continuous-batching scheduler (pure Python, no model)."""

from __future__ import annotations

import pytest
from nitsum_core.policy.batching import late_prompts, prefill_rank, seat_fits
from nitsum_core.policy.kv_cache import BlockManager, blocks_needed
from nitsum_core.policy.scheduler import EngineSequence, Scheduler, SchedulerConfig


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


def _seq(name: str, n: int, priority: int = 0) -> EngineSequence:
    return EngineSequence(name, list(range(1, n + 1)), n, priority)


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
    sched.prefill_s_per_token = 0.01  # as the engine measures it
    doomed = EngineSequence("doomed", list(range(1, 21)), 20, priority=0, ttft_deadline=10.1)
    sched.add(doomed)
    (first,) = sched.schedule(now=10.0)  # 20 tokens need 0.2 s alone: late, but nothing else waits
    assert (first.seq.seq_id, first.num_new) == ("doomed", 8)
    doomed.num_computed = 8
    sched.add(EngineSequence("on-time", list(range(1, 13)), 12, priority=2, ttft_deadline=11.0))
    plan = sched.schedule(now=10.05)
    # A lower-priority, later request takes the budget: the earlier one can no longer count.
    assert doomed.late and [(p.seq.seq_id, p.num_new) for p in plan] == [("on-time", 8)]
    for p in plan:
        p.seq.num_computed = p.start + p.num_new
    plan = sched.schedule(now=10.1)
    assert [(p.seq.seq_id, p.num_new) for p in plan] == [("on-time", 4), ("doomed", 4)]  # still served
    # Without a clock (or a deadline) the scheduler ranks by priority and arrival alone.
    plain = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=8), BlockManager(64, 4))
    plain.add(EngineSequence("a", [1] * 20, 20, priority=0, ttft_deadline=0.0))
    plain.add(EngineSequence("b", [1] * 20, 20, priority=1, ttft_deadline=99.0))
    assert [p.seq.seq_id for p in plain.schedule()] == ["a"]


def test_a_prompt_that_would_make_it_alone_but_not_behind_those_ahead_goes_late() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=10), BlockManager(64, 4))
    sched.prefill_s_per_token = 0.01
    # Three equal prompts, each 0.1 s of prefill alone, all due at 0.25 s: only two fit in turn.
    for name in ("a", "b", "c"):
        sched.add(EngineSequence(name, [1] * 10, 10, priority=0, ttft_deadline=0.25))
    sched.add(EngineSequence("relaxed", [1] * 10, 10, priority=1, ttft_deadline=5.0))
    plan = sched.schedule(now=0.0)
    assert [p.seq.seq_id for p in plan] == ["a"]
    assert [s.seq_id for s in sched.waiting_in_order()] == ["b", "relaxed", "c"]
    # The one that cannot make it no longer delays the lower-priority prompt that still can.
    served = []
    for step in range(1, 5):
        for p in plan:
            p.seq.num_computed = p.start + p.num_new
            p.seq.token_ids.append(7)
        plan = sched.schedule(now=step * 0.1)
        served += [p.seq.seq_id for p in plan if p.start == 0]
    assert served == ["b", "relaxed", "c"]


def test_prompts_prefill_earliest_deadline_first_within_a_priority() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=10), BlockManager(64, 4))
    sched.add(EngineSequence("agent", [1] * 10, 10, priority=0, ttft_deadline=1.0))
    sched.add(EngineSequence("interactive", [1] * 10, 10, priority=0, ttft_deadline=0.3))
    sched.add(EngineSequence("background", [1] * 10, 10, priority=1, ttft_deadline=0.1))
    sched.add(EngineSequence("no-target", [1] * 10, 10, priority=0))
    assert [s.seq_id for s in sched.waiting_in_order()] == ["interactive", "agent", "no-target", "background"]


def test_a_long_prompt_gives_way_to_the_short_ones_it_would_make_miss() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_batched_tokens=10), BlockManager(64, 4))
    sched.prefill_s_per_token = 0.01
    # A 0.3 s prompt due at 0.35 s and three 0.1 s ones due at 0.42-0.44 s: behind the long one,
    # one short one makes it; without it, all three do.
    long = EngineSequence("long", [1] * 30, 30, priority=0, ttft_deadline=0.35)
    sched.add(long)
    for i in range(3):
        sched.add(EngineSequence(f"short{i}", [1] * 10, 10, priority=0, ttft_deadline=0.42 + 0.01 * i))
    plan = sched.schedule(now=0.0)
    assert long.late and [p.seq.seq_id for p in plan] == ["short0"]
    served = ["short0"]
    for step in range(1, 6):
        for p in plan:
            p.seq.num_computed = p.start + p.num_new
            if p.samples:
                p.seq.token_ids.append(7)
        plan = sched.schedule(now=step * 0.1)
        served += [p.seq.seq_id for p in plan if p.start == 0]
    assert served == ["short0", "short1", "short2", "long"]  # still served, after them


def test_a_waiting_prompt_turns_late_in_the_queue_and_moves_behind() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_batched_tokens=4), BlockManager(64, 4))
    sched.add(_seq("busy", 2))
    sched.schedule(now=0.0)  # takes the only seat
    sched.add(EngineSequence("first", [1] * 4, 4, priority=0, ttft_deadline=1.0))
    sched.add(EngineSequence("second", [1] * 4, 4, priority=0, ttft_deadline=5.0))
    assert [s.seq_id for s in sched.waiting_in_order()] == ["first", "second"]
    sched.schedule(now=2.0)  # "first" is past its deadline while it waits
    assert [s.seq_id for s in sched.waiting_in_order()] == ["second", "first"]


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


# A step of p prompt tokens beside d decodes: 10 ms + 0.1 ms per prompt token + 1 ms per decode.
def _linear_step(p: int, d: int, _ctx: int) -> float:
    return 0.010 + 0.0001 * p + 0.001 * d


def _decoding(name: str, tpot_s: float, generated: int, since_first_s: float, now: float) -> EngineSequence:
    seq = EngineSequence(name, [1] * (8 + generated), 8, tpot_s=tpot_s, first_token_at=now - since_first_s)
    seq.num_computed = len(seq.token_ids) - 1
    return seq


def _tpot_sched(max_batched_tokens: int = 512, max_num_seqs: int = 8) -> Scheduler:
    sched = Scheduler(SchedulerConfig(max_num_seqs, max_batched_tokens), BlockManager(256, 4))
    sched.step_time = _linear_step
    return sched


def _doc_chunk_beside(decoding: EngineSequence, sized: bool = True) -> int:
    """Prompt tokens a 1000-token document gets in the step beside ``decoding`` (at now = 100 s)."""
    sched = _tpot_sched()
    if not sized:
        sched.step_time = None
    sched.add_running(decoding)
    sched.add(_seq("doc", 1000))
    return {p.seq.seq_id: p.num_new for p in sched.schedule(now=100.0)}["doc"]


def test_steps_beside_a_tpot_target_take_only_the_prompt_tokens_that_fit() -> None:
    sched = _tpot_sched()
    # On course for a 40 ms target (19 tokens in 0.5 s, 26 ms each): a step may take 40 ms, so
    # 10 ms + 1 ms + 0.1 ms x 290 tokens.
    sched.add_running(_decoding("chat", 0.040, generated=20, since_first_s=0.5, now=100.0))
    sched.add(_seq("doc", 1000))
    plan = sched.schedule(now=100.0)
    chunk = {p.seq.seq_id: p.num_new for p in plan}
    assert chunk == {"chat": 1, "doc": 290}
    # No predictor (or no now): the whole budget, as before.
    chat = _decoding("chat", 0.040, generated=20, since_first_s=0.5, now=100.0)
    assert _doc_chunk_beside(chat, sized=False) == 511


def test_a_sequence_behind_its_tpot_target_gets_shorter_steps_until_it_has_caught_up() -> None:
    # 0.2 s behind a 40 ms target (19 intervals should have taken 0.76 s, took 0.96 s): repaid
    # over 32 tokens, each step may take 40 - 6.25 = 33.75 ms: 227 prompt tokens.
    paused = _decoding("paused", 0.040, generated=20, since_first_s=0.96, now=100.0)
    assert _doc_chunk_beside(paused) == 227


def test_a_sequence_too_far_behind_to_recover_is_held_to_its_target_but_no_tighter() -> None:
    # 2 s behind: even decode-only steps (11 ms) could not pay it back over 32 tokens. The
    # prompt is not starved for it: the step takes what the target itself allows (290 tokens, as
    # for a sequence on course), not the whole budget either.
    lost = _decoding("lost", 0.040, generated=20, since_first_s=2.76, now=100.0)
    assert _doc_chunk_beside(lost) == 290


def test_prompts_always_progress_by_the_smallest_chunk() -> None:
    # A 12 ms target beside a decode step of 11 ms leaves 10 tokens; the floor is 32.
    tight = _decoding("tight", 0.012, generated=5, since_first_s=0.04, now=100.0)
    assert _doc_chunk_beside(tight) == 32


def test_seats_are_gated_by_the_shared_tpot_rule_and_an_idle_engine_takes_work() -> None:
    # Beside one decode on course for a 16 ms target, a step over two sequences plus the 32-token
    # floor every prompt chunk gets takes 10 + 3.2 + 2 = 15.2 ms: a newcomer fits; over three,
    # 16.2 ms: the next one waits (as the simulator's seats, ``batching.seat_fits``).
    sched = _tpot_sched(max_num_seqs=16)
    sched.add_running(_decoding("d0", 0.016, generated=3, since_first_s=0.02, now=100.0))
    for i in range(3):
        sched.add(EngineSequence(f"new{i}", [1] * 4, 4, tpot_s=0.016))
    plan = sched.schedule(now=100.0)
    assert [p.seq.seq_id for p in plan if p.start == 0] == ["new0"]
    assert sched.num_waiting == 2
    least = _linear_step(32, 1, 0)
    assert seat_fits(_linear_step, 2, 11 + 4, 0.016, 32, least)
    assert not seat_fits(_linear_step, 3, 11 + 4 + 4, 0.016, 32, least)
    # Without TPOT targets nothing is gated: all three take seats.
    free = _tpot_sched(max_num_seqs=16)
    untargeted = _decoding("d0", 0.016, generated=3, since_first_s=0.02, now=100.0)
    untargeted.tpot_s = None
    free.add_running(untargeted)
    for i in range(3):
        free.add(EngineSequence(f"new{i}", [1] * 4, 4))
    free_plan = free.schedule(now=100.0)
    assert [p.seq.seq_id for p in free_plan if p.start == 0] == ["new0", "new1", "new2"]
    # An empty engine always takes its first sequence, even where one step is over the target.
    idle = _tpot_sched()
    idle.step_time = lambda p, d, c: 1.0
    idle.add(EngineSequence("only", [1] * 4, 4, tpot_s=0.001))
    assert [p.seq.seq_id for p in idle.schedule(now=0.0)] == ["only"]


@pytest.mark.parametrize("decodes", [0, 1, 2, 3, 4, 6])
def test_the_engine_seats_a_newcomer_exactly_when_the_shared_rule_does(decodes: int) -> None:
    sched = _tpot_sched(max_num_seqs=16)
    running = [_decoding(f"d{i}", 0.018, generated=3, since_first_s=0.02, now=100.0) for i in range(decodes)]
    for seq in running:
        sched.add_running(seq)
    sched.add(EngineSequence("new", [1] * 4, 4, tpot_s=0.018))
    admitted = any(p.seq.seq_id == "new" for p in sched.schedule(now=100.0))
    ctx = sum(len(s.token_ids) for s in running) + 4
    fits = seat_fits(_linear_step, decodes + 1, ctx, 0.018, 32, _linear_step(32, 1, 0))
    assert admitted == (fits or decodes == 0)


def test_the_late_rule_in_token_units_lets_the_longest_prompt_ahead_give_way() -> None:
    # 1 ms a token: "long" (30 tokens, due at 0.05) fits alone; "short" (10, due at 0.035) would
    # wait 40 ms behind it, so the longer one gives way and the short one is served on time.
    prompts = [(0.05, 30, 0, "long"), (0.035, 10, 1, "short"), (None, 5, 2, "settled")]
    late, safe_until, ahead = late_prompts(prompts, now=0.0, per_token=0.001)
    assert late == ["long"] and ahead == 15
    # The skip bound is a lower bound: "long" counted while it was still on time (0.05 - 0.03).
    assert safe_until == pytest.approx(0.02)
    # At a plain deadline check (no rate) nothing misses before its deadline.
    assert late_prompts(prompts, now=0.0, per_token=0.0)[0] == []
    # Late prompts rank after every lane, in arrival order whatever their deadlines.
    assert prefill_rank(3, 0.1, 5.0, 1) > prefill_rank(2, 9.0, 0.0, 0)
    assert prefill_rank(3, 0.1, 5.0, 1) > prefill_rank(3, 9.0, 4.0, 2)


def test_a_tpot_target_no_step_can_meet_does_not_bound_the_steps() -> None:
    # A 5 ms target sits below the smallest decode step (11 ms): bounding by it would cut every
    # step to the smallest chunk; the sequence runs best-effort and the steps are sized for the
    # others (batching.strictest_reachable, as the simulator's instances).
    hopeless = _decoding("hopeless", 0.005, generated=5, since_first_s=0.02, now=100.0)
    assert _doc_chunk_beside(hopeless) == 511
    sched = _tpot_sched()
    sched.add_running(_decoding("hopeless", 0.005, generated=5, since_first_s=0.02, now=100.0))
    sched.add_running(_decoding("chat", 0.040, generated=20, since_first_s=0.5, now=100.0))
    sched.add(_seq("doc", 1000))
    # Two decodes: 10 ms + 2 ms + 0.1 ms x 280 tokens = 40 ms, the chat's target.
    assert {p.seq.seq_id: p.num_new for p in sched.schedule(now=100.0)}["doc"] == 280


def test_a_re_prefilling_sequence_that_already_missed_its_ttft_goes_late() -> None:
    # Preempted after its first token, which came after its TTFT deadline: it can no longer
    # count, so it ranks behind an on-time prompt of a lower priority (the simulator's rule for a
    # request re-prefilled after a slow re-cut). One whose first token was on time keeps its rank.
    sched = Scheduler(SchedulerConfig(8, 22), BlockManager(64, 4))
    missed = EngineSequence("missed", [1] * 12, 10, priority=0, ttft_deadline=5.0, first_token_at=6.0)
    kept = EngineSequence("kept", [1] * 12, 10, priority=0, ttft_deadline=5.0, first_token_at=4.0)
    sched.add(missed)
    sched.add(kept)
    sched.add(EngineSequence("fresh", [1] * 10, 10, priority=1, ttft_deadline=50.0))
    plan = sched.schedule(now=10.0)
    assert missed.late and not kept.late
    # 22 tokens: the on-time ones take them all, the late one waits.
    assert [(p.seq.seq_id, p.num_new) for p in plan] == [("kept", 12), ("fresh", 10)]
