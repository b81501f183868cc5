"""What every Nitsum service process shares: signal handling and nats.micro registration."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import Service

from nitsum_core import __version__
from nitsum_core.errors import ProtocolError
from nitsum_core.wire.codec import T, decode


async def register(
    nc: Client, name: str, description: str, metadata: dict[str, str] | None = None
) -> Service:
    """Register a nats.micro service so `nats micro ls/ping/stats` and `nitsum status` see it."""
    return await add_service(
        nc, name=name, version=__version__, description=description, metadata=metadata or {}
    )


def stop_event_on_signals() -> asyncio.Event:
    """An event set on SIGTERM/SIGINT, so services drain and exit instead of dying mid-message."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def decode_or_drop(log: Any, cls: type[T], data: bytes, what: str) -> T | None:
    """Decode a fire-and-forget message; a malformed one is logged and dropped (None), never fatal."""
    try:
        return decode(cls, data)
    except ProtocolError as exc:
        log.warning(f"dropped malformed {what}", error=str(exc))
        return None
