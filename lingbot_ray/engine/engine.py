"""The in-process realtime engine: the stage chain run in this thread, one session object per stream.

The Ray graph runs the same chain (:mod:`.chain`) over the same hosts, one stage per deployment, and
adds only placement, routing and transport; tests, the benchmark, the quality script and the
notebook run this class directly — post-processing included.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import torch

from ..checkpoint import ModelGeometry, ServingDefaults, read_model_index, read_serving_defaults
from ..control.conditions import ChunkConditions
from ..models.loading import default_dtype
from .chain import StageChain, call_now
from .errors import SessionClosedError
from .hosts import DiTHost, VAEHost
from .memory import MemoryPlan, plan_memory
from .messages import PostOptions
from .postprocess import PostHost, PostStage
from .sampler import DMDSampler
from .session import ChunkOutput, SessionSpec
from .stages import DiTSessionState, DiTStage, TextStage, VAESessionState, VAEStage

logger = logging.getLogger(__name__)


class SessionState:
    """One stream, across the stages: its id in every host, and each stage's state object (DiT:
    KV cache, text cache, camera, generator, condition latents; VAE: decode cache; post-processing:
    RIFE's previous frame).

    Lifecycle: created by :meth:`RealtimeEngine.new_session`; :meth:`reset` goes back to before the
    first chunk (same seed, same first frame, init prompt); :meth:`RealtimeEngine.close` frees every
    cache, after which any use raises :class:`SessionClosedError`.
    """

    def __init__(self, sid: str, spec: SessionSpec, dit: DiTSessionState, vae: VAESessionState, post=None):
        self.sid = sid
        self.spec = spec
        self.dit = dit
        self.vae = vae
        self.post = post
        self.chunk_index = 0
        self.event_id: int | None = None
        self.closed = False

    def reset(self) -> None:
        self.check_open()
        for state in (self.dit, self.vae, self.post):
            if state is not None:
                state.reset()
        self.chunk_index = 0
        self.event_id = None

    def check_open(self) -> None:
        if self.closed:
            raise SessionClosedError("session was closed; open a new session")


class RealtimeEngine:
    """Text encoder + causal DiT + streaming VAE (+ post-processing), stepping one chunk per call for
    any number of independent sessions."""

    def __init__(
        self,
        text: TextStage,
        dit: DiTStage,
        vae: VAEStage,
        *,
        post: PostStage | None = None,
        defaults: ServingDefaults | None = None,
        memory: MemoryPlan | None = None,
    ):
        """``memory``: the plan the stages were loaded by; with it, a session that would not fit is
        refused before it allocates anything (without it, none is)."""
        if dit.geometry != vae.geometry:
            raise ValueError(f"vae geometry={vae.geometry!r}: does not match the DiT's {dit.geometry!r}")
        self.text, self.dit, self.vae = text, dit, vae
        self.post = post or PostStage(device=dit.device)
        self.defaults = defaults or ServingDefaults()
        self.memory = memory
        self._admission = memory.admission() if memory is not None else None
        self.chain = StageChain(text, DiTHost(dit), VAEHost(vae), PostHost(self.post))

    @property
    def geometry(self) -> ModelGeometry:
        return self.dit.geometry

    @property
    def device(self) -> torch.device:
        return self.dit.device

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        text_dtype: torch.dtype | None = None,
        sampler: DMDSampler | None = None,
        text_device: str | torch.device | None = None,
        memory_budget: int | None = None,
        decoder: str | None = None,
    ) -> RealtimeEngine:
        """Load a diffusers-style checkpoint folder (docs/MODEL.md, "Checkpoint folder").

        ``dtype`` is the DiT's and ``text_dtype`` the text encoder's (both bf16 on CUDA, fp32 on CPU
        by default, after ``device``); the VAE loads in fp32 and decodes in bf16 for ``quality="high"``
        sessions.

        Before loading, the memory plan (:mod:`.memory`) is computed from the checkpoint's headers and
        logged. ``text_device`` None puts the text encoder on ``device`` only when the weights, one
        chunk's work and one session at the checkpoint's default size still fit there, else on the
        CPU. ``memory_budget``: bytes the engine may use on ``device`` (default: what CUDA reports
        free; no limit on the CPU); a session beyond it is refused with
        :class:`~.memory.InsufficientMemory`, as are weights that do not fit at all. ``decoder``: the
        VAE stage's (:meth:`VAEStage.from_pretrained`; None: the checkpoint's own).
        """
        read_model_index(folder).check_folders()
        dtype = dtype or default_dtype(device)
        text_dtype = text_dtype or default_dtype(device)
        plan = plan_memory(
            folder, device=device, dit_dtype=dtype, text_dtype=text_dtype, text_device=text_device, budget=memory_budget
        )
        logger.info("%s", plan.summary())
        logger.info("%s", plan.text_placement())
        plan.check_weights()
        if plan.sessions_that_fit() == 0:
            logger.warning("no session at the default size fits beside the weights: %s", plan.summary())
        text = TextStage.from_pretrained(folder, device=plan.text_device, dtype=text_dtype)
        dit = DiTStage.from_pretrained(folder, device=device, dtype=dtype, sampler=sampler)
        vae = VAEStage.from_pretrained(folder, device=device, decoder=decoder)
        engine = cls(text, dit, vae, defaults=read_serving_defaults(folder), memory=plan)
        logger.info("engine loaded from %s on %s (%s): %s", folder, device, dit.dtype, dit.sampler)
        return engine

    def new_session(self, spec: SessionSpec, post: PostOptions | None = None) -> SessionState:
        """Check ``spec`` against the model, encode the prompt(s) and the first frame, and set up
        the per-session state of every stage (post-processing too when ``post`` is given)."""
        resolved = spec.resolve(self.geometry)  # a bad spec fails before any stage holds anything
        if self._admission is not None:
            self._admit(resolved)
        sid = uuid.uuid4().hex
        chain = self.chain
        try:
            chain.reserve(call_now, sid, post)
            chain.start(call_now, sid, spec, post)
        except BaseException:
            chain.close(call_now, sid)
            raise
        post_state = chain.post.sessions[sid] if post is not None else None
        return SessionState(sid, spec, chain.dit.sessions[sid], chain.vae.sessions[sid], post_state)

    def _admit(self, resolved) -> None:
        """Refuse a session that would not fit beside the sessions held (:class:`~.memory.InsufficientMemory`)."""
        held = [state.resolved for state in self.chain.dit.sessions.values()]
        # a session's VAE cache fills on its first decode: until then the device does not show it
        vae_states = self.chain.vae.sessions.values()
        pending = [state.resolved for state in vae_states if not state.decode_cache.num_latent_frames]
        unallocated = sum(self._admission.model.for_spec(r).vae_cache for r in pending)
        self._admission.admit(resolved, held, unallocated)

    def step(self, state: SessionState, conditions: ChunkConditions) -> ChunkOutput:
        """Generate, decode (and post-process) the session's next chunk under ``conditions``."""
        state.check_open()
        _, chunk = self.chain.submit(call_now, state.sid, conditions)
        # the event id persists until another event is sampled
        if conditions.event_id is not None:
            state.event_id = conditions.event_id
        output = ChunkOutput(
            frames=chunk.frames,
            chunk_index=state.chunk_index,
            event_id=state.event_id,
            timings=chunk.timings,
            num_latent_frames=chunk.num_latent_frames,
            start_frame=chunk.start_frame,
        )
        state.chunk_index += 1
        return output

    def close(self, state: SessionState) -> None:
        """Free the session's state on every stage (idempotent)."""
        if not state.closed:
            self.chain.close(call_now, state.sid)
            state.closed = True


__all__ = ["RealtimeEngine", "SessionState"]
