"""The typed messages that travel between the stages of the chain (:mod:`.chain`).

One chunk::

    ChunkRequest ──text──▶ ChunkRequest(+PromptEmbeds) ──DiT──▶ DiTChunk ──VAE──▶ FrameChunk ──post──▶ FrameChunk

Opening a session: the text stage turns the prompt (and the negative prompt) into
:class:`PromptEmbeds`, the VAE encodes the first frame into condition latents, the DiT takes both and
answers :class:`SessionOpened`; post-processing takes the session's :class:`PostOptions`.

Arrays are numpy (between Ray replicas on one node they travel zero-copy); every message carries
the stage timings accumulated so far, so the last one holds all of them. Torch-free: the ingress
builds and reads these without loading any model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from ..control.conditions import ChunkConditions


@dataclass(frozen=True)
class StageTimings:
    """Milliseconds of model work per stage for one chunk (waiting for a busy replica not included)."""

    text_encoder_ms: float = 0.0
    dit_ms: float = 0.0
    vae_ms: float = 0.0
    postprocess_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True, eq=False)
class PromptEmbeds:
    """A prompt's UMT5 embeddings ``[1, text_len, text_dim]`` float32, zero-padded after the tokens."""

    embeds: np.ndarray = field(repr=False)
    encode_ms: float = 0.0


@dataclass(frozen=True, eq=False)
class ChunkRequest:
    """What the DiT needs for one chunk: the sampled conditions and, exactly when they change the
    prompt, that prompt's embeddings (filled by the text stage)."""

    conditions: ChunkConditions
    prompt: PromptEmbeds | None = None


@dataclass(frozen=True, eq=False)
class DiTChunk:
    """One chunk's clean latents ``[1, C, F, h, w]`` float32; ``start_frame`` is the latent frame
    index of its first frame in the session."""

    latents: np.ndarray = field(repr=False)
    start_frame: int
    timings: StageTimings
    dit_replica: str = ""

    @property
    def num_latent_frames(self) -> int:
        return int(self.latents.shape[2])


@dataclass(frozen=True, eq=False)
class FrameChunk:
    """One chunk's frames, uint8 ``[T, H, W, 3]`` RGB (T per docs/MODEL.md, "Frames per chunk";
    post-processing changes T and the size)."""

    frames: np.ndarray = field(repr=False)
    start_frame: int
    num_latent_frames: int
    timings: StageTimings
    dit_replica: str = ""


@dataclass(frozen=True)
class SessionOpened:
    """The DiT's answer to a session's start."""

    latent_frames_per_chunk: int
    dit_replica: str = ""


@dataclass(frozen=True)
class PostOptions:
    """One session's post-processing: RIFE with 2^exp frames per interval (exp 0 = off), then
    upscaling by ``upscale`` (1 = off), with the weights at these paths (already checked by whoever
    took them from a client)."""

    exp: int = 0
    flow_scale: float = 1.0
    upscale: float = 1.0
    rife_path: str | None = None
    esrgan_path: str | None = None

    def __post_init__(self) -> None:
        if self.exp and not self.rife_path:
            raise ValueError(f"rife_path={self.rife_path!r}: required when exp={self.exp!r} > 0")
        if self.upscale != 1 and not self.esrgan_path:
            raise ValueError(f"esrgan_path={self.esrgan_path!r}: required when upscale={self.upscale!r} != 1")

    @property
    def fps_factor(self) -> int:
        """Interpolation multiplies the frame rate by this."""
        return 2**self.exp
