"""One client session over the WebSocket, instrumented: the building block of bench, record and check.

:func:`run_session` sends an ``init``, sends runtime events on a chunk schedule (and from a live
queue, for a keyboard), decodes frames when asked, and measures what a viewer sees:

* **time to first frame**: init sent → first ``frame_batch`` received;
* **event latency**: an event sent → the first ``frame_batch`` whose ``event_id`` is ≥ its id (the
  protocol's "my control is now visible" rule); events without an id get the next free one;
* **bytes**: every received message's size; arrival time of every ``chunk_stats``;
* the close code and reason: 1013 (no capacity) counts as *refused*.

Nothing here imports torch or ray: the tools run on any machine that can reach the server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import websockets

from ..protocol.actions import ACTIONS
from ..transport import FrameDecoder

API_KEY_HEADER = "Authorization"
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass(frozen=True)
class ScheduledEvent:
    """A runtime event sent as soon as chunk ``at_chunk - 1``'s stats arrive (0: right after init)."""

    at_chunk: int
    message: Mapping[str, Any]


@dataclass
class SessionResult:
    stats: list[dict] = field(default_factory=list)  # chunk_stats messages, in order
    stats_arrival_s: list[float] = field(default_factory=list)  # seconds since init was sent
    first_frame_s: float | None = None
    frames: int = 0
    bytes_received: int = 0
    event_latency_ms: dict[int, float] = field(default_factory=dict)  # event_id -> ms
    errors: list[str] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    elapsed_s: float = 0.0

    @property
    def refused(self) -> bool:
        return self.close_code == CLOSE_TRY_AGAIN_LATER

    @property
    def completed(self) -> bool:
        return self.close_code == 1000 and not self.errors


def parse_actions(text: str) -> list[list[str]]:
    """``"w*6,_*6,w+l*3"`` → 6 × ``["w"]``, 6 × ``[]``, 3 × ``["w", "l"]`` (one entry per latent frame).

    ``_`` (or an empty item) is "no key"; ``+`` joins keys held together; ``*N`` repeats.
    """
    script: list[list[str]] = []
    for item in (part.strip() for part in text.split(",")):
        keys, _, count = item.partition("*")
        try:
            repeat = int(count) if count else 1
        except ValueError:
            raise ValueError(f"actions item {item!r}: the repeat count {count!r} is not an integer") from None
        if repeat < 0:
            raise ValueError(f"actions item {item!r}: the repeat count must be ≥ 0")
        tokens = [] if keys.strip() in ("", "_") else [k.strip() for k in keys.split("+")]
        unknown = [k for k in tokens if k not in ACTIONS]
        if unknown:
            raise ValueError(f"actions item {item!r}: unknown keys {unknown} (known: {''.join(ACTIONS.tokens)})")
        script.extend([list(tokens) for _ in range(repeat)])
    return script


