"""Structured logging setup shared by every service (structlog over stdlib logging)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

import structlog


def setup_logging(service: str, level: str | None = None) -> structlog.stdlib.BoundLogger:
    """Configure key=value logs on stderr, tagged with the service name; return its logger."""
    lvl = getattr(logging, (level or os.environ.get("NITSUM_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=lvl, format="%(message)s")
    for noisy in ("transformers", "nats", "asyncio"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "service", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    return structlog.get_logger().bind(service=service)


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine on uvloop when it is available (faster NATS I/O)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
