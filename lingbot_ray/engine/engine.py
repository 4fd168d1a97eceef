"""The in-process realtime engine: the three stages composed, one session object per stream.

The Ray graph wraps the same stages one per deployment (text, DiT, VAE) and adds only placement,
routing and transport; tests, the benchmark and the notebook run this class directly.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..control.conditions import ChunkConditions
from ..models import pipeline
from .errors import SessionClosedError
from .sampler import DMDSampler
from .session import ChunkOutput, ModelGeometry, SessionSpec
from .stages import DiTSessionState, DiTStage, TextStage, VAESessionState, VAEStage

logger = logging.getLogger(__name__)


class SessionState:
    """Everything one session holds, across the stages: DiT state (KV cache, text cache, camera,
    generator, condition latents) and VAE state (decode cache).

    Lifecycle: created by :meth:`RealtimeEngine.new_session`; :meth:`reset` goes back to before the
    first chunk (same seed, same first frame, init prompt); :meth:`release` frees every cache, after
    which any use raises :class:`SessionClosedError`.
    """

    def __init__(self, spec: SessionSpec, dit: DiTSessionState, vae: VAESessionState):
        self.spec = spec
        self.dit = dit
        self.vae = vae
        self.chunk_index = 0
        self.event_id: int | None = None
        self.closed = False

    def reset(self) -> None:
        self.check_open()
        self.dit.reset()
        self.vae.reset()
        self.chunk_index = 0
        self.event_id = None

    def release(self) -> None:
        if self.closed:
            return
        self.dit.release()
        self.vae.release()
        self.closed = True

    def check_open(self) -> None:
        if self.closed:
            raise SessionClosedError("session was closed; open a new session")


class RealtimeEngine:
    """Text encoder + causal DiT + streaming VAE, stepping one chunk per call for any number of
    independent sessions."""

    def __init__(
        self,
        text: TextStage,
        dit: DiTStage,
        vae: VAEStage,
        *,
        defaults: pipeline.ServingDefaults | None = None,
    ):
        if dit.geometry != vae.geometry:
            raise ValueError(f"vae geometry={vae.geometry!r}: does not match the DiT's {dit.geometry!r}")
        self.text = text
        self.dit = dit
        self.vae = vae
        self.defaults = defaults or pipeline.ServingDefaults()

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
    ) -> RealtimeEngine:
        """Load a diffusers-style checkpoint folder (real or built by ``build_tiny_checkpoint``).

        ``dtype`` is the DiT's and ``text_dtype`` the text encoder's (both bf16 on CUDA, fp32 on CPU
        by default); the VAE loads in fp32 and decodes in bf16 for ``quality="high"`` sessions.
        """
        pipeline.read_model_index(folder).check_folders()
        text = TextStage.from_pretrained(folder, device=device, dtype=text_dtype)
        dit = DiTStage.from_pretrained(folder, device=device, dtype=dtype, sampler=sampler)
        vae = VAEStage.from_pretrained(folder, device=device)
        engine = cls(text, dit, vae, defaults=pipeline.read_serving_defaults(folder))
        logger.info("engine loaded from %s on %s (%s): %s", folder, device, dit.dtype, dit.sampler)
        return engine

    def new_session(self, spec: SessionSpec) -> SessionState:
        """Check ``spec`` against the model, encode the prompt(s) and the first frame, and set up
        the per-session caches of every stage."""
        resolved = spec.resolve(self.geometry)
        prompt_embeds = self.text.encode(spec.prompt)
        negative_embeds = self.text.encode_negative(spec.negative_prompt) if spec.use_cfg else None
        condition = self.vae.encode_condition(spec.image)
        dit_state = self.dit.new_session(resolved, condition, prompt_embeds, negative_embeds)
        vae_state = self.vae.new_session(resolved)
        logger.debug(
            "new session: %dx%d, %d block(s) per chunk, sink %d, window %d, cfg %s",
            spec.width,
            spec.height,
            resolved.blocks_per_chunk,
            resolved.sink_size,
            resolved.window_frames,
            spec.use_cfg,
        )
        return SessionState(spec, dit_state, vae_state)

    def step(self, state: SessionState, conditions: ChunkConditions) -> ChunkOutput:
        """Generate, decode and return the session's next chunk under ``conditions``."""
        state.check_open()
        start_frame = state.dit.next_frame
        t0 = time.perf_counter()

        # Step 1: a prompt change is re-encoded (the encoder caches recent prompts)
        prompt_embeds = self.text.encode(conditions.prompt) if conditions.prompt is not None else None
        t1 = self._mark()

        # Step 2: the DiT turns conditions into the chunk's clean latents (updates KV cache, camera)
        latents = self.dit.step(state.dit, conditions, prompt_embeds)
        t2 = self._mark()

        # Step 3: streaming decode continues the session's decode cache
        frames = self.vae.decode(state.vae, latents)
        t3 = self._mark()

        # Step 4: the event id persists until another event is sampled
        if conditions.event_id is not None:
            state.event_id = conditions.event_id
        output = ChunkOutput(
            frames=frames,
            chunk_index=state.chunk_index,
            event_id=state.event_id,
            timings_ms={
                "text": (t1 - t0) * 1e3,
                "dit": (t2 - t1) * 1e3,
                "vae": (t3 - t2) * 1e3,
                "total": (t3 - t0) * 1e3,
            },
            num_latent_frames=int(latents.shape[2]),
            start_frame=start_frame,
        )
        state.chunk_index += 1
        return output

    def close(self, state: SessionState) -> None:
        """Free the session's caches on every stage (idempotent)."""
        state.release()

    def _mark(self) -> float:
        # stage timings must include queued GPU work, so wait for it at each stage boundary
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
