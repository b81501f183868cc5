"""Tensor parallelism across real processes (gloo): TP 2 and 4 equal TP 1; slices are views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, load_hf, shares_storage
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams
from nitsum_core.engine.model import load_model

HERE = Path(__file__).parent


def _run_world(
    ckpt: Path, world: int, tmp: Path, prompts: list[list[int]], max_tokens: int, env: dict | None = None
) -> dict:
    init = f"file://{tmp / 'rendezvous'}"
    out = tmp / "rank0.pt"
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "tp_rank.py"), str(ckpt), str(r), str(world), init, str(out),
                          json.dumps(prompts), str(max_tokens)], env={**os.environ, **(env or {})},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]  # fmt: skip
    for p in procs:
        try:
            p.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("TP world did not finish (a collective hung)")
        assert p.returncode in (0, 9), p.stdout.read()
    return torch.load(out)


@pytest.mark.parametrize("world", [2, 4])
def test_tp_logits_and_tokens_equal_tp1(world: int, tiny_llama_dir: Path, tmp_path: Path) -> None:
    model = load_model(tiny_llama_dir)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_mb=16), eos_token_ids=set())
    prompts = [[5, 17, 923, 4000, 12, 7, 300, 31, 8], [1, 2, 3], list(range(100, 140))]
    ref_tokens = engine.generate(prompts, RequestParams(max_tokens=12))
    engine.add_request("probe", prompts[0], RequestParams(max_tokens=1))
    ids, meta = engine._build_metadata(engine.scheduler.schedule())
    ref_logits = model.forward(ids, meta, engine.kv)

    got = _run_world(tiny_llama_dir, world, tmp_path, prompts, 12)
    assert got["zero_copy"], "a TP slice copied weight bytes"
    torch.testing.assert_close(got["logits"], ref_logits, atol=1e-4, rtol=1e-4)
    assert got["tokens"] == ref_tokens


def test_shards_are_views_and_nest(tiny_llama_dir: Path) -> None:
    model = load_model(tiny_llama_dir)
    full = model.layers[0]
    for tp in (1, 2, 4):
        for r in range(tp):
            sh = model.shard(tp, r)
            assert model.shard(tp, r) is sh  # built once, cached
            for k in ("qkv", "o", "gate_up", "down"):
                assert shares_storage(sh.layers[0][k], full[k])
    # Aligned blocks nest: rank r of TP 4 lies inside rank r // 2 of TP 2.
    for r in range(4):
        inner, outer = model.shard(4, r).layers[0]["qkv"], model.shard(2, r // 2).layers[0]["qkv"]
        start = inner.data_ptr() - outer.data_ptr()
        assert (
            start >= 0
            and start + inner.numel() * inner.element_size() <= outer.numel() * outer.element_size()
        )
    with pytest.raises(ValueError, match="does not divide"):
        model.shard(3, 0)


def test_smollm2_at_tp3_equals_hf(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 has 3 KV heads: TP 3 splits it evenly; greedy tokens equal HF transformers'."""
    from nitsum_core.engine.tokenizer import Tokenizer
    from nitsum_core.wire.client import ChatMessage

    tok = Tokenizer(smollm2_dir)
    prompts = [
        tok.encode_chat([ChatMessage("user", q)])
        for q in ("What is the capital of France?", "Name three colours.")
    ]
    hf = load_hf(smollm2_dir)
    refs = [hf_greedy(hf, p, 6) for p in prompts]
    got = _run_world(smollm2_dir, 3, tmp_path, prompts, 6)
    assert got["zero_copy"] and got["tokens"] == refs


def test_dead_follower_surfaces_as_a_clear_error_within_the_timeout(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    t0 = time.monotonic()
    got = _run_world(
        tiny_llama_dir,
        2,
        tmp_path,
        [[1, 2, 3, 4]],
        50,
        env={"NITSUM_TEST_DIE_AFTER": "5", "NITSUM_TEST_TP_TIMEOUT": "10"},
    )
    assert got["code"] == "worker_lost" and "TP peer lost" in got["error"]
    assert time.monotonic() - t0 < 120  # start-up included; the collective itself gives up within 10 s
