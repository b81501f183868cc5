"""Faults through the real services: a worker SIGKILLed mid-generation; a random-init Llama checkpoint."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from conftest import hf_greedy, load_hf
from nitsum_cli.stack import Stack, StackConfig
from nitsum_core.client import NitsumClient
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.errors import WorkerLost
from nitsum_core.wire import topology
from nitsum_core.wire.bus import connect

PROMPTS = [f"Request number {i}: " + "tell me something " * (i + 1) for i in range(6)]
N_TOKENS = 150


@pytest.fixture(scope="module")
async def tiny_stack(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    s = Stack(
        StackConfig(
            workers=2, model=str(tiny_llama_dir), home=tmp_path_factory.mktemp("tiny-stack"), kv_cache_mb=64
        )
    )
    await s.start()
    yield s
    s.stop()


async def test_random_llama_checkpoint_greedy_equals_hf(tiny_stack: Stack, tiny_llama_dir: Path) -> None:
    tok = Tokenizer(tiny_llama_dir)
    hf = load_hf(tiny_llama_dir)
    async with NitsumClient(tiny_stack.nats_url) as c:
        for prompt in ("Hello there", "The tiny model says", "a b c d e f g"):
            done = await c.complete(prompt, max_tokens=30, ignore_eos=True)
            ref = hf_greedy(hf, tok.encode_prompt(prompt), 30)
            assert done.token_ids == ref


async def test_sigkill_worker_mid_generation_reroutes_without_hanging(tiny_stack: Stack) -> None:
    async with NitsumClient(tiny_stack.nats_url) as c:
        reference = [await c.complete(p, max_tokens=N_TOKENS, ignore_eos=True) for p in PROMPTS]
        progress = dict.fromkeys(range(len(PROMPTS)), 0)

        async def run(i: int) -> list[int] | Exception:
            ids: list[int] = []
            try:
                async for chunk in c.generate(
                    PROMPTS[i], max_tokens=N_TOKENS, ignore_eos=True, timeout_s=120
                ):
                    ids.extend(chunk.token_ids)
                    progress[i] = len(ids)
            except WorkerLost as exc:
                return exc
            return ids

        tasks = [asyncio.create_task(run(i)) for i in range(len(PROMPTS))]
        while min(progress.values()) < 10:  # every request is generating
            await asyncio.sleep(0.05)
        status = await c.status()
        victim = max(status.workers, key=lambda w: w.in_flight).slot
        assert status.workers[victim].in_flight > 0
        killed_at = time.monotonic()
        tiny_stack.kill(f"worker{victim}", signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        elapsed = time.monotonic() - killed_at

        rerouted = 0
        for ref, got in zip(reference, results, strict=True):
            assert not isinstance(got, Exception), got
            # One continuous stream: the survivor re-prefills prompt + tokens so far and goes on.
            assert got == ref.token_ids
        status = await c.status()
        rerouted = status.rerouted
        assert rerouted >= 1
        assert [w.alive for w in sorted(status.workers, key=lambda w: w.slot)] == [victim != 0, victim != 1]
        assert elapsed < 60

        # The controller drops the dead slot from the topology (a new epoch, CAS-written).
        nc = await connect(tiny_stack.nats_url, name="test-faults")
        try:
            kv = await topology.open_bucket(nc.jetstream())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                topo, _ = await topology.read(kv)
                if topo and [i.slots for i in topo.instances] == [[1 - victim]]:
                    break
                await asyncio.sleep(0.2)
            assert [i.slots for i in topo.instances] == [[1 - victim]]
        finally:
            await nc.close()

        # And the survivor keeps serving new requests.
        again = await c.complete(PROMPTS[0], max_tokens=N_TOKENS, ignore_eos=True)
        assert again.token_ids == reference[0].token_ids


async def test_last_worker_killed_gives_clear_error_not_a_hang(tiny_stack: Stack) -> None:
    async with NitsumClient(tiny_stack.nats_url) as c:
        status = await c.status()
        survivors = [w.slot for w in status.workers if w.alive]
        assert len(survivors) == 1  # the previous test killed the other one

        async def run() -> Exception | None:
            try:
                async for chunk in c.generate("x " * 20, max_tokens=900, ignore_eos=True, timeout_s=120):
                    if chunk.token_ids:
                        tiny_stack.kill(f"worker{survivors[0]}", signal.SIGKILL)
            except Exception as exc:
                return exc
            return None

        t0 = time.monotonic()
        err = await asyncio.wait_for(run(), timeout=30)
        assert err is not None and err.code in ("no_workers", "worker_lost"), err
        assert "no live worker" in err.message or "died" in err.message
        assert time.monotonic() - t0 < 30
