"""One rank of a TP test world (run as a subprocess by test_tp.py): greedy decode on a shard."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys

import torch
import torch.distributed as dist
from conftest import shares_storage
from nitsum_core.engine import tp as tpmod
from nitsum_core.engine.engine import Engine, EngineConfig, RequestParams, kv_num_blocks
from nitsum_core.engine.model import load_model

CONFIG = EngineConfig(block_size=4, kv_cache_mb=16)


def main() -> None:
    ckpt, rank, world, init, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    prompts = json.loads(sys.argv[6])
    max_tokens = int(sys.argv[7])
    torch.set_num_threads(1)
    timeout = dt.timedelta(seconds=float(os.environ.get("NITSUM_TEST_TP_TIMEOUT", "60")))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timeout)
    model = load_model(ckpt)
    group = dist.new_group(ranks=list(range(world)), backend="gloo")
    shard = tpmod.attach(model, world, rank, group)
    zero_copy = all(
        shares_storage(s[k], f[k])
        for s, f in zip(shard.layers, model.layers, strict=True)
        for k in ("qkv", "o", "gate_up", "down")
    )
    if rank != 0:
        # Followers: no scheduler, no block manager -- only the KV for their heads.
        kv = shard.new_kv_cache(kv_num_blocks(shard, CONFIG) * CONFIG.block_size)
        die_after = int(os.environ.get("NITSUM_TEST_DIE_AFTER", "0"))
        if die_after:  # fault injection: this follower vanishes mid-generation
            for _ in range(die_after):
                step = tpmod.broadcast_step(None, group, 0)
                shard.forward(*step, kv)
            os._exit(9)
        tpmod.follower_loop(shard, kv, group, leader=0)
    else:
        engine = Engine(shard, CONFIG, set(), tpmod.leader_hook(group, 0))
        try:
            tokens = engine.generate(prompts, RequestParams(max_tokens=max_tokens))
        except tpmod.PeerLost as exc:
            torch.save({"error": str(exc), "code": exc.code}, out)
            os._exit(0)
        # Logits of one more prefill, to compare numerically with TP 1.
        engine.add_request("probe", prompts[0], RequestParams(max_tokens=1))
        ids, meta = engine._build_metadata(engine.scheduler.schedule())
        tpmod.broadcast_step((ids, meta), group, 0)
        logits = shard.forward(ids, meta, engine.kv)
        tpmod.broadcast_step(None, group, 0)
        torch.save({"tokens": tokens, "logits": logits, "zero_copy": zero_copy}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
