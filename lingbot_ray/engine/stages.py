"""The engine's three stages, each usable on its own (the Ray graph wraps one per deployment).

- :class:`TextStage`: prompt → embeddings (cached per prompt by the encoder). Stateless.
- :class:`DiTStage`: the causal DiT. Per session a :class:`DiTSessionState` (KV cache, text cache,
  camera trajectory, generator, condition latents, next latent frame index); :meth:`DiTStage.step`
  turns one chunk's conditions into that chunk's clean latents.
- :class:`VAEStage`: first-frame encoding and streaming decode. Per session a
  :class:`VAESessionState` (decode cache, decode precision).

The modules hold only weights; everything that changes during a session lives in the state objects,
which carry their own lifecycle: ``reset()`` (back to the session's first chunk, same seed) and
``release()`` (free the caches; later use raises :class:`SessionClosedError`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..control.camera import CameraTrajectory, Intrinsics
from ..control.conditions import ChunkConditions
from ..checkpoint import TINY_DECODER_FOLDER, ModelGeometry, read_geometry, read_serving_defaults
from ..models import loading
from ..models.attention import PositionLimitError
from ..models.transformer_lingbot import CAMERA_UNSHUFFLE
from .errors import PositionLimitReached, SessionClosedError
from .messages import ChunkRequest, PromptEmbeds
from .plucker import plucker_map
from .sampler import DMDSampler, randn_like_session
from .session import ResolvedSpec

logger = logging.getLogger(__name__)


def _check_open(closed: bool, what: str) -> None:
    if closed:
        raise SessionClosedError(f"{what} was released; open a new session")


# ---------------------------------------------------------------------------------------------
# Text


class TextStage:
    """Prompt → UMT5 embeddings ``[1, text_len, text_dim]`` (zero-padded after the real tokens)."""

    def __init__(self, prompt_encoder):
        self.prompt_encoder = prompt_encoder

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> TextStage:
        dtype = dtype or loading.default_dtype(device)
        return cls(loading.load_prompt_encoder(folder, device=device, dtype=dtype))

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt={prompt!r}: must be a string")
        return self.prompt_encoder.encode(prompt)

    @torch.inference_mode()
    def encode_negative(self, negative_prompt: str | None) -> torch.Tensor:
        """The unconditional branch's embeddings. No negative prompt means no text at all: every
        position is padding (zeros), which the DiT maps to ``text_embedding(0)`` like any padding."""
        if negative_prompt is None or not negative_prompt.strip():
            return torch.zeros(
                1,
                self.prompt_encoder.max_length,
                self.prompt_encoder.d_model,
                device=self.prompt_encoder.device,
                dtype=self.prompt_encoder.dtype,
            )
        return self.encode(negative_prompt)

    def embed(self, prompt: str | None, negative: bool = False) -> PromptEmbeds:
        """The chain's text step at a session's start: the prompt (or, with ``negative``, the
        unconditional branch's text) as a :class:`PromptEmbeds` message."""
        start = time.perf_counter()
        embeds = self.encode_negative(prompt) if negative else self.encode(prompt)
        embeds = embeds.float().cpu().numpy()
        return PromptEmbeds(embeds, (time.perf_counter() - start) * 1e3)

    def prepare(self, request: ChunkRequest) -> ChunkRequest:
        """The chain's text step of a chunk whose conditions change the prompt."""
        return dataclasses.replace(request, prompt=self.embed(request.conditions.prompt))


# ---------------------------------------------------------------------------------------------
# DiT


class DiTSessionState:
    """One session's DiT-side state. Classifier-free guidance runs both branches as a batch of two
    (row 0 conditional, row 1 unconditional), so each branch has its own KV history and text cache.
    """

    def __init__(
        self,
        stage: DiTStage,
        resolved: ResolvedSpec,
        condition: Any,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
    ):
        self.resolved = resolved
        self.condition = condition
        self.negative_embeds = negative_embeds
        self._stage = stage
        self._initial_prompt_embeds = prompt_embeds
        self.closed = False
        self.reset()

    @property
    def spec(self):
        return self.resolved.spec

    @property
    def batch_size(self) -> int:
        return 2 if self.spec.use_cfg else 1

    def reset(self) -> None:
        """Back to before the first chunk: fresh caches, the init prompt, the seed's first noise."""
        _check_open(self.closed, "DiT session state")
        stage = self._stage
        self.generator = torch.Generator(device="cpu").manual_seed(self.spec.seed)
        # a block's poses need the frame before it: the history is bounded by one block + 1
        self.trajectory = CameraTrajectory(max_history=self.resolved.geometry.num_frames_per_block + 1)
        self.kv_cache = stage.model.new_kv_cache(
            batch_size=self.batch_size,
            tokens_per_frame=self.resolved.geometry.tokens_per_frame(self.spec.width, self.spec.height),
            sink_frames=self.resolved.sink_size,
            window_frames=self.resolved.window_frames,
            device=stage.device,
            dtype=stage.dtype,
        )
        self.text_cache = stage.build_text_cache(self._initial_prompt_embeds, self.negative_embeds)
        self.next_frame = 0

    def release(self) -> None:
        """Drop every cache and tensor the session holds; later use raises SessionClosedError."""
        self.closed = True
        self.kv_cache = None
        self.text_cache = None
        self.condition = None
        self.negative_embeds = None
        self._initial_prompt_embeds = None

    def check_open(self) -> None:
        _check_open(self.closed, "DiT session state")


class DiTStage:
    """The causal DiT plus the DMD sampler: per chunk, camera + condition + few-step denoising."""

    def __init__(
        self,
        model,
        geometry: ModelGeometry,
        sampler: DMDSampler,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        camera_focal: tuple[float, int, int] | None = None,
    ):
        """``camera_focal``: (focal length in pixels, at this width, at this height) from the
        checkpoint's serving defaults; None is the reference server's 500 px at every size
        (:meth:`Intrinsics.for_frame`)."""
        if CAMERA_UNSHUFFLE != geometry.vae_scale_spatial:
            # the Plücker map is unshuffled by the VAE's stride to line up with the latents
            raise ValueError(
                f"vae scale_factor_spatial={geometry.vae_scale_spatial!r}: the DiT's camera input is "
                f"unshuffled by {CAMERA_UNSHUFFLE}; the two must match (docs/MODEL.md, 'Camera actions → Plücker map')"
            )
        self.model = model
        self.geometry = geometry
        self.sampler = sampler
        self.device = torch.device(device)
        self.dtype = dtype
        self.camera_focal = camera_focal

    def enable_sequence_parallel(self) -> None:
        """Shard every forward's tokens over the default process group (Ulysses; the caller has
        joined it): each rank then holds heads/N of every session's KV cache."""
        from ..models.sequence_parallel import SequenceParallel

        self.model.enable_sequence_parallel(SequenceParallel())

    def intrinsics(self, width: int, height: int) -> Intrinsics:
        """Pinhole intrinsics of a ``width`` x ``height`` session (the Plücker map's rays)."""
        return Intrinsics.for_frame(width, height, self.camera_focal)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        sampler: DMDSampler | None = None,
    ) -> DiTStage:
        dtype = dtype or loading.default_dtype(device)
        model = loading.load_dit(folder, device=device, dtype=dtype)
        defaults = read_serving_defaults(folder)
        return cls(
            model,
            read_geometry(folder),
            sampler or sampler_from_checkpoint(folder),
            device=device,
            dtype=dtype,
            camera_focal=defaults.focal_at_size,
        )

    def new_session(
        self,
        resolved: ResolvedSpec,
        condition: Any,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None = None,
    ) -> DiTSessionState:
        """``condition``: the VAE stage's ConditionLatents of the first frame. ``negative_embeds``
        is required when the spec asks for guidance."""
        if resolved.geometry != self.geometry:
            raise ValueError(f"resolved.geometry={resolved.geometry!r}: not this model's {self.geometry!r}")
        if resolved.spec.use_cfg and negative_embeds is None:
            raise ValueError(
                f"negative_embeds=None: required when guidance_scale={resolved.spec.guidance_scale!r} > 1"
            )
        if not resolved.spec.use_cfg:
            negative_embeds = None
        return DiTSessionState(self, resolved, condition, prompt_embeds, negative_embeds)

    @torch.inference_mode()
    def build_text_cache(self, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None):
        embeds = prompt_embeds if negative_embeds is None else torch.cat([prompt_embeds, negative_embeds])
        return self.model.build_text_cache(embeds.to(self.device, self.dtype))

    @torch.inference_mode()
    def step(
        self,
        state: DiTSessionState,
        conditions: ChunkConditions,
        prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate one chunk: returns its clean latents ``[1, C, F, h, w]`` (fp32), F = latent frames
        per chunk. ``prompt_embeds`` must be given exactly when ``conditions.prompt`` is set."""
        state.check_open()
        resolved, geometry = state.resolved, self.geometry
        spec = resolved.spec
        block = geometry.num_frames_per_block
        num_latent = resolved.latent_frames_per_chunk
        actions = _check_actions(conditions.camera_actions, num_latent)
        if geometry.rope_max_seq_len is not None and state.next_frame + num_latent > geometry.rope_max_seq_len:
            raise PositionLimitReached(state.next_frame, num_latent, geometry.rope_max_seq_len)
        if (conditions.prompt is None) != (prompt_embeds is None):
            raise ValueError(
                f"prompt_embeds={'None' if prompt_embeds is None else 'tensor'}: must be given exactly "
                f"when conditions.prompt is set (conditions.prompt={conditions.prompt!r})"
            )

        # Step 1: a new prompt replaces the cross-attention text cache; the self-attention KV
        # history is kept, so the scene continues under the new prompt
        if prompt_embeds is not None:
            state.text_cache = self.build_text_cache(prompt_embeds, state.negative_embeds)

        blocks = []
        for b in range(resolved.blocks_per_chunk):
            start = state.next_frame
            # Step 2: camera. Each latent frame's actions advance the trajectory; the block's poses
            # become a Plücker map and then per-layer scale/shift once per block (they depend on
            # neither the latents nor the timestep). Per block rather than per chunk so a chunk of
            # two blocks equals two chunks of one (pose normalisation sees the same history).
            for frame_actions in actions[b * block : (b + 1) * block]:
                state.trajectory.advance(frame_actions)
            plucker = plucker_map(
                state.trajectory.chunk_c2w(block),
                spec.height,
                spec.width,
                self.intrinsics(spec.width, spec.height),
                downscale=geometry.vae_scale_spatial,
                device=self.device,
                dtype=self.dtype,
            )
            camera_cache = self.model.build_camera_cache(plucker.expand(state.batch_size, -1, -1, -1, -1))

            # Step 3: the block's condition channels: mask ⊕ first-frame latent (black, mask 0 after
            # latent frame 0)
            condition = state.condition.slice(start, block).to(self.device, self.dtype)

            # Step 4: DMD few-step denoising from fresh session noise; guidance mixes the branches
            flow = functools.partial(
                self._flow, state, condition=condition, start=start, camera_cache=camera_cache, update_cache=False
            )
            shape = (1, geometry.latent_channels, block, resolved.latent_height, resolved.latent_width)
            noise = randn_like_session(torch.empty(shape, device=self.device), state.generator)
            x0 = self.sampler.sample(
                flow, noise, generator=state.generator, num_inference_steps=spec.num_inference_steps
            )

            # Step 5: one forward on the clean block at t = 0 writes its K/V (each branch its own)
            self._flow(state, x0, 0.0, condition=condition, start=start, camera_cache=camera_cache, update_cache=True)
            state.next_frame += block
            blocks.append(x0)
            # the next block's camera cache must not be built beside this one (the memory plan counts one)
            del camera_cache, flow

        return torch.cat(blocks, dim=2)

    def _flow(
        self,
        state: DiTSessionState,
        x_t: torch.Tensor,
        t: float,
        *,
        condition: torch.Tensor,
        start: int,
        camera_cache,
        update_cache: bool,
    ) -> torch.Tensor:
        """The model's flow at ``t`` for the block ``x_t`` (fp32); under guidance both branches run as
        one batch and are mixed as ``v_u + g (v_c - v_u)``."""
        batch = state.batch_size
        hidden = torch.cat([x_t.to(self.dtype), condition], dim=1).expand(batch, -1, -1, -1, -1)
        timestep = torch.full((batch,), float(t), device=self.device, dtype=torch.float32)
        try:
            flow = self.model.forward_block(
                hidden,
                timestep,
                kv_cache=state.kv_cache,
                start_frame=start,
                text_cache=state.text_cache,
                camera_cache=camera_cache,
                update_cache=update_cache,
            )
        except PositionLimitError as exc:
            raise PositionLimitReached(
                start, hidden.shape[2], self.geometry.rope_max_seq_len or -1
            ) from exc
        if batch == 1:
            return flow
        cond, uncond = flow[0:1].float(), flow[1:2].float()
        return uncond + state.spec.guidance_scale * (cond - uncond)


def _check_actions(camera_actions: Sequence[Sequence[str]], num_latent: int) -> tuple[tuple[str, ...], ...]:
    if len(camera_actions) != num_latent:
        raise ValueError(
            f"conditions.camera_actions has {len(camera_actions)} entries: expected one per latent "
            f"frame of the chunk ({num_latent})"
        )
    return tuple(tuple(a) for a in camera_actions)


def sampler_from_checkpoint(folder: str | Path) -> DMDSampler:
    defaults = read_serving_defaults(folder)
    scheduler = loading.load_scheduler_config(folder)
    return DMDSampler(
        timestep_indices=defaults.timestep_indices,
        shift=defaults.shift,
        num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
        timestep_format=defaults.timestep_format,
    )


# ---------------------------------------------------------------------------------------------
# VAE


class VAESessionState:
    """One session's decode side: the streaming decode cache and the decode precision."""

    def __init__(self, stage: VAEStage, resolved: ResolvedSpec):
        self.resolved = resolved
        self.dtype = torch.float32 if resolved.spec.quality == "lossless" else torch.bfloat16
        self._stage = stage
        self.closed = False
        self.reset()

    def reset(self) -> None:
        _check_open(self.closed, "VAE session state")
        self.decode_cache = self._stage.vae_for(self.dtype).new_decode_cache()

    def release(self) -> None:
        self.closed = True
        self.decode_cache = None

    def check_open(self) -> None:
        _check_open(self.closed, "VAE session state")


def served_decoder(folder: str | Path, decoder: str | None = None) -> str:
    """The decoder a checkpoint's sessions get: ``decoder`` (``vae.decoder``) if set, else the
    checkpoint's own (``decoder`` in its ``lingbot_ray.json``), else "wan"."""
    from .fastpath import DECODERS

    return decoder or read_serving_defaults(folder).decoder or DECODERS[0]


class VAEStage:
    """First-frame encoding (the checkpoint's VAE, fp32) and per-session streaming decode (fp32 or
    bf16 by quality) by that VAE's decoder or, with ``decoder``, a tiny temporal one."""

    def __init__(self, vae, geometry: ModelGeometry, *, device: str | torch.device = "cpu", decoder=None, condition_frames: int | None = None):
        """``decoder``: a :class:`~lingbot_ray.models.tiny_decoder.StreamingTinyDecoder` to decode
        with instead of ``vae`` (None: ``vae`` decodes). ``condition_frames``: the checkpoint's
        (``lingbot_ray.json``): latent frames of the first-frame condition encoded, the last repeated
        after them (None: until the encoder's fixed point)."""
        self.vae = vae
        self.condition_frames = condition_frames
        self.geometry = geometry
        self.device = torch.device(device)
        self._by_dtype = {torch.float32: vae if decoder is None else decoder}

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        *,
        device: str | torch.device = "cpu",
        decoder: str | None = None,
        tiny_decoder_path: str | Path | None = None,
    ) -> VAEStage:
        """``decoder`` None is the checkpoint's own (``decoder`` in its ``lingbot_ray.json``, else
        "wan"). "tiny" reads ``tiny_decoder_path`` (a published taew2_1 file or the project's folder;
        None: the checkpoint's ``tiny_decoder/``), checked against the checkpoint's latents."""
        from .fastpath import DECODERS

        decoder = served_decoder(folder, decoder)
        if decoder not in DECODERS:
            raise ValueError(f"vae.decoder={decoder!r}: must be one of {list(DECODERS)}")
        if tiny_decoder_path is not None and decoder != "tiny":
            raise ValueError(f"vae.tiny_decoder_path={str(tiny_decoder_path)!r}: only read with vae.decoder: tiny (this checkpoint decodes with {decoder})")
        geometry = read_geometry(folder)
        tiny = None
        if decoder == "tiny":
            from ..models.tiny_decoder import StreamingTinyDecoder

            path = Path(tiny_decoder_path) if tiny_decoder_path is not None else Path(folder) / TINY_DECODER_FOLDER
            if not path.exists():
                raise ValueError(
                    f"vae.tiny_decoder_path={str(path)!r}: not found (vae.decoder: tiny needs a taew2_1 file or a "
                    "tiny_decoder folder; docs/MODEL.md, 'Tiny decoder')"
                )
            tiny = StreamingTinyDecoder.from_pretrained(path, device=device)
            _check_tiny_decoder(tiny, geometry, path)
        vae = loading.load_vae(folder, device=device, dtype=torch.float32)
        return cls(vae, geometry, device=device, decoder=tiny, condition_frames=read_serving_defaults(folder).condition_frames)

    def vae_for(self, dtype: torch.dtype):
        """The decoder in ``dtype``; the bf16 copy is made on first use ("high" quality sessions)."""
        if dtype not in self._by_dtype:
            self._by_dtype[dtype] = self._by_dtype[torch.float32].with_dtype(dtype)
        return self._by_dtype[dtype]

    def new_session(self, resolved: ResolvedSpec) -> VAESessionState:
        return VAESessionState(self, resolved)

    @torch.inference_mode()
    def encode_condition(self, image: np.ndarray, *, max_frames: int | None = None, on_step: Callable[[], None] | None = None):
        """uint8 [H, W, 3] → the model's ConditionLatents (first frame, then black); the encoder
        stops after ``max_frames`` latent frames or the checkpoint's ``condition_frames``, whichever
        is fewer (the condition's later frames repeat its last); ``on_step`` runs before each encoder
        step and may raise to abandon it (see ``StreamingWanVAE.encode_condition``)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image={getattr(image, 'shape', type(image))!r}: must be uint8 [H, W, 3]")
        pixels = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        pixels = pixels.permute(2, 0, 1).unsqueeze(0).float().div(127.5).sub(1.0)
        limits = [n for n in (max_frames, self.condition_frames) if n is not None]
        return self.vae.encode_condition(pixels, max_frames=min(limits) if limits else None, on_step=on_step)

    @torch.inference_mode()
    def decode(self, state: VAESessionState, latents: torch.Tensor) -> np.ndarray:
        """Clean latents ``[1, C, F, h, w]`` → uint8 frames ``[T, H, W, 3]`` (T = 1+4(F-1) on the
        session's first chunk, 4F after), continuing the session's decode cache."""
        state.check_open()
        vae = self.vae_for(state.dtype)
        frames, state.decode_cache = vae.decode_chunk(latents.to(self.device), state.decode_cache)
        return frames_to_uint8(frames)


def _check_tiny_decoder(tiny, geometry: ModelGeometry, path: Path) -> None:
    config = tiny.model.config
    found = (config.latent_channels, config.spatial_scale, config.t_upscale)
    wanted = (geometry.latent_channels, geometry.vae_scale_spatial, geometry.vae_scale_temporal)
    if found != wanted:
        raise ValueError(
            f"vae.tiny_decoder_path={str(path)!r}: decodes {found[0]} latent channels at {found[1]}x space and "
            f"{found[2]}x time, but the checkpoint's latents have {wanted[0]} channels at {wanted[1]}x and {wanted[2]}x"
        )


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Decoder output ``[1, 3, T, H, W]`` in [-1, 1] → uint8 ``[T, H, W, 3]``.

    docs/PROTOCOL.md: ``uint8(clamp((x+1)/2, 0, 1)·255)`` — a truncating cast, not rounding, so raw
    frames match the reference system's bit for bit.
    """
    scaled = ((frames[0].float() + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0
    return scaled.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()
