"""End to end through all four services on a real NATS with a real model (SmolLM2-135M)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from conftest import hf_greedy, load_hf
from nitsum_cli.stack import Stack, StackConfig
from nitsum_core.client import NitsumClient
from nitsum_core.engine.tokenizer import Tokenizer
from nitsum_core.errors import InvalidRequest, PromptTooLong, UnknownTier
from nitsum_core.wire import subjects, topology
from nitsum_core.wire.bus import connect
from nitsum_core.wire.client import ChatMessage, StreamChunk
from nitsum_core.wire.codec import decode, encode
from nitsum_core.wire.control import RouterWindowStats
from nitsum_core.wire.cut import Topology
from nitsum_core.wire.kv import KvListReply, KvListRequest, KvLocation, KvLookup
from nitsum_core.wire.worker import SamplingParams, SubmitAck, WorkerSubmit

CHAT = "What is the capital of France?"


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path):
    s = Stack(StackConfig(workers=2, home=tmp_path_factory.mktemp("smol-stack"), kv_cache_mb=256))
    await s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hf_smol(smollm2_dir: Path):
    return load_hf(smollm2_dir)


async def test_chat_greedy_equals_hf(stack: Stack, smollm2_dir: Path, hf_smol) -> None:
    tok = Tokenizer(smollm2_dir)
    for question in (CHAT, "Give me three tips for writing clear code."):
        prompt = tok.encode_chat([ChatMessage("user", question)])
        async with NitsumClient(stack.nats_url) as c:
            done = await c.complete(messages=[{"role": "user", "content": question}], max_tokens=40)
        assert done.usage.prompt_tokens == len(prompt)
        assert done.token_ids == hf_greedy(hf_smol, prompt, 40)
        assert done.text == tok.decode(done.token_ids)
        assert done.usage.ttft_s > 0 and done.usage.completion_tokens == len(done.token_ids)


async def test_eight_concurrent_requests_equal_their_single_runs(stack: Stack) -> None:
    prompts = [
        ("Once upon a time", 12),
        ("The quick brown fox jumps over the lazy dog. " * 6, 20),
        ("def fibonacci(n):", 30),
        ("List of prime numbers: 2, 3, 5,", 8),
        ("In 1492, Columbus", 25),
        ("Translate to French: good morning, how are you today? " * 3, 16),
        ("Q: What is 12 times 12?\nA:", 10),
        ("The mitochondria is", 35),
    ]
    async with NitsumClient(stack.nats_url) as c:
        singles = [await c.complete(p, max_tokens=n, ignore_eos=True) for p, n in prompts]
        together = await asyncio.gather(*[c.complete(p, max_tokens=n, ignore_eos=True) for p, n in prompts])
    for (_, n), one, many in zip(prompts, singles, together, strict=True):
        assert len(many.token_ids) == n
        assert many.token_ids == one.token_ids
        assert many.text == one.text
    assert {d.usage.worker_slot for d in together} == {0, 1}  # spread over both workers


async def _raw_request(nc, payload: bytes, timeout: float = 10.0) -> StreamChunk:
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(subjects.ROUTER_GENERATE, payload, reply=inbox)
    msg = await sub.next_msg(timeout=timeout)
    await sub.unsubscribe()
    return decode(StreamChunk, msg.data)


async def test_bad_input_gets_typed_errors_and_service_continues(stack: Stack) -> None:
    nc = await connect(stack.nats_url, name="test-bad-input")
    try:
        for garbage in (
            b"\x00\xffnot msgpack",
            b"",
            msgspec.msgpack.encode({"request_id": 5, "prompt": "hi"}),
        ):
            chunk = await _raw_request(nc, garbage)
            assert chunk.finished and chunk.error is not None
            assert chunk.error.code == "malformed" and "GenerateRequest" in chunk.error.message
        # Garbage straight at a worker's submit endpoint: a typed refusal, the worker lives on.
        resp = await nc.request(subjects.worker_submit(0), b"\xc1junk", timeout=5)
        ack = decode(SubmitAck, resp.data)
        assert not ack.accepted and ack.error.code == "malformed"
        # Well-formed but with an impossible TPOT target: refused, saying what was wrong.
        bad_tpot = WorkerSubmit(
            request_id="bad-tpot",
            router_id="test",
            prompt_ids=[1, 2, 3],
            sampling=SamplingParams(max_tokens=4),
            tpot_s=-0.01,
        )
        resp = await nc.request(subjects.worker_submit(0), encode(bad_tpot), timeout=5)
        ack = decode(SubmitAck, resp.data)
        assert not ack.accepted and ack.error.code == "invalid_request" and "tpot_s" in ack.error.message
        # A token batch of garbage to the router's token subject is dropped, not fatal.
        await nc.publish(subjects.router_tokens("nobody"), b"junk")
    finally:
        await nc.close()

    async with NitsumClient(stack.nats_url) as c:
        with pytest.raises(UnknownTier, match="known tiers: agent, background, interactive"):
            await c.complete("hi", tier="platinum")
        with pytest.raises(InvalidRequest, match="empty"):
            await c.complete("   ")
        with pytest.raises(InvalidRequest, match="exactly one"):
            await c.complete(None)
        with pytest.raises(PromptTooLong, match="context window is 4096"):
            await c.complete("word " * 5000, max_tokens=4)
        for bad in (0, -3, 10**9):
            with pytest.raises(InvalidRequest, match="max_tokens"):
                await c.complete("hello", max_tokens=bad)
        with pytest.raises(InvalidRequest, match="max_tokens <= "):
            await c.complete("word " * 4000, max_tokens=500)
        with pytest.raises(InvalidRequest, match="top_p"):
            await c.complete("hello", temperature=-1.0)
        ok = await c.complete(messages=[{"role": "user", "content": CHAT}], max_tokens=16)
        assert "Paris" in ok.text
        status = await c.status()
        assert all(w.alive for w in status.workers) and len(status.workers) == 2


async def test_stop_strings_and_cancel_free_the_worker(stack: Stack) -> None:
    async with NitsumClient(stack.nats_url) as c:
        full = await c.complete(messages=[{"role": "user", "content": CHAT}], max_tokens=20)
        assert "Paris" in full.text
        cut = await c.complete(messages=[{"role": "user", "content": CHAT}], max_tokens=20, stop=["Paris"])
        assert cut.finish_reason == "stop" and "Paris" not in cut.text
        assert full.text.startswith(cut.text) and cut.text.strip()

        seen = 0
        async for chunk in c.generate("Tell me a very long story.", max_tokens=400, ignore_eos=True):
            seen += len(chunk.token_ids)
            if seen >= 3:
                break  # the client cancels on exit from the stream
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = await c.status()
            if sum(w.in_flight for w in status.workers) == 0 and all(w.running == 0 for w in status.workers):
                break
            await asyncio.sleep(0.3)
        assert sum(w.in_flight for w in status.workers) == 0
        assert all(w.running == 0 and w.free_blocks == w.total_blocks for w in status.workers)


async def test_kv_broker_tracks_where_a_request_lives(stack: Stack) -> None:
    rid = "kv-" + uuid.uuid4().hex[:8]
    nc = await connect(stack.nats_url, name="test-kv")
    try:
        async with NitsumClient(stack.nats_url) as c:
            location = None
            stream = c.generate(
                "Write a long essay about rivers.", max_tokens=200, ignore_eos=True, request_id=rid
            )
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    if chunk.token_ids:
                        await asyncio.sleep(0.3)  # let the alloc event reach the broker
                        resp = await nc.request(subjects.KV_LOOKUP, encode(KvLookup(rid)), timeout=5)
                        location = decode(KvLocation, resp.data)
                        listed = await nc.request(
                            subjects.KV_LIST, encode(KvListRequest(slot=location.slot)), timeout=5
                        )
                        assert rid in [e.request_id for e in decode(KvListReply, listed.data).entries]
                        break
        assert location is not None and location.found
        assert location.slot in (0, 1) and location.block_ids and location.head_end == 3
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            resp = await nc.request(subjects.KV_LOOKUP, encode(KvLookup(rid)), timeout=5)
            if not decode(KvLocation, resp.data).found:
                break
            await asyncio.sleep(0.2)
        assert not decode(KvLocation, resp.data).found  # freed after cancel
    finally:
        await nc.close()


async def test_router_reports_arrival_offsets_and_what_is_in_flight(stack: Stack) -> None:
    # The controller's replay places every request where it arrived in the window and starts from
    # what is still in flight: the router's stats carry one length pair and one offset per
    # arrival, and the requests not finished when a window closes.
    nc = await connect(stack.nats_url, name="test-router-stats")
    reports: list[RouterWindowStats] = []

    async def collect(msg) -> None:  # noqa: ANN001
        reports.append(decode(RouterWindowStats, msg.data))

    sub = await nc.subscribe(subjects.ROUTER_STATS, cb=collect)
    try:
        async with NitsumClient(stack.nats_url) as c:
            long = c.complete("Tell a story:", max_tokens=160, ignore_eos=True, tier="agent")
            short = [c.complete(f"Count to {n}:", max_tokens=4, tier="agent") for n in range(2)]
            done = await asyncio.gather(long, *short)
        # The long request spans windows: some window closed while it was decoding.
        prompt_len = done[0].usage.prompt_tokens
        seen = [f for r in reports if "agent" in r.tiers for f in r.tiers["agent"].in_flight]
        decoding = [f for f in seen if f.prompt_tokens == prompt_len and f.generated > 0]
        assert decoding, f"no in-flight report of the long request in {len(reports)} windows"
        for f in decoding:
            assert f.ttft_s is not None and 0.0 < f.ttft_s <= f.age_s
            assert f.generated < f.output_tokens and f.generated <= 160
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and sum(_agent_arrivals(r) for r in reports) < 3:
            await asyncio.sleep(0.2)
        agent = [r.tiers["agent"] for r in reports if "agent" in r.tiers]
        assert sum(len(t.prompt_tokens) for t in agent) == 3
        for r, t in ((r, r.tiers["agent"]) for r in reports if "agent" in r.tiers):
            assert len(t.arrival_offsets_s) == len(t.prompt_tokens) == len(t.output_tokens)
            assert all(0.0 <= o <= r.window_s + 0.5 for o in t.arrival_offsets_s)
    finally:
        await sub.unsubscribe()
        await nc.close()


def _agent_arrivals(report: RouterWindowStats) -> int:
    return len(report.tiers["agent"].prompt_tokens) if "agent" in report.tiers else 0


async def test_topology_bucket_cas_and_service_discovery(stack: Stack) -> None:
    nc = await connect(stack.nats_url, name="test-topology")
    try:
        kv = await topology.open_bucket(nc.jetstream())
        topo, rev = await topology.read(kv)
        assert topo is not None and topo.epoch >= 1 and rev >= 1
        assert sorted(i.slots for i in topo.instances) == [[0], [1]]
        stale = Topology(epoch=topo.epoch + 1, instances=[], written_at=0.0, reason="rogue controller")
        with pytest.raises(topology.TopologyConflict):
            await topology.write_cas(kv, stale, rev - 1 if rev > 1 else rev + 5)
        assert (await topology.read(kv))[0] == topo  # unchanged

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        names: list[str] = []
        deadline = time.monotonic() + 1.0
        while (left := deadline - time.monotonic()) > 0:
            try:
                names.append(json.loads((await sub.next_msg(timeout=left)).data)["name"])
            except Exception:
                break
        assert sorted(set(names)) == sorted(
            [
                subjects.SERVICE_ROUTER,
                subjects.SERVICE_CONTROLLER,
                subjects.SERVICE_KV_BROKER,
                subjects.SERVICE_WORKER,
            ]
        )
        assert names.count(subjects.SERVICE_WORKER) == 2
        stats = await nc.request(f"$SRV.STATS.{subjects.SERVICE_ROUTER}", b"", timeout=2)
        endpoints = {e["name"]: e for e in json.loads(stats.data)["endpoints"]}
        assert endpoints["generate"]["num_requests"] > 0
    finally:
        await nc.close()
