"""``nitsum status`` and ``nitsum reconfigure``: talk to a running pool over NATS."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nitsum_core.errors import NotRunning


def resolve_url(url: str | None) -> str:
    """The NATS URL of the stack to talk to: ``url``, $NITSUM_NATS_URL, or the running stack's."""
    import os

    from nitsum_cli.stack import running_stack_url

    found = url or os.environ.get("NITSUM_NATS_URL") or running_stack_url()
    if not found:
        raise NotRunning("no running stack found: start one with `nitsum up` or pass --nats-url")
    return found


# ---- status -------------------------------------------------------------------------------------
def print_status(status, topo=None, services=None) -> None:  # noqa: ANN001
    """Print a RouterStatus (and the Topology and services, when given) as a table."""
    print(f"router {status.router_id}: topology epoch {status.epoch}; completed {status.completed}, "
          f"failed {status.failed}, rerouted {status.rerouted}")  # fmt: skip
    if topo is not None:
        for inst in topo.instances:
            tiers = ",".join(inst.tiers) or "all tiers"
            print(
                f"  instance {inst.instance_id}: slots {inst.slots} (TP {len(inst.slots)}), {inst.role}, {tiers}"
            )
    print(
        f"  {'slot':>4} {'alive':>5} {'TP.rank':>7} {'running':>7} {'waiting':>7} {'in-flight':>9} {'KV free':>12} "
        f"{'seen':>6} {'pool':>5}"
    )
    for w in status.workers:
        role = f"{w.tp}.{w.rank}"
        print(f"  {w.slot:>4} {'yes' if w.alive else 'NO':>5} {role:>7} {w.running:>7} {w.waiting:>7} "
              f"{w.in_flight:>9} {w.free_blocks:>5}/{w.total_blocks:<6} {w.last_seen_s:>5.1f}s "
              f"{'yes' if w.pool_joined else '-':>5}")  # fmt: skip
    print("  queue depth by tier: " + ", ".join(f"{k}={v}" for k, v in status.in_flight_by_tier.items()))
    if status.budgets:
        budgets = ", ".join(f"{k}={v:.2f}" for k, v in sorted(status.budgets.items()))
        print(f"  admission budgets (feasible req/s, AIMD scale {status.budget_scale:.2f}): {budgets}")
    if services:
        print("  services: " + ", ".join(f"{n}×{c}" for n, c in sorted(services.items())))


async def status(a: argparse.Namespace) -> int:
    """``nitsum status``: the router's view, the topology and the services that answer a ping."""
    import msgspec
    from nitsum_core.client import NitsumClient
    from nitsum_core.wire import subjects
    from nitsum_core.wire.bus import connect
    from nitsum_core.wire.codec import decode
    from nitsum_core.wire.cut import Topology

    url = resolve_url(a.nats_url)
    async with NitsumClient(url) as client:
        status = await client.status()
        nc = await connect(url, name="nitsum-status")
        try:
            topo = decode(Topology, (await nc.request(subjects.CONTROLLER_TOPOLOGY, b"", timeout=2)).data)
        except Exception:
            topo = None
        # nats.micro discovery: every service instance answers $SRV.PING.
        services: dict[str, int] = {}
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.PING", b"", reply=inbox)
        deadline = time.monotonic() + 0.5
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:
                break
            name = json.loads(msg.data).get("name", "?")
            services[name] = services.get(name, 0) + 1
        await nc.close()
    if a.json:
        print(
            json.dumps(
                {
                    "router": msgspec.to_builtins(status),
                    "topology": msgspec.to_builtins(topo),
                    "services": services,
                },
                indent=2,
            )
        )
    else:
        print_status(status, topo, services)
    return 0


# ---- reconfigure --------------------------------------------------------------------------------
async def reconfigure(a: argparse.Namespace) -> int:
    """``nitsum reconfigure``: switch the pool to a cut given by ``--tp`` or a JSON file."""
    import msgspec
    from nitsum_core.client import NitsumClient
    from nitsum_core.wire.cut import TopologyInstance

    tp = instances = None
    if a.tp:
        try:
            tp = [int(x) for x in a.tp.split(",")]
        except ValueError:
            raise ValueError(f"--tp must be comma-separated integers like 2,2; got {a.tp!r}") from None
    else:
        data = json.loads(Path(a.file).read_text())
        instances = [
            TopologyInstance(
                instance_id=i, slots=d["slots"], role=d.get("role", "mixed"), tiers=d.get("tiers", [])
            )
            for i, d in enumerate(data["instances"])
        ]
    async with NitsumClient(resolve_url(a.nats_url)) as client:
        result = await client.reconfigure(tp=tp, instances=instances, timeout_s=a.timeout)
    if a.json:
        print(json.dumps(msgspec.to_builtins(result), indent=2))
        return 0
    print(
        f"switched to epoch {result.epoch}: {result.requests_moved} requests moved, "
        f"{result.requests_recomputed} recomputed, {result.kv_bytes_moved / 1e6:.2f} MB of KV over "
        f"{result.transfers} transfers, {result.weight_bytes_moved} weight bytes moved"
    )
    for phase, sec in result.phases.items():
        print(f"  {phase:<8} {sec * 1000:9.2f} ms")
    return 0
