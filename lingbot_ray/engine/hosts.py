"""A stage's sessions by id: what the chain (:mod:`.chain`) calls on a sticky stage.

A host owns one stage's per-session state objects and speaks the chain's typed messages: the DiT
host turns a :class:`~.messages.ChunkRequest` into a :class:`~.messages.DiTChunk`, the VAE host that
into a :class:`~.messages.FrameChunk`. :class:`~.engine.RealtimeEngine` calls hosts directly; a Ray
deployment wraps one and adds only serving (slots, a model thread, routing stats).

Every host has the same lifecycle: ``open_session`` (nothing to reserve in-process: it refuses an
id already in use), ``start_session`` (the model work: the state is created and kept), the stage's
per-chunk method, ``close_session`` (the state is released; unknown ids are fine, closing is
idempotent). A chunk for an id the host does not hold raises :class:`SessionLost`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from ..protocol import SessionLost
from .memory import MemoryGuard
from .messages import ChunkRequest, DiTChunk, FrameChunk, PromptEmbeds, SessionOpened, StageTimings
from .session import SessionSpec
from .stages import DiTSessionState, DiTStage, VAESessionState, VAEStage

State = TypeVar("State")


def timed(device: torch.device, fn, *args) -> tuple[Any, float]:
    """``fn(*args)`` and its milliseconds, queued GPU work included."""
    start = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, (time.perf_counter() - start) * 1e3


class SessionHost(Generic[State]):
    """Session id → one stage's state for that session."""

    STAGE = "stage"

    def __init__(self) -> None:
        self.sessions: dict[str, State] = {}

    def __contains__(self, sid: str) -> bool:
        return sid in self.sessions

    def session(self, sid: str) -> State:
        state = self.sessions.get(sid)
        if state is None:
            raise SessionLost(f"session {sid} is not held by this {self.STAGE} (closed, or its replica restarted?)")
        return state

    def open_session(self, sid: str) -> None:
        if sid in self.sessions:
            raise ValueError(f"session_id={sid!r}: already open on this {self.STAGE}")

    def close_session(self, sid: str) -> bool:
        state = self.sessions.pop(sid, None)
        if state is not None:
            state.release()
        return state is not None


def _tensor(embeds: PromptEmbeds | None, device: torch.device) -> torch.Tensor | None:
    return None if embeds is None else torch.from_numpy(np.asarray(embeds.embeds)).to(device)


class DiTHost(SessionHost[DiTSessionState]):
    STAGE = "DiT"

    def __init__(self, stage: DiTStage, memory: MemoryGuard | None = None):
        """``memory``: admits a session only if its DiT state fits on the device, checked in
        ``start_session`` right before it is allocated (None: no check)."""
        super().__init__()
        self.stage = stage
        self.memory = memory

    def start_session(
        self, sid: str, spec: SessionSpec, condition: Any, prompt: PromptEmbeds, negative: PromptEmbeds | None
    ) -> SessionOpened:
        """``condition``: the VAE's condition latents of the first frame; ``negative`` is required
        exactly when the spec asks for guidance."""
        self.open_session(sid)
        resolved = spec.resolve(self.stage.geometry)
        if self.memory is not None:
            self.memory.admit(resolved, [state.resolved for state in self.sessions.values()])
        device = self.stage.device
        self.sessions[sid] = self.stage.new_session(resolved, condition, _tensor(prompt, device), _tensor(negative, device))
        return SessionOpened(resolved.latent_frames_per_chunk)

    def step(self, sid: str, request: ChunkRequest) -> DiTChunk:
        state = self.session(sid)
        start_frame = state.next_frame
        embeds = _tensor(request.prompt, self.stage.device)
        latents, ms = timed(self.stage.device, self.stage.step, state, request.conditions, embeds)
        text_ms = request.prompt.encode_ms if request.prompt is not None else 0.0
        return DiTChunk(latents.float().cpu().numpy(), start_frame, StageTimings(text_encoder_ms=text_ms, dit_ms=ms))


class VAEHost(SessionHost[VAESessionState]):
    STAGE = "VAE"

    def __init__(self, stage: VAEStage):
        super().__init__()
        self.stage = stage

    def start_session(self, sid: str, spec: SessionSpec, still_open: Callable[[], None] | None = None) -> Any:
        """Set up the session's decode cache; returns its first frame's condition latents (for the DiT).
        ``still_open`` runs between encoder steps and raises once the session is given up."""
        self.open_session(sid)
        resolved = spec.resolve(self.stage.geometry)
        condition = self.stage.encode_condition(spec.image, on_step=still_open)
        self.sessions[sid] = self.stage.new_session(resolved)
        return condition

    def decode(self, sid: str, chunk: DiTChunk) -> FrameChunk:
        state = self.session(sid)
        frames, ms = timed(self.stage.device, self.stage.decode, state, torch.from_numpy(chunk.latents))
        return FrameChunk(
            frames,
            chunk.start_frame,
            chunk.num_latent_frames,
            dataclasses.replace(chunk.timings, vae_ms=ms),
            chunk.dit_replica,
        )
