"""Wire protocol: every message round-trips; bad bytes give a clean, typed error."""

from __future__ import annotations

import msgspec
import pytest
from nitsum_core.errors import ProtocolError, UnknownTier, error_class
from nitsum_core.wire import client, codec, control, cut, kv, reconfiguration, subjects, worker

CONVERSATIONS = (codec, client, worker, cut, kv, reconfiguration, control)
# Every Struct a conversation module defines: each must have a sample below and decode cleanly.
MESSAGE_TYPES: list[type[msgspec.Struct]] = [
    v
    for mod in CONVERSATIONS
    for v in vars(mod).values()
    if isinstance(v, type) and issubclass(v, msgspec.Struct) and v.__module__ == mod.__name__
]

SAMPLES: list[msgspec.Struct] = [
    codec.ErrorInfo(code="unknown_tier", message="no such tier"),
    client.ChatMessage(role="user", content="héllo ✓"),
    client.GenerateRequest(
        request_id="r1",
        tier="agent",
        messages=[client.ChatMessage("system", "be brief"), client.ChatMessage("user", "hi")],
        max_tokens=7,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        stop=["\n\n"],
        ignore_eos=True,
        timeout_s=12.5,
    ),
    client.GenerateRequest(request_id="r2", prompt="plain"),
    client.Usage(
        prompt_tokens=3, completion_tokens=4, ttft_s=0.1, tpot_s=0.02, e2e_s=0.2, worker_slot=1, reroutes=1
    ),
    client.StreamChunk(
        request_id="r1",
        seq=3,
        text="abc",
        token_ids=[1, 2],
        finished=True,
        finish_reason="length",
        usage=client.Usage(
            prompt_tokens=1, completion_tokens=2, ttft_s=0.0, tpot_s=0.0, e2e_s=0.0, worker_slot=0
        ),
    ),
    client.StreamChunk(request_id="r1", seq=1, error=codec.ErrorInfo("timeout", "too slow"), finished=True),
    client.CancelRequest("r1"),
    worker.SamplingParams(max_tokens=5, temperature=1.0, top_p=0.5, seed=9, ignore_eos=False),
    worker.WorkerSubmit(
        request_id="r1",
        router_id="rt",
        prompt_ids=[1, 2, 3],
        sampling=worker.SamplingParams(max_tokens=2),
        priority=2,
        epoch=4,
        ttft_left_s=0.25,
        tpot_s=0.03,
    ),
    worker.SubmitAck(request_id="r1", accepted=False, error=codec.ErrorInfo("invalid_request", "bad")),
    worker.WorkerAbort("r1"),
    worker.TokenItem(request_id="r1", token_ids=[5], finished=True, finish_reason="stop"),
    worker.TokenBatch(
        slot=1,
        step=10,
        items=[
            worker.TokenItem(request_id="a", token_ids=[1]),
            worker.TokenItem(request_id="b", token_ids=[]),
        ],
    ),
    worker.WorkerHeartbeat(
        slot=0,
        worker_id="w",
        pid=1,
        model="smollm2",
        max_model_len=4096,
        running=1,
        waiting=2,
        free_blocks=3,
        total_blocks=4,
        block_size=16,
        steps=5,
        tokens_generated=6,
        sent_at=1.5,
    ),  # fmt: skip
    kv.KvEvent(
        slot=0, request_id="r", kind="alloc", block_ids=[4, 5], head_start=0, head_end=3, num_tokens=20
    ),
    kv.KvLookup("r"),
    kv.KvLocation(request_id="r", found=True, slot=1, block_ids=[1], head_start=0, head_end=3, num_tokens=9),
    kv.KvListRequest(slot=None),
    kv.KvListReply(entries=[kv.KvLocation(request_id="x", found=True)]),
    cut.TopologyInstance(instance_id=0, slots=[0, 1], role="decode", tiers=["interactive"]),
    cut.Topology(
        epoch=3, instances=[cut.TopologyInstance(instance_id=0, slots=[0])], written_at=1.0, reason="test"
    ),
    control.WorkerView(
        slot=0, alive=True, running=1, waiting=0, in_flight=1, free_blocks=1, total_blocks=2, last_seen_s=0.1
    ),
    control.RouterStatus(
        router_id="r",
        epoch=1,
        workers=[],
        in_flight_by_tier={"interactive": 1},
        completed=1,
        failed=0,
        rerouted=0,
        tiers=["interactive"],
        budgets={"interactive": 3.5},
        budget_scale=0.8,
    ),  # fmt: skip
    _state := kv.RequestState(
        request_id="r",
        router_id="rt",
        slot=2,
        token_ids=[1, 2, 3],
        num_prompt_tokens=2,
        num_computed=2,
        priority=1,
        sampling=worker.SamplingParams(max_tokens=4, temperature=0.5, seed=1),
        rng_state=b"\x00\x01",
        block_table=[7],
        ttft_left_s=-0.5,
        tpot_s=0.03,
        since_first_s=1.25,
    ),
    _topo := cut.Topology(
        epoch=4, instances=[cut.TopologyInstance(instance_id=0, slots=[0, 1])], written_at=2.0
    ),
    reconfiguration.ReconfigPause(plan_id="p", target=_topo),
    reconfiguration.PauseAck(
        slot=1, ok=True, requests=[_state], kv_units=64, num_kv_heads=4, block_size=16, seconds=0.1
    ),
    _transfer := kv.KvTransfer(
        request_id="r", src_slot=2, dst_slot=0, head_start=0, head_end=2, num_tokens=2
    ),
    kv.MovedRequest(request_id="r", leader=0, block_table=[3]),
    kv.KvPlanRequest(
        old=_topo, new=_topo, requests=[_state], kv_units={0: 64, 1: 64}, num_kv_heads=4, block_size=16
    ),
    _plan := kv.KvPlan(
        assignments=[kv.MovedRequest(request_id="r", leader=0, block_table=[])],
        transfers=[_transfer],
        recomputed=["r"],
    ),
    reconfiguration.ReconfigMigrate(plan_id="p", target=_topo, plan=_plan, requests=[_state]),
    reconfiguration.ReconfigCommit(plan_id="p", target=_topo, held_s=0.08),
    reconfiguration.ReconfigAbort(plan_id="p", reason="timeout"),
    reconfiguration.ControlAck(
        slot=0, ok=False, error=codec.ErrorInfo("worker_lost", "peer gone"), bytes_sent=5, seconds=0.2
    ),
    control.RouterHold(plan_id="p", hold=False, moved={"r": 0}),
    control.RouterHoldAck(router_id="rt", held=3),
    control.TierWindowStats(
        prompt_tokens=[12, 40],
        output_tokens=[64, 64],
        arrival_offsets_s=[0.1, 0.7],
        finished=3,
        good=2,
        in_flight=[
            control.InFlightRequest(prompt_tokens=30, output_tokens=64, age_s=1.5),
            control.InFlightRequest(prompt_tokens=8, output_tokens=64, age_s=0.9, ttft_s=0.2, generated=12),
        ],
    ),
    control.InFlightRequest(prompt_tokens=3, output_tokens=5, age_s=0.5),
    control.RouterWindowStats(
        router_id="rt",
        window_s=1.0,
        tiers={"interactive": control.TierWindowStats(prompt_tokens=[5], finished=1)},
    ),
    control.AdmissionBudgets(epoch=3, budgets={"interactive": 2.5}),
    control.ReconfigureRequest(tp=[2, 2], reason="test", timeout_s=5.0),
    control.ReconfigureResult(
        ok=True, epoch=5, phases={"pause": 0.01}, requests_moved=1, transfers=2, kv_bytes_moved=10
    ),
]


