"""The stage chain, declared once: which stage is called with what, in which order, to open a
session, to make one chunk, and to close it.

    text ──▶ DiT (sticky) ──▶ VAE (sticky) ──▶ post-process (sticky; sessions that ask for it)

Three callers run this one declaration: :class:`~.engine.RealtimeEngine` (the stages' hosts, in this
thread), the serving in-process backend (the deployments' classes, on an event loop) and the Ray
backend (Serve handles). They differ only in the ``call`` they pass::

    call(endpoint, method, *args, session=sid) -> a result, or something that stands for one

where ``method`` is a method of the stage interfaces below (the endpoint has a method of that name)
and ``args`` may hold what earlier calls returned: a caller either runs the call at once (the engine),
or waits for those arguments first (in-process tasks), or hands them to Ray, which sends one stage's
result straight to the next replica (the latents go DiT → VAE without passing the ingress).

Adding a stage: its engine module (a host with typed methods), one line in :meth:`StageChain.submit`
(and in :meth:`StageChain.start` if it has per-session state), and its config section.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from ..control.conditions import ChunkConditions
from .messages import ChunkRequest, DiTChunk, FrameChunk, PostOptions, PromptEmbeds, SessionOpened
from .session import SessionSpec

Call = Callable[..., Any]


class TextService(Protocol):
    """Stateless: any replica serves any call."""

    def embed(self, prompt: str | None, negative: bool = False) -> PromptEmbeds: ...

    def prepare(self, request: ChunkRequest) -> ChunkRequest: ...


class StickyService(Protocol):
    """Holds per-session state: every call of a session goes to the one replica that opened it."""

    def open_session(self, sid: str) -> Any: ...

    def close_session(self, sid: str) -> bool: ...


class DiTService(StickyService, Protocol):
    def start_session(
        self, sid: str, spec: SessionSpec, condition: Any, prompt: PromptEmbeds, negative: PromptEmbeds | None
    ) -> SessionOpened: ...

    def step(self, sid: str, request: ChunkRequest) -> DiTChunk: ...


class VAEService(StickyService, Protocol):
    def start_session(self, sid: str, spec: SessionSpec) -> Any: ...

    def decode(self, sid: str, chunk: DiTChunk) -> FrameChunk: ...


class PostService(StickyService, Protocol):
    def start_session(self, sid: str, options: PostOptions) -> None: ...

    def process(self, sid: str, chunk: FrameChunk) -> FrameChunk: ...


class StageChain:
    """The order of the stages. Keeps only which open sessions use post-processing."""

    def __init__(self, text: Any, dit: Any, vae: Any, post: Any = None):
        self.text, self.dit, self.vae, self.post = text, dit, vae, post
        self._post_sessions: set[str] = set()

    def sticky(self, sid: str) -> list[Any]:
        """The stages holding ``sid``'s state."""
        return [self.dit, self.vae] + ([self.post] if sid in self._post_sessions else [])

    def reserve(self, call: Call, sid: str, post: PostOptions | None) -> list[Any]:
        """Step 1 of opening: a slot on every sticky stage, before any model work (so a full stage
        refuses at once). The caller waits for all of them before :meth:`start`."""
        if post is not None:
            if self.post is None:
                raise ValueError(f"post={post!r}: this chain has no post-processing stage")
            self._post_sessions.add(sid)
        return [call(stage, StickyService.open_session, sid, session=sid) for stage in self.sticky(sid)]

    def start(self, call: Call, sid: str, spec: SessionSpec, post: PostOptions | None) -> list[Any]:
        """Step 2 of opening, the model work: the prompt(s) and the first frame encode side by
        side, the DiT takes both. The last result is the DiT's :class:`SessionOpened`."""
        prompt = call(self.text, TextService.embed, spec.prompt)
        negative = call(self.text, TextService.embed, spec.negative_prompt, True) if spec.use_cfg else None
        condition = call(self.vae, VAEService.start_session, sid, spec, session=sid)
        started = [call(self.post, PostService.start_session, sid, post, session=sid)] if post is not None else []
        return started + [call(self.dit, DiTService.start_session, sid, spec, condition, prompt, negative, session=sid)]

    def submit(self, call: Call, sid: str, conditions: ChunkConditions) -> tuple[Any, Any]:
        """One chunk through every stage: returns the DiT's :class:`DiTChunk` (the next chunk's
        conditions are sampled once it is there) and the last stage's :class:`FrameChunk`."""
        request: Any = ChunkRequest(conditions)
        if conditions.prompt is not None:
            request = call(self.text, TextService.prepare, request)
        latents = call(self.dit, DiTService.step, sid, request, session=sid)
        frames = call(self.vae, VAEService.decode, sid, latents, session=sid)
        if sid in self._post_sessions:
            frames = call(self.post, PostService.process, sid, frames, session=sid)
        return latents, frames

    def close(self, call: Call, sid: str) -> list[Any]:
        """Free the session on every sticky stage (whatever happened before, a failed open too)."""
        stages = self.sticky(sid)
        self._post_sessions.discard(sid)
        return [call(stage, StickyService.close_session, sid, session=sid) for stage in stages]


def call_now(endpoint: Any, method: Callable[..., Any], *args: Any, session: str | None = None) -> Any:
    """The engine's ``call``: run the stage's method in this thread, now."""
    return getattr(endpoint, method.__name__)(*args)
