"""How the session driver reaches the stages: through Ray Serve handles, or in-process.

Both backends run the same stage code (the deployments' classes), so the Ray graph adds only
placement, routing and transport, and a test can compare the two byte for byte.

A chunk is submitted as one call that returns a :class:`ChunkFuture`: ``dit_done`` resolves when
the DiT has finished the chunk (the driver then samples the next chunk's conditions and submits
it, so the DiT works on chunk N+1 while chunk N is decoded and chunk N-1 is sent), ``result``
resolves to the frames and the stage timings.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol

from lingbot_ray.control.conditions import ChunkConditions
from lingbot_ray.engine import SessionSpec
from lingbot_ray.protocol import CapacityError, SessionLost

from .router import CLOSE_METHOD, OPEN_METHOD


@dataclass
class ChunkFuture:
    dit_done: Awaitable[Any]
    result: Awaitable[dict[str, Any]]
    cancel: Any = None


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
        condition = await self.vae.open_session(sid, spec)
        try:
            if post is not None:
                await self.post.open_session(sid, post)
                self._with_post.add(sid)
            prompt = await self.text.encode(spec.prompt)
            negative = await self.text.encode(spec.negative_prompt, True) if spec.use_cfg else None
            return await self.dit.open_session(sid, spec, condition, prompt, negative)
        except BaseException:
            await self.close(sid)
            raise

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture:
        async def dit() -> dict[str, Any]:
            text = await self.text.encode(conditions.prompt) if conditions.prompt is not None else None
            return await self.dit.step(sid, conditions, text)

        dit_task = asyncio.ensure_future(dit())

        async def result() -> dict[str, Any]:
            decoded = await self.vae.decode(sid, await dit_task)
            return await self.post.process(sid, decoded) if sid in self._with_post else decoded

        result_task = asyncio.ensure_future(result())
        return ChunkFuture(dit_task, result_task, cancel=lambda: (dit_task.cancel(), result_task.cancel()))

    async def close(self, sid: str) -> None:
        await self.dit.close_session(sid)
        await self.vae.close_session(sid)
        if sid in self._with_post:
            self._with_post.discard(sid)
            await self.post.close_session(sid)


class RayBackend:
    """The stages as Serve deployments; every call of a session is pinned with ``session_id``."""

    def __init__(self, text_handle, dit_handle, vae_handle, post_handle=None):
        self.text, self.dit, self.vae, self.post = text_handle, dit_handle, vae_handle, post_handle
        self._with_post: set[str] = set()

    def _sticky(self, handle, sid: str, method: str):
        return getattr(handle.options(session_id=sid), method)

    async def open(self, sid: str, spec: SessionSpec, post: Any = None) -> dict[str, Any]:
        prompt = self.text.encode.remote(spec.prompt)
        negative = self.text.encode.remote(spec.negative_prompt, True) if spec.use_cfg else None
        condition = self._sticky(self.vae, sid, OPEN_METHOD).remote(sid, spec)
        try:
            if post is not None:
                self._with_post.add(sid)
                await self._sticky(self.post, sid, OPEN_METHOD).remote(sid, post)
            return await self._sticky(self.dit, sid, OPEN_METHOD).remote(sid, spec, condition, prompt, negative)
        except BaseException as exc:
            await self.close(sid)
            raise unwrap(exc) from None

    def submit(self, sid: str, conditions: ChunkConditions) -> ChunkFuture:
        text = self.text.encode.remote(conditions.prompt) if conditions.prompt is not None else None
        dit = self._sticky(self.dit, sid, "step").remote(sid, conditions, text)
        # The latents go from the DiT replica to the VAE replica directly, not through here.
        vae = self._sticky(self.vae, sid, "decode").remote(sid, dit)
        if sid in self._with_post:
            vae = self._sticky(self.post, sid, "process").remote(sid, vae)

        async def unwrapped(response) -> Any:
            try:
                return await response
            except BaseException as exc:
                raise unwrap(exc) from None

        dit_task = asyncio.ensure_future(unwrapped(dit))
        vae_task = asyncio.ensure_future(unwrapped(vae))
        return ChunkFuture(dit_task, vae_task, cancel=lambda: (dit.cancel(), vae.cancel()))

    async def _close_quietly(self, handle, sid: str) -> None:
        try:
            await self._sticky(handle, sid, CLOSE_METHOD).remote(sid)
        except Exception:  # the replica may be the one that died; nothing left to free there
            pass

    async def close(self, sid: str) -> None:
        stages = [self.dit, self.vae] + ([self.post] if sid in self._with_post else [])
        self._with_post.discard(sid)
        await asyncio.gather(*(self._close_quietly(stage, sid) for stage in stages))


__all__ = ["CapacityError", "ChunkFuture", "InProcessBackend", "RayBackend", "SessionLost", "StageBackend", "unwrap"]
