"""A switch's hold on new dispatches (docs/architecture.md#switch-protocol), and the aborts it must replay on release."""

from __future__ import annotations

import asyncio
import time


class DispatchHold:
    """Held between a controller's hold and its release; a hold never outlasts ``max_hold_s``."""

    def __init__(self, max_hold_s: float) -> None:
        self.max_hold_s = max_hold_s
        self.held_by: str | None = None  # plan id of the switch holding new dispatches
        self._unheld = asyncio.Event()
        self._unheld.set()
        self._since = 0.0
        # Requests aborted while a switch holds (request id -> slot): a paused leader has already
        # exported them, so their new leader adopts them at commit. Aborted again on release.
        self.abort_after: dict[str, int] = {}

    @property
    def held(self) -> bool:
        return not self._unheld.is_set()

    def hold(self, plan_id: str) -> None:
        self.held_by, self._since = plan_id, time.monotonic()
        self._unheld.clear()

    def release(self, plan_id: str) -> dict[str, int] | None:
        """Release ``plan_id``'s hold; the requests to abort again (None: held by another plan)."""
        if self.held_by not in (None, plan_id):
            return None
        self.held_by = None
        self._unheld.set()
        orphans, self.abort_after = self.abort_after, {}
        return orphans

    async def wait(self) -> str | None:
        """Return once not held; the plan id of a hold that expired without a release, if one did."""
        if self._unheld.is_set():
            return None
        left = self.max_hold_s - (time.monotonic() - self._since)
        try:
            await asyncio.wait_for(self._unheld.wait(), timeout=max(0.0, left))
        except TimeoutError:
            expired, self.held_by = self.held_by, None
            self._unheld.set()
            return expired
        return None
