"""Runtime TP switches through the real services (docs/architecture.md#switch-protocol): 4 worker processes, gloo, NATS.

Requests generate while the pool goes [1,1,1,1] -> [2,2] -> [4] -> [1,1,1,1]; every output must
equal the unswitched run token for token, with zero weight bytes moved and nothing re-prefilled.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nitsum_cli.stack import Stack, StackConfig
from nitsum_core.client import NitsumClient
from nitsum_core.errors import InvalidRequest, ReconfigFailed
from nitsum_core.wire import subjects
from nitsum_core.wire.client import CancelRequest
from nitsum_core.wire.codec import encode
from paced_worker import MIGRATE_DELAY, STEP_DELAY, PacedStack

PROMPTS = [f"Request {i}: " + "tell me something new " * (1 + i % 5) for i in range(16)]
N_TOKENS = 260


def _stack(home: Path, model: Path, pace: dict[int, dict[str, str]], **kw: object) -> Stack:
    """Four workers started through ``paced_worker`` with ``pace``'s delays per slot."""
    config = StackConfig(workers=4, model=str(model), home=home, kv_cache_mb=16, threads_per_worker=1, **kw)  # type: ignore[arg-type]
    return PacedStack(config, pace)


@pytest.fixture(scope="module")
async def pool4(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    # These tests assert that a switch reroutes nothing. Under the whole suite on a 2-core host a
    # worker's heartbeat once came > 2 s late mid-switch (all 16 requests rerouted, outputs still
    # exact): a liveness false alarm, not a switch failure. Detection speed is tested elsewhere.
    # Every step sleeps 20 ms: on an idle host one worker ran the tiny model 200 tokens ahead of
    # the others before the first switch, and a quarter of the requests had finished by then.
    s = _stack(tmp_path_factory.mktemp("pool4"), tiny_llama_dir, _paced(), worker_timeout_s=6.0)
    await s.start()
    yield s
    s.stop()


def _paced(**extra: dict[str, str]) -> dict[int, dict[str, str]]:
    """Worker environments with a 20 ms sleep per engine step (``extra`` adds per-slot variables),
    so that requests of 260 tokens are still generating when a test switches or kills a worker."""
    return {slot: {STEP_DELAY: "0.02", **extra.get(f"slot{slot}", {})} for slot in range(4)}


async def _run_all(c: NitsumClient, progress: dict[int, int]) -> list[asyncio.Task]:
    async def run(i: int) -> list[int]:
        ids: list[int] = []
        async for chunk in c.generate(PROMPTS[i], max_tokens=N_TOKENS, ignore_eos=True, timeout_s=300):
            ids.extend(chunk.token_ids)
            progress[i] = len(ids)
        return ids

    return [asyncio.create_task(run(i)) for i in range(len(PROMPTS))]


async def _advance(progress: dict[int, int], by: int) -> None:
    """Wait until every request has generated ``by`` more tokens (or finished)."""
    target = {i: min(N_TOKENS, n + by) for i, n in progress.items()}
    while any(progress[i] < target[i] for i in progress):
        await asyncio.sleep(0.02)


async def test_switch_mid_generation_equals_unswitched_run(pool4: Stack) -> None:
    async with NitsumClient(pool4.nats_url) as c:
        ref_runs = [await c.complete(p, max_tokens=N_TOKENS, ignore_eos=True) for p in PROMPTS]
        reference = [r.token_ids for r in ref_runs]
        await asyncio.sleep(1.2)  # heartbeats carry the counters every 0.5 s
        before = await c.status()
        progress = dict.fromkeys(range(len(PROMPTS)), 0)
        tasks = await _run_all(c, progress)
        # Switch early and advance little in between: workers run at uneven speeds on a loaded
        # machine, and every request must still be in flight at the third switch.
        await _advance(progress, 4)
        results = []
        snapshots = []
        for tp in ([2, 2], [4], [1, 1, 1, 1]):
            res = await c.reconfigure(tp=tp, reason=f"test {tp}")
            results.append(res)
            snapshots.append(dict(progress))
            status = await c.status()
            await _advance(progress, 4)
        outputs = await asyncio.wait_for(asyncio.gather(*tasks), timeout=240)
        await asyncio.sleep(1.2)
        after = await c.status()

    for got, ref in zip(outputs, reference, strict=True):
        assert got == ref  # token for token, across three switches
    for tp, res in zip(([2, 2], [4], [1, 1, 1, 1]), results, strict=True):
        assert res.ok, (tp, res.error)
        # Every request was in flight at each switch and kept its KV: nothing re-prefilled.
        assert res.requests_moved == len(PROMPTS), (tp, res, snapshots)
        assert res.requests_recomputed == 0
        assert res.weight_bytes_moved == 0
        assert res.kv_bytes_moved > 0
        assert {"pause", "migrate", "commit", "resume"} <= set(res.phases)
    assert results[-1].epoch == results[0].epoch + 2
    assert status.epoch == results[-1].epoch
    assert after.rerouted == before.rerouted and after.failed == before.failed
    assert sum(w.weight_bytes_moved for w in after.workers) == 0
    # Prefill work of the switched run is exactly its prompts: no request restarted anywhere.
    prefilled = sum(w.tokens_prefilled for w in after.workers) - sum(
        w.tokens_prefilled for w in before.workers
    )
    assert prefilled == sum(r.usage.prompt_tokens for r in ref_runs)


async def test_bad_topologies_are_refused_with_a_reason(pool4: Stack) -> None:
    async with NitsumClient(pool4.nats_url) as c:
        with pytest.raises(InvalidRequest, match="aligned"):
            await c.reconfigure(tp=[1, 2, 1])
        with pytest.raises(InvalidRequest, match="cover"):
            await c.reconfigure(tp=[2])
        done = await c.complete("still serving", max_tokens=5, ignore_eos=True)
        assert len(done.token_ids) == 5


async def test_worker_killed_during_migration_aborts_and_survivors_resume_and_switch_again(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    # Slot 3 stalls 3 s before its migrate step, so it is mid-switch when it is killed.
    s = _stack(tmp_path, tiny_llama_dir, _paced(slot3={MIGRATE_DELAY: "3"}))
    await s.start()
    try:
        async with NitsumClient(s.nats_url) as c:
            progress = dict.fromkeys(range(len(PROMPTS)), 0)
            tasks = await _run_all(c, progress)
            await _advance(progress, 10)
            switch = asyncio.create_task(c.reconfigure(tp=[2, 2], timeout_s=20))
            await asyncio.sleep(1.5)
            s.kill("worker3", signal.SIGKILL)
            with pytest.raises(ReconfigFailed, match="migrate"):
                await asyncio.wait_for(switch, timeout=60)
            outputs = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=120)
            status = await c.status()
            # The survivors resumed the old epoch; slot 3's requests were re-run elsewhere.
            for out in outputs:
                assert not isinstance(out, Exception), out
                assert len(out) == N_TOKENS
            assert status.rerouted >= 1
            alive = [w for w in status.workers if w.alive]
            assert sorted(w.slot for w in alive) == [0, 1, 2]
            assert all(w.tp == 1 for w in alive)
            # The gloo world lost a rank, but the communicator of a block without it still works:
            # the survivors switch to TP 2 on slots 0-1 and generate what they did at TP 1.
            expected = [t async for t in _greedy(c, PROMPTS[0])]
            await c.reconfigure(tp=[2, 1], timeout_s=30)
            again = [t async for t in _greedy(c, PROMPTS[0])]
            assert again == expected
            for _ in range(40):  # workers report their new degree with their next heartbeat
                status = await c.status()
                if [(w.slot, w.tp) for w in status.workers if w.alive] == [(0, 2), (1, 2), (2, 1)]:
                    break
                await asyncio.sleep(0.25)
            assert [(w.slot, w.tp) for w in status.workers if w.alive] == [(0, 2), (1, 2), (2, 1)]
    finally:
        s.stop()


async def _greedy(c: NitsumClient, prompt: str) -> AsyncIterator[int]:
    """The tokens of one short greedy generation of ``prompt``."""
    async for chunk in c.generate(prompt, max_tokens=20, ignore_eos=True, timeout_s=60):
        for token in chunk.token_ids:
            yield token


async def test_cancel_during_a_switch_stops_the_request_on_its_new_leader(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    # Slot 3 stalls 2 s before migrating: the cancel lands while every old leader is paused and
    # has already exported the request to the plan; its new leader must not keep generating it.
    # Every step sleeps 25 ms: the tiny model would otherwise finish all 260 tokens before the
    # switch gets going on a busy machine.
    slow = {STEP_DELAY: "0.025"}
    s = _stack(tmp_path, tiny_llama_dir, {0: slow, 1: slow, 2: slow, 3: {**slow, MIGRATE_DELAY: "2"}})
    await s.start()
    try:
        async with NitsumClient(s.nats_url) as c:
            ids = [f"cancel-race-{i}" for i in range(4)]
            progress = dict.fromkeys(range(4), 0)
            finish: dict[str, str | None] = {}

            async def run(i: int) -> None:
                async for chunk in c.generate(
                    PROMPTS[i], max_tokens=N_TOKENS, ignore_eos=True, request_id=ids[i], timeout_s=300
                ):
                    progress[i] += len(chunk.token_ids)
                    if chunk.finished:
                        finish[ids[i]] = chunk.finish_reason

            tasks = [asyncio.create_task(run(i)) for i in range(4)]
            await _advance(progress, 3)
            switch = asyncio.create_task(c.reconfigure(tp=[2, 2], timeout_s=20))
            await asyncio.sleep(0.8)  # paused, waiting on slot 3's migrate step
            assert c.nc is not None
            await c.nc.publish(subjects.ROUTER_CANCEL, encode(CancelRequest(ids[0])))
            res = await asyncio.wait_for(switch, timeout=60)
            assert res.ok and res.requests_moved == 4, res
            await asyncio.sleep(1.5)  # two heartbeats from the new leaders
            status = await c.status()
            running = sum(w.running for w in status.workers)
            for t in tasks[1:]:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert finish.get(ids[0]) == "cancelled"
        assert running == 3, [(w.slot, w.running) for w in status.workers]  # the cancelled one is gone
    finally:
        s.stop()
