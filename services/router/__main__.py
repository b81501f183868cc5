"""``python -m nitsum_router``: run the router (normally started by ``nitsum up``)."""

from __future__ import annotations

import argparse

from nitsum_core.config import load_tiers
from nitsum_core.engine.checkpoints import DEFAULT_MODEL
from nitsum_core.logs import run_async
from nitsum_core.wire.bus import env_nats_url
from nitsum_router.router import Router, RouterConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nitsum-router",
        description="Nitsum router: validates and tokenises requests, routes them to workers by the "
        "current topology, streams tokens back and records TTFT/TPOT.",
    )
    p.add_argument("--nats-url", default=env_nats_url() or "nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model whose tokenizer to use (same as the workers')"
    )
    p.add_argument("--tiers", default=None, help="tier TOML file (default: the packaged default_tiers.toml)")
    p.add_argument(
        "--worker-timeout", type=float, default=2.0, help="seconds without heartbeat before a worker is dead"
    )
    p.add_argument(
        "--max-in-flight", type=int, default=4096, help="requests in flight before new ones are refused"
    )
    return p


def main() -> None:
    a = parser().parse_args()
    cfg = RouterConfig(worker_timeout_s=a.worker_timeout, max_in_flight=a.max_in_flight)
    run_async(Router(a.nats_url, a.model, load_tiers(a.tiers), cfg).run())


if __name__ == "__main__":
    main()
