"""A worker follows pool-change topologies in order, however fast they arrive.

Topologies written without a switch (a worker joined or died) reach the worker's asyncio side
through the bucket watch and are applied on its engine thread. The engine thread may not have
applied the previous one yet when the next arrives; a slot must still end in the last one's role.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from nitsum_core.engine.engine import EngineConfig
from nitsum_core.wire.cut import Topology, TopologyInstance
from nitsum_gpu_worker.worker import GpuWorker


def _topology(epoch: int, slots: list[int]) -> Topology:
    instances = [TopologyInstance(instance_id=n, slots=[s]) for n, s in enumerate(slots)]
    return Topology(epoch=epoch, instances=instances, written_at=time.time(), reason=f"pool {slots}")


def _worker(tiny_llama_dir: Path) -> GpuWorker:
    worker = GpuWorker(
        slot=0, nats_url="nats://unused", model=str(tiny_llama_dir), engine_config=EngineConfig(kv_cache_mb=8)
    )
    worker.runner = worker._load()
    return worker


def _drain(worker: GpuWorker) -> None:
    """Run the engine thread until it has handled every queued command, then stop it."""
    assert worker.runner is not None
    worker.runner.commands.put(None)
    thread = threading.Thread(target=worker.runner.run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "engine thread did not stop"


def test_slot_left_out_then_back_in_ends_with_an_engine(tiny_llama_dir: Path) -> None:
    # Slot 0 starts serving alone. Slot 1's heartbeat is seen first, so the first pool written is
    # [1]; a moment later slot 0's is seen and the pool becomes [0, 1]. Both topologies arrive
    # before the engine thread applies the first: slot 0 must end as the leader of [0], able to
    # take requests, not idle with no engine.
    worker = _worker(tiny_llama_dir)
    worker._on_topology(_topology(1, [1]))
    worker._on_topology(_topology(2, [0, 1]))
    _drain(worker)
    runner = worker.runner
    assert runner is not None
    assert runner.role.instance is not None and runner.role.instance.slots == [0]
    assert runner.engine is not None
    assert worker.epoch == 2


def test_slot_dropped_from_pool_gives_up_its_engine(tiny_llama_dir: Path) -> None:
    worker = _worker(tiny_llama_dir)
    worker._on_topology(_topology(1, [0, 1]))
    worker._on_topology(_topology(2, [1]))
    _drain(worker)
    assert worker.runner is not None
    assert worker.runner.role.instance is None and worker.runner.engine is None
