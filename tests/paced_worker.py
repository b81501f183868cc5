"""A gpu worker slowed down for tests, and a Stack that starts its workers through it.

Small, fast models finish requests before a test can switch the pool under them; this wrapper
sleeps before every engine step (``NITSUM_TEST_STEP_DELAY_S``) and before executing a migrate
step (``NITSUM_TEST_MIGRATE_DELAY_S``, to drive the controller's abort path), then runs the real
worker entry point. Only this module reads those variables: the production worker has no hook.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nitsum_cli.stack import Stack, StackConfig

HERE = Path(__file__).parent
STEP_DELAY = "NITSUM_TEST_STEP_DELAY_S"
MIGRATE_DELAY = "NITSUM_TEST_MIGRATE_DELAY_S"


def pace_worker(step_delay_s: float, migrate_delay_s: float) -> None:
    """Patch the worker classes in this process: sleep before each step and each migrate."""
    from nitsum_gpu_worker.runner import SlotRunner
    from nitsum_gpu_worker.worker import GpuWorker

    if step_delay_s:
        step = SlotRunner._step

        def paced_step(self: SlotRunner) -> None:
            time.sleep(step_delay_s)
            step(self)

        SlotRunner._step = paced_step  # type: ignore[method-assign]
    if migrate_delay_s:
        handler = GpuWorker._control_handler

        def paced_handler(self: GpuWorker, phase: str) -> Callable[[Any], Awaitable[None]]:
            handle = handler(self, phase)
            if phase != "migrate":
                return handle

            async def late(request: Any) -> None:  # noqa: ANN401 - a nats.micro Request
                # On the event loop, as a slow peer would be: heartbeats and aborts still flow.
                await asyncio.sleep(migrate_delay_s)
                await handle(request)

            return late

        GpuWorker._control_handler = paced_handler  # type: ignore[method-assign]


class PacedStack(Stack):
    """A Stack whose workers run through this module; ``pace`` maps a slot to its delays (env)."""

    def __init__(self, config: StackConfig, pace: dict[int, dict[str, str]]) -> None:
        super().__init__(config)
        self.pace = pace

    def _spawn(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> None:
        if module == "nitsum_gpu_worker":
            slot = int(name.removeprefix("worker"))
            path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
            env = {**(env or {}), "PYTHONPATH": path, **self.pace.get(slot, {})}
            module = "paced_worker"
        super()._spawn(name, module, *args, env=env)


if __name__ == "__main__":
    pace_worker(float(os.environ.get(STEP_DELAY, "0")), float(os.environ.get(MIGRATE_DELAY, "0")))
    from nitsum_gpu_worker.__main__ import main

    main()
