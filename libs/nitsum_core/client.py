"""The Nitsum client SDK.

    async with NitsumClient("nats://127.0.0.1:4222") as c:
        async for chunk in c.generate("Hello", tier="interactive", max_tokens=32):
            print(chunk.text, end="")

Close a stream you leave early with ``contextlib.aclosing`` (or leave the client's ``async with``)
so the worker stops generating at once. Errors arrive as typed exceptions (``UnknownTier``, ``PromptTooLong``, ``WorkerLost``...), all
subclasses of ``NitsumError``. ``generate_sync`` is the blocking one-shot helper.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.errors import NoServersError

from nitsum_core.errors import NitsumError, NotRunning, ProtocolError, RequestTimeout
from nitsum_core.wire import subjects
from nitsum_core.wire.bus import connect
from nitsum_core.wire.client import CancelRequest, ChatMessage, GenerateRequest, StreamChunk, Usage
from nitsum_core.wire.codec import decode, encode
from nitsum_core.wire.control import ReconfigureRequest, ReconfigureResult, RouterStatus
from nitsum_core.wire.cut import TopologyInstance


@dataclass
class Completion:
    """A whole generation: text, token ids, why it stopped, and the router's timings."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    first_chunk_at: float = 0.0  # client-side monotonic times, for loadgen's own TTFT
    chunk_times: list[float] = field(default_factory=list)


class NitsumClient:
    def __init__(self, nats_url: str, accept_timeout_s: float = 10.0) -> None:
        self.nats_url = nats_url
        self.accept_timeout_s = accept_timeout_s
        self.nc: Client | None = None
        # Streams the caller may have abandoned without closing (``break`` out of ``async for``
        # leaves an async generator open until it is garbage-collected): cancelled on exit.
        self._open: set[str] = set()

    async def __aenter__(self) -> NitsumClient:
        try:
            self.nc = await connect(self.nats_url, name="nitsum-client", allow_reconnect=True)
        except (TimeoutError, NoServersError, OSError) as exc:
            raise NotRunning(
                f"cannot reach NATS at {self.nats_url} ({exc}); is `nitsum up` running?"
            ) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.nc is None:
            return
        if self._open and self.nc.is_connected:
            for request_id in self._open:
                await self.nc.publish(subjects.ROUTER_CANCEL, encode(CancelRequest(request_id)))
            await self.nc.flush()
        self._open.clear()
        await self.nc.close()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | list[ChatMessage] | None = None,
        tier: str = "interactive",
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        timeout_s: float = 300.0,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """Stream chunks of one generation; the last has ``finished`` and ``usage``."""
        if self.nc is None:
            raise RuntimeError("use `async with NitsumClient(url) as client`")
        chat = None
        if messages is not None:
            chat = [
                x if isinstance(x, ChatMessage) else ChatMessage(x["role"], x["content"]) for x in messages
            ]
        req = GenerateRequest(
            request_id=request_id or uuid.uuid4().hex,
            tier=tier,
            prompt=prompt,
            messages=chat,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop or []),
            ignore_eos=ignore_eos,
            timeout_s=timeout_s,
        )
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox)
        finished = False
        self._open.add(req.request_id)
        try:
            await self.nc.publish(subjects.ROUTER_GENERATE, encode(req), reply=inbox)
            deadline = time.monotonic() + timeout_s + 5.0
            accepted = False
            while True:
                wait = self.accept_timeout_s if not accepted else max(0.1, deadline - time.monotonic())
                try:
                    msg = await sub.next_msg(timeout=wait)
                except TimeoutError:  # nats' TimeoutError subclasses it
                    if not accepted:
                        raise NotRunning(
                            f"no router answered within {self.accept_timeout_s}s; is `nitsum up` running?"
                        ) from None
                    raise RequestTimeout(
                        f"request {req.request_id} got no answer within {timeout_s}s"
                    ) from None
                chunk = decode(StreamChunk, msg.data)
                accepted = True
                if chunk.error is not None:
                    finished = True
                    raise chunk.error.to_exc()
                if chunk.finished:
                    finished = True
                yield chunk
                if finished:
                    return
        finally:
            self._open.discard(req.request_id)
            if self.nc.is_connected:
                await sub.unsubscribe()
                if not finished:
                    # The caller stopped reading (break, cancel, error): free the worker's KV now.
                    await self.nc.publish(subjects.ROUTER_CANCEL, encode(CancelRequest(req.request_id)))

    async def complete(self, prompt: str | None = None, **kwargs: object) -> Completion:
        """Run one generation to the end and return it whole."""
        text: list[str] = []
        ids: list[int] = []
        times: list[float] = []
        last: StreamChunk | None = None
        async for chunk in self.generate(prompt, **kwargs):  # type: ignore[arg-type]
            if chunk.seq == 0:
                continue
            times.append(time.monotonic())
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        if last is None or last.usage is None:
            raise ProtocolError("stream ended without a final chunk")
        return Completion(
            request_id=last.request_id,
            text="".join(text),
            token_ids=ids,
            finish_reason=last.finish_reason or "stop",
            usage=last.usage,
            first_chunk_at=times[0] if times else 0.0,
            chunk_times=times,
        )

    async def status(self, timeout_s: float = 2.0) -> RouterStatus:
        assert self.nc is not None
        try:
            msg = await self.nc.request(subjects.ROUTER_STATUS, b"", timeout=timeout_s)
        except Exception as exc:
            raise NotRunning(f"no router answered the status request ({type(exc).__name__})") from None
        return decode(RouterStatus, msg.data)

    async def reconfigure(
        self,
        tp: list[int] | None = None,
        instances: list[TopologyInstance] | None = None,
        reason: str = "manual",
        timeout_s: float = 30.0,
    ) -> ReconfigureResult:
        """Switch the pool to a new cut (TP degrees in slot order, or explicit instances).

        In-flight requests keep generating on their new instances; raises the switch's error
        (e.g. ``ReconfigFailed``) if it was aborted -- the pool is then back on the old epoch.
        """
        assert self.nc is not None
        req = ReconfigureRequest(tp=tp, instances=instances, reason=reason, timeout_s=timeout_s)
        try:
            msg = await self.nc.request(
                subjects.CONTROLLER_RECONFIGURE, encode(req), timeout=timeout_s + 30.0
            )
        except Exception as exc:
            raise NotRunning(
                f"no tp_controller answered the reconfigure request ({type(exc).__name__})"
            ) from None
        result = decode(ReconfigureResult, msg.data)
        if not result.ok and result.error is not None:
            raise result.error.to_exc()
        return result


def generate_sync(nats_url: str, prompt: str | None = None, **kwargs: object) -> Completion:
    """Blocking helper: one generation, returned whole."""

    async def _run() -> Completion:
        async with NitsumClient(nats_url) as client:
            return await client.complete(prompt, **kwargs)

    return asyncio.run(_run())


__all__ = ["NitsumClient", "Completion", "generate_sync", "NitsumError"]
