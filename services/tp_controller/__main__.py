"""``python -m nitsum_tp_controller``: run the TP controller (normally started by ``nitsum up``)."""

from __future__ import annotations

import argparse

from nitsum_core.bus import env_nats_url
from nitsum_core.logs import run_async
from nitsum_tp_controller.controller import Controller


def main() -> None:
    p = argparse.ArgumentParser(
        prog="nitsum-tp-controller",
        description="Nitsum TP controller: owns the pool topology (epochs) in a JetStream KV bucket, "
        "written with compare-and-set. Static TP-1 per worker for now.",
    )
    p.add_argument("--nats-url", default=env_nats_url() or "nats://127.0.0.1:4222", help="NATS server URL")
    p.add_argument(
        "--worker-timeout",
        type=float,
        default=2.0,
        help="seconds without heartbeat before a worker leaves the pool",
    )
    a = p.parse_args()
    run_async(Controller(a.nats_url, a.worker_timeout).run())


if __name__ == "__main__":
    main()