def make_init(
    prompt: str,
    first_frame: bytes | str | None,
    *,
    seed: int = 42,
    max_chunks: int | None = None,
    output_format: str | None = "raw",
    size: str | None = None,
    actions: Sequence[Sequence[str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An ``init`` message; ``output_format=None`` asks for the default (lossless delta-gzip)."""
    init: dict[str, Any] = {"type": "init", "prompt": prompt, "seed": seed}
    if first_frame is not None:
        init["first_frame"] = first_frame
    if max_chunks is not None:
        init["max_chunks"] = max_chunks
    if output_format is not None:
        init["realtime_output_format"] = output_format
    if size is not None:
        init["size"] = size
    if actions:
        init["condition_inputs"] = {"camera_actions": [list(a) for a in actions]}
    init.update(extra)
    return init


REALTIME_PATH = "/v1/realtime_video/generate"


def ws_url(server: str) -> str:
    """``http(s)://host:port`` or ``ws(s)://host:port[/...]`` → the realtime WebSocket URL."""
    for plain, secure in (("http://", "ws://"), ("https://", "wss://")):
        if server.startswith(plain):
            server = secure + server[len(plain):]
    if not server.startswith(("ws://", "wss://")):
        raise ValueError(f"server URL {server!r} must start with ws://, wss://, http:// or https://")
    return server if server.rstrip("/").endswith(REALTIME_PATH) else server.rstrip("/") + REALTIME_PATH


def ws_headers(api_key: str | None) -> dict[str, str]:
    return {API_KEY_HEADER: f"Bearer {api_key}"} if api_key else {}


async def run_session(
    url: str,
    init: Mapping[str, Any],
    *,
    events: Sequence[ScheduledEvent] = (),
    live: asyncio.Queue | None = None,
    on_frames: Callable[[dict, np.ndarray], None] | None = None,
    on_stats: Callable[[dict], None] | None = None,
    stop: asyncio.Event | None = None,
    api_key: str | None = None,
    timeout_s: float = 300.0,
) -> SessionResult:
    """Run one session against ``url`` (a server base or the realtime URL) until the server closes it, ``stop`` is set, or nothing arrives for ``timeout_s``.

    ``on_frames(batch, frames)`` receives each ``frame_batch`` message with its decoded uint8
    ``[n, H, W, 3]`` frames (decoding is skipped when it is None); ``live`` is a queue of event messages sent as they come (None ends it).
    """
    result = SessionResult()
    decoder = FrameDecoder() if on_frames is not None else None
    pending = sorted(events, key=lambda e: e.at_chunk)
    sent_at: dict[int, float] = {}  # event_id -> monotonic send time, until echoed
    next_id = 1

    async with websockets.connect(ws_url(url), max_size=None, additional_headers=ws_headers(api_key)) as ws:

        async def send_event(message: Mapping[str, Any]) -> None:
            nonlocal next_id
            message = dict(message)
            message.setdefault("type", "event")
            event_id = message.setdefault("event_id", next_id)
            if isinstance(event_id, int):
                next_id = max(next_id, event_id + 1)
                sent_at[event_id] = time.monotonic()
            await ws.send(msgspec.msgpack.encode(message))

        async def send_due(done_chunks: int) -> None:
            while pending and pending[0].at_chunk <= done_chunks:
                await send_event(pending.pop(0).message)

        async def pump_live() -> None:
            while (message := await live.get()) is not None:
                await send_event(message)

        async def wait_stop() -> None:
            await stop.wait()
            await ws.close()

        helpers = [asyncio.create_task(pump_live())] if live is not None else []
        if stop is not None:
            helpers.append(asyncio.create_task(wait_stop()))
        start = time.monotonic()
        await ws.send(msgspec.msgpack.encode(dict(init)))
        await send_due(0)
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), timeout_s)
                now = time.monotonic()
                result.bytes_received += len(raw)
                message = msgspec.msgpack.decode(raw)
                kind = message.get("type")
                if kind == "frame_batch":
                    if result.first_frame_s is None:
                        result.first_frame_s = now - start
                    result.frames += int(message["num_frames"])
                    echoed = message.get("event_id")
                    if isinstance(echoed, int):
                        for event_id in [i for i in sent_at if i <= echoed]:
                            result.event_latency_ms[event_id] = (now - sent_at.pop(event_id)) * 1e3
                    if decoder is not None:
                        on_frames(message, decoder.decode(message))
                elif kind == "chunk_stats":
                    result.stats.append(message)
                    result.stats_arrival_s.append(now - start)
                    if on_stats is not None:
                        on_stats(message)
                    await send_due(len(result.stats))
                elif kind == "error":
                    result.errors.append(str(message.get("content")))
        except websockets.ConnectionClosed as closed:
            if closed.rcvd is not None:
                result.close_code, result.close_reason = closed.rcvd.code, closed.rcvd.reason
        finally:
            for task in helpers:
                task.cancel()
    result.elapsed_s = time.monotonic() - start
    return result
