"""``python -m nitsum_gpu_worker``: run one worker process (normally started by ``nitsum up``)."""

from __future__ import annotations

import argparse

from nitsum_core.engine.checkpoints import DEFAULT_MODEL
from nitsum_core.engine.engine import EngineConfig
from nitsum_core.logs import run_async
from nitsum_core.wire.bus import env_nats_url
from nitsum_gpu_worker.worker import GpuWorker


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nitsum-gpu-worker",
        description="One Nitsum worker: loads the model once, runs the paged-KV continuous-batching engine "
        "for one device slot and serves it over NATS.",
    )
    p.add_argument("--slot", type=int, required=True, help="device slot index in the pool (0..N-1)")
    p.add_argument("--nats-url", default=env_nats_url() or "nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="'smollm2', a .gguf file or an HF safetensors directory"
    )
    p.add_argument(
        "--backend", choices=["cpu"], default="cpu", help="compute backend (cpu; cuda comes with TP)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--kv-cache-mb", type=int, default=512, help="KV cache size in MiB")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in one batch")
    p.add_argument(
        "--max-batched-tokens", type=int, default=512, help="token budget per step (chunked prefill)"
    )
    p.add_argument(
        "--tpot-sized-steps",
        action="store_true",
        help="cut each step's prompt tokens to keep the requests decoding in it within their tiers' "
        "TPOT targets, by the step time the engine learns from its own steps (default: every step "
        "takes the whole token budget, as vLLM's chunked prefill; see docs/architecture.md)",
    )
    p.add_argument("--max-model-len", type=int, default=4096, help="context window (capped by the model's)")
    p.add_argument(
        "--pool-size",
        type=int,
        default=1,
        help="slots in the pool (N); with N > 1 the worker joins the pool's gloo world so instances "
        "can run at TP > 1 and switch at runtime",
    )
    p.add_argument(
        "--pool-id",
        default="default",
        help="rendezvous key shared by one launch of the pool; use a fresh value per launch",
    )
    p.add_argument(
        "--advertise-host",
        default="127.0.0.1",
        help="address other workers reach this one at (slot 0's store)",
    )
    p.add_argument(
        "--resident-tp",
        type=int,
        default=1,
        help="keep only the weight slice of this TP degree resident (models that do not fit whole); "
        "the slot can then run this degree and higher ones that nest inside it",
    )
    p.add_argument(
        "--collective-timeout",
        type=float,
        default=30.0,
        help="seconds before a silent TP peer is declared lost",
    )
    return p


def main() -> None:
    a = parser().parse_args()
    cfg = EngineConfig(
        block_size=a.block_size,
        kv_cache_mb=a.kv_cache_mb,
        max_num_seqs=a.max_num_seqs,
        max_batched_tokens=a.max_batched_tokens,
        max_model_len=a.max_model_len,
        tpot_sized_steps=a.tpot_sized_steps,
    )
    if not 0 <= a.slot < a.pool_size:
        raise SystemExit(f"--slot {a.slot} is outside the pool (0..{a.pool_size - 1}); raise --pool-size")
    worker = GpuWorker(
        a.slot,
        a.nats_url,
        a.model,
        cfg,
        a.threads,
        pool_size=a.pool_size,
        pool_id=a.pool_id,
        advertise_host=a.advertise_host,
        resident_tp=a.resident_tp,
        collective_timeout_s=a.collective_timeout,
    )
    run_async(worker.run())


if __name__ == "__main__":
    main()
