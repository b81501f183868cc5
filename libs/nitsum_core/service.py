"""What every Nitsum service process shares: signal handling and nats.micro registration."""

from __future__ import annotations

import asyncio
import signal

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import Service

from nitsum_core import __version__


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
