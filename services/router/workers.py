"""The router's view of each worker slot: its last heartbeat, liveness and requests it holds."""

from __future__ import annotations

from dataclasses import dataclass, field

from nitsum_core.wire.control import WorkerView
from nitsum_core.wire.worker import WorkerHeartbeat


@dataclass
class WorkerState:
    """One slot as the router sees it; ``in_flight`` holds the ids of the requests sent to it."""

    slot: int
    heartbeat: WorkerHeartbeat
    last_seen: float
    alive: bool = True
    in_flight: set[str] = field(default_factory=set)

    def view(self, now: float) -> WorkerView:
        """This slot in a RouterStatus reply (``now``: time.monotonic())."""
        hb = self.heartbeat
        return WorkerView(
            slot=self.slot,
            alive=self.alive,
            running=hb.running,
            waiting=hb.waiting,
            in_flight=len(self.in_flight),
            free_blocks=hb.free_blocks,
            total_blocks=hb.total_blocks,
            last_seen_s=now - self.last_seen,
            epoch=hb.epoch,
            tp=hb.tp,
            rank=hb.rank,
            pool_joined=hb.pool_joined,
            tokens_prefilled=hb.tokens_prefilled,
            weight_bytes_moved=hb.weight_bytes_moved,
        )
