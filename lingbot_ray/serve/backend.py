"""How the session driver reaches the stages: through Ray Serve handles, or in-process.

Both backends run the same stage code (the deployments' classes), so the Ray graph adds only
placement, routing and transport, and a test can compare the two byte for byte.

Opening a session is two steps on every sticky stage: a slot is reserved on each (no model work, so
a full group refuses at once), then the model work starts (prompt and first-frame encoding, the DiT
state). The caller closes the session on every stage whatever happened, also after a failed open.

A chunk is submitted as one call that returns a :class:`ChunkFuture`: ``dit_done`` resolves when
the DiT has finished the chunk (the driver then samples the next chunk's conditions and submits
it, so the DiT works on chunk N+1 while chunk N is decoded and chunk N-1 is sent), ``result``
resolves to the frames and the stage timings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol

from lingbot_ray.control.conditions import ChunkConditions
from lingbot_ray.engine import SessionSpec
from lingbot_ray.protocol import CapacityError, SessionLost

from .router import CLOSE_METHOD, OPEN_METHOD

START_METHOD = "start_session"


@dataclass(eq=False)  # hashed by identity: the driver keeps the ones in flight in a set
class ChunkFuture:
    dit_done: asyncio.Future
    result: asyncio.Future

    @classmethod
    def of(cls, dit_done: Awaitable[Any], result: Awaitable[dict[str, Any]]) -> ChunkFuture:
        tasks = [asyncio.ensure_future(dit_done), asyncio.ensure_future(result)]
        for task in tasks:  # a chunk abandoned with its session fails quietly, as expected
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return cls(*tasks)

    def cancel(self) -> None:
        """Stop waiting for the chunk. The stages stop working on it when the session closes."""
        self.dit_done.cancel()
        self.result.cancel()


class StageBackend(Protocol):
    async def open(self, sid: str, spec: SessionSpec, post: Any = None) -> dict[str, Any]: ...

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture: ...

    async def close(self, sid: str) -> None: ...


def unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; the driver maps the original one."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class InProcessBackend:
    """The stages as plain objects in this process (tests, notebook, benchmark baseline)."""

    def __init__(self, text, dit, vae, post=None):
        self.text, self.dit, self.vae, self.post = text, dit, vae, post
        self._with_post: set[str] = set()

    async def open(self, sid: str, spec: SessionSpec, post: Any = None) -> dict[str, Any]:
        stages = [self.dit, self.vae] + ([self.post] if post is not None else [])
        if post is not None:
            self._with_post.add(sid)
        for stage in stages:
            await stage.open_session(sid)
        condition = await self.vae.start_session(sid, spec)
        if post is not None:
            await self.post.start_session(sid, post)
        prompt = await self.text.encode(spec.prompt)
        negative = await self.text.encode(spec.negative_prompt, True) if spec.use_cfg else None
        return await self.dit.start_session(sid, spec, condition, prompt, negative)

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture:
        async def dit() -> dict[str, Any]:
            text = await self.text.encode(conditions.prompt) if conditions.prompt is not None else None
            return await self.dit.step(sid, conditions, text)

        dit_task = asyncio.ensure_future(dit())

        async def result() -> dict[str, Any]:
            decoded = await self.vae.decode(sid, await asyncio.shield(dit_task))
            return await self.post.process(sid, decoded) if sid in self._with_post else decoded

        return ChunkFuture.of(dit_task, result())

    async def close(self, sid: str) -> None:
        await self.dit.close_session(sid)
        await self.vae.close_session(sid)
        if sid in self._with_post:
            self._with_post.discard(sid)
            await self.post.close_session(sid)


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


class RayBackend:
    """The stages as Serve deployments; every call of a session is pinned with ``session_id``."""

    def __init__(self, text_handle, dit_handle, vae_handle, post_handle=None):
        self.text, self.dit, self.vae, self.post = text_handle, dit_handle, vae_handle, post_handle
        self._with_post: set[str] = set()

    async def open(self, sid: str, spec: SessionSpec, post: Any = None) -> dict[str, Any]:
        stages = [self.dit, self.vae] + ([self.post] if post is not None else [])
        if post is not None:
            self._with_post.add(sid)
        try:
            # Step 1: a slot on every sticky stage (the router picks the replica with the most room)
            await asyncio.gather(*(call(stage, OPEN_METHOD, sid, session_id=sid) for stage in stages))
            # Step 2: the model work; the prompt(s) and the first frame encode in parallel, the DiT
            # takes the responses as arguments (the latents go VAE → DiT directly)
            prompt = call(self.text, "encode", spec.prompt)
            negative = call(self.text, "encode", spec.negative_prompt, True) if spec.use_cfg else None
            condition = call(self.vae, START_METHOD, sid, spec, session_id=sid)
            if post is not None:
                await call(self.post, START_METHOD, sid, post, session_id=sid)
            return await call(self.dit, START_METHOD, sid, spec, condition, prompt, negative, session_id=sid)
        except Exception as exc:
            raise unwrap(exc) from None

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture:
        text = call(self.text, "encode", conditions.prompt) if conditions.prompt is not None else None
        dit = call(self.dit, "step", sid, conditions, text, session_id=sid)
        # The latents go from the DiT replica to the VAE replica directly, not through here.
        vae = call(self.vae, "decode", sid, dit, session_id=sid)
        if sid in self._with_post:
            vae = call(self.post, "process", sid, vae, session_id=sid)

        async def unwrapped(response) -> Any:
            try:
                return await response
            except BaseException as exc:
                raise unwrap(exc) from None

        return ChunkFuture.of(unwrapped(dit), unwrapped(vae))

    async def _close_quietly(self, handle, sid: str) -> None:
        try:
            await call(handle, CLOSE_METHOD, sid, session_id=sid)
        except Exception:  # the replica may be the one that died; nothing left to free there
            pass

    async def close(self, sid: str) -> None:
        stages = [self.dit, self.vae] + ([self.post] if sid in self._with_post else [])
        self._with_post.discard(sid)
        await asyncio.gather(*(self._close_quietly(stage, sid) for stage in stages))


__all__ = ["CapacityError", "ChunkFuture", "InProcessBackend", "RayBackend", "SessionLost", "StageBackend", "unwrap"]
