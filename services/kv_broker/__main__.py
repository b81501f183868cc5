"""``python -m nitsum_kv_broker``: run the KV broker (normally started by ``nitsum up``)."""

from __future__ import annotations

import argparse

from nitsum_core.logs import run_async
from nitsum_core.wire.bus import env_nats_url
from nitsum_kv_broker.broker import KvBroker


def main() -> None:
    p = argparse.ArgumentParser(
        prog="nitsum-kv-broker",
        description="Nitsum KV broker: directory of which worker holds which request's KV blocks; "
        "queryable over NATS (nitsum.v1.kv.lookup / nitsum.v1.kv.list).",
    )
    p.add_argument("--nats-url", default=env_nats_url() or "nats://127.0.0.1:4222", help="NATS server URL")
    a = p.parse_args()
    run_async(KvBroker(a.nats_url).run())


if __name__ == "__main__":
    main()
