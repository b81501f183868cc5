"""One request in flight at the router: its tokens, text stream, stop strings and timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nitsum_core.config import Tier
from nitsum_core.engine.tokenizer import IncrementalDetokenizer
from nitsum_core.wire.client import GenerateRequest


@dataclass
class Flight:
    req: GenerateRequest
    reply: str
    tier: Tier
    prompt_ids: list[int]
    detok: IncrementalDetokenizer
    deadline: float
    arrived: float = field(default_factory=time.monotonic)
    slot: int | None = None
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    seq: int = 0
    emitted_chars: int = 0
    reroutes: int = 0
    finished: bool = False
    lane: int = 0  # routing.Lane: the local queue it joins on its instance (worker priority)

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.req.stop), default=0)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def find_stop(self) -> int | None:
        """Index in the text where the first stop string starts, if any appeared."""
        text = self.detok.text
        # Only the tail can contain a new match: earlier text was already checked.
        start = max(0, self.emitted_chars - self.max_stop_len)
        hits = [i for s in self.req.stop if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def releasable_text(self, final: bool) -> str:
        """Text safe to send now: hold back a possible stop-string prefix until it is decided."""
        text = self.detok.text
        end = (
            len(text)
            if final or not self.req.stop
            else max(self.emitted_chars, len(text) - self.max_stop_len + 1)
        )
        out = text[self.emitted_chars : end]
        self.emitted_chars = end
        return out