def test_every_message_type_has_a_sample() -> None:
    assert {type(s) for s in SAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trip(msg: msgspec.Struct) -> None:
    data = codec.encode(msg)
    assert isinstance(data, bytes)
    assert codec.decode(type(msg), data) == msg


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe\x00garbage", b"not msgpack at all", b"\x01"])
def test_garbage_raises_typed_error(cls: type, garbage: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        codec.decode(cls, garbage)
    assert cls.__name__ in str(info.value)
    assert info.value.code == "malformed"


def test_class_names_never_travel() -> None:
    # Structs are untagged maps of their fields: renaming a class keeps the bytes on the wire.
    data = codec.encode(kv.MovedRequest(request_id="r", leader=0, block_table=[3]))
    assert msgspec.msgpack.decode(data) == {"request_id": "r", "leader": 0, "block_table": [3]}


def test_wrong_field_type_is_reported() -> None:
    bad = msgspec.msgpack.encode({"request_id": "x", "max_tokens": "many"})
    with pytest.raises(ProtocolError, match="max_tokens"):
        codec.decode(client.GenerateRequest, bad)


def test_missing_required_field_is_reported() -> None:
    with pytest.raises(ProtocolError, match="request_id"):
        codec.decode(client.GenerateRequest, msgspec.msgpack.encode({"prompt": "hi"}))


def test_error_info_maps_back_to_exception_class() -> None:
    exc = codec.ErrorInfo("unknown_tier", "no tier x").to_exc()
    assert isinstance(exc, UnknownTier) and exc.message == "no tier x"
    assert error_class("from-the-future").__name__ == "NitsumError"


def test_subjects_are_versioned_and_distinct() -> None:
    names = [
        subjects.ROUTER_GENERATE, subjects.ROUTER_CANCEL, subjects.ROUTER_STATUS, subjects.WORKER_HEARTBEAT,
        subjects.KV_EVENTS, subjects.KV_LOOKUP, subjects.KV_LIST, subjects.CONTROLLER_TOPOLOGY,
        subjects.worker_submit(0), subjects.worker_abort(0), subjects.router_tokens("abc"),
    ]  # fmt: skip
    assert all(s.startswith("nitsum.v1.") for s in names)
    assert len(set(names)) == len(names)


def test_per_slot_subjects_never_collide() -> None:
    # A reconfiguration "abort" must not land on the request-abort subscription (or vice versa).
    per_slot = [subjects.worker_submit(3), subjects.worker_abort(3)] + [
        subjects.worker_control(3, p) for p in subjects.RECONFIG_PHASES
    ]
    assert len(set(per_slot)) == len(per_slot)
    with pytest.raises(ValueError, match="unknown reconfiguration phase"):
        subjects.worker_control(0, "resume")
