"""How the session driver reaches the stages: through Ray Serve handles, or in-process.

Both backends run the one stage chain (:class:`~lingbot_ray.engine.chain.StageChain`) over the same
deployment classes; they differ only in how a stage is called, so the Ray graph adds only placement,
routing and transport, and a test can compare the two byte for byte.

Opening a session is two steps on every sticky stage: a slot is reserved on each (no model work, so
a full group refuses at once), then the model work starts (prompt and first-frame encoding, the DiT
state). The caller closes the session on every stage whatever happened, also after a failed open.

A chunk is submitted as one call that returns a :class:`ChunkFuture`: ``dit_done`` resolves when
the DiT has finished the chunk (the driver then samples the next chunk's conditions and submits
it, so the DiT works on chunk N+1 while chunk N is decoded and chunk N-1 is sent), ``result``
resolves to the last stage's :class:`~lingbot_ray.engine.messages.FrameChunk`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from lingbot_ray.control.conditions import ChunkConditions
from lingbot_ray.engine.chain import StageChain
from lingbot_ray.engine.messages import DiTChunk, FrameChunk, PostOptions, SessionOpened
from lingbot_ray.engine.session import SessionSpec


def replica_tag() -> str:
    """This replica's id (``DiTGroup#abc123``), or a process tag outside Serve."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return f"{context.deployment}#{context.replica_id.unique_id}"
    except Exception:  # not inside a Serve replica: in-process backends and tests
        return f"local-{os.getpid()}"


@dataclass(eq=False)  # hashed by identity: the driver keeps the ones in flight in a set
class ChunkFuture:
    dit_done: asyncio.Future
    result: asyncio.Future
    calls: list[Any] = dataclasses.field(default_factory=list)  # the chunk's stage calls

    @classmethod
    def of(cls, dit_done: Awaitable[DiTChunk], result: Awaitable[FrameChunk], calls: list[Any]) -> ChunkFuture:
        tasks = [asyncio.ensure_future(dit_done), asyncio.ensure_future(result)]
        for task in tasks:  # a chunk abandoned with its session fails quietly, as expected
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return cls(*tasks, calls)

    def cancel(self) -> None:
        """Give up the chunk: its stage calls are cancelled where they wait (a replica drops a call
        it has not started); one already running stops at the next boundary once the session is
        closed on that stage."""
        self.dit_done.cancel()
        self.result.cancel()
        for pending in self.calls:
            pending.cancel()


class StageBackend(Protocol):
    async def open(self, sid: str, spec: SessionSpec, post: PostOptions | None = None) -> SessionOpened: ...

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture: ...

    async def close(self, sid: str) -> None: ...


def unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the driver maps the original one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class _ChainBackend:
    """The chain, run on this event loop; subclasses say how one stage call is made and awaited."""

    def __init__(self, chain: StageChain):
        self.chain = chain

    def _call(self, endpoint: Any, method: Callable[..., Any], *args: Any, session: str | None = None) -> Any:
        """Start one stage call; returns something awaitable with a ``cancel()``."""
        raise NotImplementedError

    async def _result(self, pending: Any) -> Any:
        return await pending

    def _recording(self, calls: list[Any]):
        """A ``call`` that also keeps every call it makes, so that giving up can cancel them all
        (also those only passed on as arguments, which nobody here awaits)."""

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(self._call(*args, **kwargs))
            return calls[-1]

        return call

    async def open(self, sid: str, spec: SessionSpec, post: PostOptions | None = None) -> SessionOpened:
        calls: list[Any] = []
        call = self._recording(calls)
        try:
            await asyncio.gather(*map(self._result, self.chain.reserve(call, sid, post)))
            started = await asyncio.gather(*map(self._result, self.chain.start(call, sid, spec, post)))
        except BaseException:  # failed, or given up (timeout, disconnect): stop what still waits
            for pending in calls:
                pending.cancel()
            raise
        return started[-1]

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture:
        calls: list[Any] = []
        latents, frames = self.chain.submit(self._recording(calls), sid, conditions)
        return ChunkFuture.of(self._result(latents), self._result(frames), calls)

    async def _quietly(self, pending: Any) -> None:
        try:
            await self._result(pending)
        except Exception:  # the replica may be the one that died; nothing left to free there
            pass

    async def close(self, sid: str) -> None:
        await asyncio.gather(*map(self._quietly, self.chain.close(self._call, sid)))


class InProcessBackend(_ChainBackend):
    """The deployment classes as plain objects in this process (tests, notebook, benchmark baseline):
    each stage call is a task that first waits for the earlier calls it takes as arguments."""

    def _call(self, endpoint: Any, method: Callable[..., Any], *args: Any, session: str | None = None) -> asyncio.Task:
        async def run() -> Any:
            values = [await arg if isinstance(arg, asyncio.Future) else arg for arg in args]
            return await getattr(endpoint, method.__name__)(*values)

        return asyncio.ensure_future(run())


def call(handle, method: str, *args, session_id: str | None = None):
    """``handle.method.remote(*args)`` as a call of its own, pinned to ``session_id`` when given.

    Serve gives every handle call made while a request is handled (here: the session's WebSocket)
    that request's internal id, and its router indexes calls waiting for a replica by that id: two
    calls of one session to one deployment waiting at once (a close overtaking an open, a chunk
    behind the previous one) would leave one of them unrouted forever. Each call gets a fresh
    internal id instead; the request id, which the logs show, is kept.
    """
    from ray.serve import context as serve_context

    current = serve_context._get_serve_request_context()
    token = serve_context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        pinned = handle.options(session_id=session_id) if session_id else handle
        return getattr(pinned, method).remote(*args)
    finally:
        serve_context._serve_request_context.reset(token)


class RayBackend(_ChainBackend):
    """The stages as Serve deployments; every call of a session is pinned with ``session_id``, and a
    stage's response passed to the next stage goes replica to replica, not through here."""

    def _call(self, endpoint: Any, method: Callable[..., Any], *args: Any, session: str | None = None) -> Any:
        return call(endpoint, method.__name__, *args, session_id=session)

    async def _result(self, pending: Any) -> Any:
        try:
            return await pending
        except BaseException as exc:
            raise unwrap(exc) from None


__all__ = ["ChunkFuture", "InProcessBackend", "RayBackend", "StageBackend", "replica_tag", "unwrap"]
