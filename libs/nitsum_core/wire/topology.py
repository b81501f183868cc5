"""The topology in its JetStream KV bucket: open, read, compare-and-set write, watch.

Compare-and-set on the revision, so a second controller cannot fork the topology
(docs/architecture.md, pool and topology).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from nats.js.client import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from nitsum_core.wire import subjects
from nitsum_core.wire.codec import decode, encode
from nitsum_core.wire.cut import Topology

log = logging.getLogger(__name__)


async def open_bucket(js: JetStreamContext, create: bool = False, wait_s: float = 30.0) -> KeyValue:
    """The topology bucket; the controller creates it, everyone else waits for it to exist."""
    if create:
        return await js.create_key_value(bucket=subjects.TOPOLOGY_BUCKET, history=16)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return await js.key_value(subjects.TOPOLOGY_BUCKET)
        except BucketNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"topology bucket {subjects.TOPOLOGY_BUCKET!r} not created within {wait_s}s; is tp_controller running?"
                ) from None
            await asyncio.sleep(0.2)


async def read(kv: KeyValue) -> tuple[Topology | None, int]:
    """The current topology and its revision (None, 0 when none was written yet)."""
    try:
        entry = await kv.get(subjects.TOPOLOGY_KEY)
    except KeyNotFoundError:
        return None, 0
    if entry.value is None:
        return None, entry.revision or 0
    return decode(Topology, entry.value), entry.revision or 0


class TopologyConflict(Exception):
    """Someone else wrote the topology since we read it (another controller): re-read and decide again."""


async def write_cas(kv: KeyValue, topology: Topology, last_revision: int) -> int:
    """Write ``topology`` only if the stored revision is still ``last_revision``; return the new one."""
    data = encode(topology)
    try:
        if last_revision == 0:
            return await kv.create(subjects.TOPOLOGY_KEY, data)
        return await kv.update(subjects.TOPOLOGY_KEY, data, last=last_revision)
    except KeyWrongLastSequenceError as exc:
        raise TopologyConflict(str(exc)) from None
    except Exception as exc:  # create() on an existing key raises a generic API error
        if "wrong last sequence" in str(exc).lower() or "key exists" in str(exc).lower():
            raise TopologyConflict(str(exc)) from None
        raise


async def watch(kv: KeyValue, on_change: Callable[[Topology], Awaitable[None] | None]) -> None:
    """Call ``on_change`` with every topology written (the current one first); runs until cancelled."""
    watcher = await kv.watch(subjects.TOPOLOGY_KEY)
    try:
        async for entry in watcher:
            if entry is None or entry.value is None:
                continue
            try:
                topo = decode(Topology, entry.value)
            except Exception as exc:
                log.error("ignored undecodable topology revision %s: %s", entry.revision, exc)
                continue
            result = on_change(topo)
            if asyncio.iscoroutine(result):
                await result
    finally:
        await watcher.stop()
