"""The pool cut every service reads: the Topology in the TOPOLOGY_BUCKET, carried by switches."""

from __future__ import annotations

from typing import Literal

import msgspec


class TopologyInstance(msgspec.Struct, kw_only=True):
    """One serving instance: an aligned block of slots running at TP ``len(slots)``."""

    instance_id: int
    slots: list[int]
    role: Literal["prefill", "decode", "mixed"] = "mixed"
    tiers: list[str] = msgspec.field(default_factory=list)  # empty: every tier

    @property
    def tp(self) -> int:
        return len(self.slots)

    @property
    def leader(self) -> int:
        return self.slots[0]


class Topology(msgspec.Struct, kw_only=True):
    """Epoch ``epoch`` of the pool cut; stored in the TOPOLOGY_BUCKET KV bucket."""

    epoch: int
    instances: list[TopologyInstance]
    written_at: float
    reason: str = ""

    @property
    def slots(self) -> list[int]:
        """Every slot the cut uses, in order."""
        return sorted(s for i in self.instances for s in i.slots)
