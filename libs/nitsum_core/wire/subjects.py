"""Every NATS subject Nitsum uses, versioned, in one place.

Subjects are built by functions (not string formatting at call sites) so that a typo is an
AttributeError, and a protocol bump changes one constant.
"""

from __future__ import annotations

VERSION = "v1"
PREFIX = f"nitsum.{VERSION}"

# Client -> router: one GenerateRequest; the router streams StreamChunk messages to the reply inbox.
ROUTER_GENERATE = f"{PREFIX}.router.generate"
# Client -> router: cancel a request by id (CancelRequest), no reply needed.
ROUTER_CANCEL = f"{PREFIX}.router.cancel"
# Anyone -> router: RouterStatus snapshot (request/reply).
ROUTER_STATUS = f"{PREFIX}.router.status"

# Worker -> everyone: WorkerHeartbeat, periodically.
WORKER_HEARTBEAT = f"{PREFIX}.worker.heartbeat"

# kv_broker: workers publish KvEvent; anyone queries with KvLookup / KvListRequest.
KV_EVENTS = f"{PREFIX}.kv.events"
KV_LOOKUP = f"{PREFIX}.kv.lookup"
KV_LIST = f"{PREFIX}.kv.list"

# kv_broker: migration plan for a topology change (KvPlanRequest -> KvPlan).
KV_PLAN = f"{PREFIX}.kv.plan"

# tp_controller: Topology snapshot on request; a hand-triggered switch (ReconfigureRequest).
CONTROLLER_TOPOLOGY = f"{PREFIX}.controller.topology"
CONTROLLER_RECONFIGURE = f"{PREFIX}.controller.reconfigure"

# Router -> controller, once per control window: RouterWindowStats (arrivals and finishes by tier).
ROUTER_STATS = f"{PREFIX}.router.stats"
# Controller -> every router, once per control window in auto mode: AdmissionBudgets.
CONTROLLER_BUDGETS = f"{PREFIX}.controller.budgets"

# Controller -> every router (not a queue group): RouterHold, each router replies RouterHoldAck.
ROUTER_HOLD = f"{PREFIX}.router.hold"

# Rendezvous of the workers' torch.distributed world: JetStream KV bucket, key pool-<pool id>.
RENDEZVOUS_BUCKET = "nitsum_rendezvous"

# JetStream KV bucket holding the topology (key TOPOLOGY_KEY), written with compare-and-set.
TOPOLOGY_BUCKET = "nitsum_topology"
TOPOLOGY_KEY = "current"

# nats.micro service names (discoverable with `nats micro ls` or `nitsum status`).
SERVICE_ROUTER = "nitsum-router"
SERVICE_CONTROLLER = "nitsum-tp-controller"
SERVICE_KV_BROKER = "nitsum-kv-broker"
SERVICE_WORKER = "nitsum-gpu-worker"


def worker_submit(slot: int) -> str:
    """Router -> worker: WorkerSubmit (request/reply, replied with SubmitAck)."""
    return f"{PREFIX}.worker.{slot}.submit"


def worker_abort(slot: int) -> str:
    """Router -> worker: WorkerAbort, fire and forget."""
    return f"{PREFIX}.worker.{slot}.abort"


def router_tokens(router_id: str) -> str:
    """Worker -> router: one TokenBatch per engine step with every new token for that router."""
    return f"{PREFIX}.router.{router_id}.tokens"


RECONFIG_PHASES = ("pause", "migrate", "commit", "abort")


def worker_control(slot: int, phase: str) -> str:
    """Controller -> worker: one reconfiguration phase (request/reply; see RECONFIG_PHASES)."""
    if phase not in RECONFIG_PHASES:
        raise ValueError(f"unknown reconfiguration phase {phase!r}")
    return f"{PREFIX}.worker.{slot}.reconfig.{phase}"  # not .abort: that is a request abort
