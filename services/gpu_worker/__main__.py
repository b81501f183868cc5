"""``python -m nitsum_gpu_worker``: run one worker process (normally started by ``nitsum up``)."""

from __future__ import annotations

import argparse

from nitsum_core.bus import env_nats_url
from nitsum_core.checkpoints import DEFAULT_MODEL
from nitsum_core.engine import EngineConfig
from nitsum_core.logs import run_async
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
    p.add_argument("--max-model-len", type=int, default=4096, help="context window (capped by the model's)")
    return p


def main() -> None:
    a = parser().parse_args()
    cfg = EngineConfig(
        block_size=a.block_size,
        kv_cache_mb=a.kv_cache_mb,
        max_num_seqs=a.max_num_seqs,
        max_batched_tokens=a.max_batched_tokens,
        max_model_len=a.max_model_len,
    )
    run_async(GpuWorker(a.slot, a.nats_url, a.model, cfg, a.threads).run())


if __name__ == "__main__":
    main()
