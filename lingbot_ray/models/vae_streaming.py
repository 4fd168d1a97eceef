"""Streaming decode and endless-session condition encoding on top of diffusers' `AutoencoderKLWan`.

Wan's VAE is causal in time: each `WanCausalConv3d` sees the current frames plus the last two frames
of its input, which diffusers keeps in a "feature cache" list. `AutoencoderKLWan.decode` owns that list
on the module and clears it at the start and end of every call, so two calls cannot continue one video
and two sessions cannot share the module. Here the cache lives in a per-session object
(`DecodeCache`) that the caller passes in; the VAE module holds only weights.

Every detail of diffusers' cache protocol is confined to `_run_decoder_frame` and
`_run_encoder_step`; the rest of the file never touches `feat_cache`/`feat_idx`.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Union

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from .wan_norm import use_fast_norms

logger = logging.getLogger(__name__)

# One slot per `WanCausalConv3d`: None (no history yet), a tensor of cached frames, or diffusers'
# string sentinel that marks an upsampler which has seen its first frame.
_FeatSlot = Union[torch.Tensor, str, None]

# Values of images and decoded frames live in [-1, 1]; allow rounding noise from resizing/casting.
_PIXEL_RANGE_SLACK = 1e-3


# --------------------------------------------------------------------------------------------------
# diffusers' feature-cache protocol (autoencoder_kl_wan.py, diffusers 0.42), in one place.
#
# * `feat_cache` is a list with one slot per `WanCausalConv3d` inside the encoder (or decoder);
#   slots are addressed in call order through `feat_idx[0]`, which every cached layer advances, so
#   `feat_idx` must be a fresh `[0]` for each call of the encoder/decoder.
# * A slot holds the last (up to two) frames of that conv's input; layers *replace* slot entries,
#   they never modify cached tensors in place, so a shallow copy of the list is a snapshot.
# * Decoder: an `upsample3d` layer seeing an empty slot stores the sentinel "Rep" and skips temporal
#   upsampling, which is why the first latent frame yields one pixel frame and later ones four.
#   `first_chunk=True` must accompany that first frame only: Wan2.2-style residual up-blocks
#   (`DupUp3D`) then drop their leading duplicated frames; Wan2.1 blocks ignore it.
# * Encoder: a `downsample3d` layer seeing an empty slot stores its input and skips the temporal
#   conv, so the first call must get exactly one pixel frame, later calls exactly four
#   (`scale_factor_temporal`), each yielding one latent frame.
# * `post_quant_conv`/`quant_conv` are 1x1x1 and keep no temporal state.
# --------------------------------------------------------------------------------------------------


def _count_cached_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def _run_decoder_frame(
    vae: AutoencoderKLWan, latent_frame: torch.Tensor, feat_map: list[_FeatSlot], *, first_frame_of_session: bool
) -> torch.Tensor:
    """[B, z, 1, h, w] (after post_quant_conv) -> [B, C, T, H', W'] with T = 1 or 4; updates `feat_map`."""
    return vae.decoder(latent_frame, feat_cache=feat_map, feat_idx=[0], first_chunk=first_frame_of_session)


def _run_encoder_step(vae: AutoencoderKLWan, pixels: torch.Tensor, feat_map: list[_FeatSlot]) -> torch.Tensor:
    """Pixel frames (1 on the first step, then `scale_factor_temporal`) -> posterior mean [B, z, 1, h, w]."""
    moments = vae.quant_conv(vae.encoder(pixels, feat_cache=feat_map, feat_idx=[0]))
    # The posterior is [mean ⊕ logvar] on channels; its mode is the mean (no sampling).
    mean, _logvar = torch.chunk(moments, 2, dim=1)
    return mean


def _same_state(previous: list[_FeatSlot], current: list[_FeatSlot]) -> bool:
    for before, after in zip(previous, current, strict=True):
        if before is None and after is None:
            continue  # 1x1 shortcut convs are counted as slots but never cache anything
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            return False
        if before.shape != after.shape or not torch.equal(before, after):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Session state
# --------------------------------------------------------------------------------------------------


def pixel_frames(num_latent_frames: int, temporal_ratio: int, *, first_chunk: bool) -> int:
    """Pixel frames a causal decoder yields for ``num_latent_frames``: the session's very first latent
    frame gives one, every other ``temporal_ratio`` (the Wan VAE's rule; the tiny decoder keeps it)."""
    if num_latent_frames < 1:
        return 0
    if first_chunk:
        return 1 + temporal_ratio * (num_latent_frames - 1)
    return temporal_ratio * num_latent_frames


@dataclass
class DecodeCache:
    """One session's decoder state: one slot per cached layer (the Wan decoder's causal convs, or the
    tiny decoder's memory blocks, lingbot_ray/models/tiny_decoder.py) and how far the session has
    decoded.

    Created by the decoder's `new_decode_cache()`; pass it to every `decode_chunk` of the session,
    in order. It records the batch size, latent size, dtype and device of the first chunk so that a
    later chunk of another shape is rejected instead of silently mixing states.
    """

    feat_map: list[_FeatSlot]
    temporal_ratio: int  # pixel frames per latent frame after the first
    num_latent_frames: int = 0
    latent_shape: tuple[int, int, int] | None = None  # (batch, height, width) of the session's latents
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    owner_id: int = field(default=0, repr=False)

    @property
    def num_pixel_frames(self) -> int:
        """Pixel frames produced so far (1 for the first latent frame, `temporal_ratio` for each later one)."""
        return pixel_frames(self.num_latent_frames, self.temporal_ratio, first_chunk=True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.feat_map if isinstance(t, torch.Tensor))

    def commit(self, feat_map: list, latents: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        """Take a chunk's new state, once every latent frame of ``latents`` [B, C, F, h, w] decoded."""
        self.feat_map = feat_map
        self.num_latent_frames += latents.shape[2]
        self.latent_shape = (latents.shape[0], latents.shape[3], latents.shape[4])
        self.dtype = dtype
        self.device = device

    def reset(self) -> None:
        """Forget the session's history: the next chunk starts a new video."""
        self.feat_map = [None] * len(self.feat_map)
        self.num_latent_frames = 0
        self.latent_shape = None
        self.dtype = None
        self.device = None

    def release(self) -> None:
        """Drop the cached tensors so their memory can be freed (the same as `reset`)."""
        self.reset()


def check_decode_input(
    latents: torch.Tensor,
    cache: DecodeCache,
    *,
    owner_id: int,
    slots: int,
    z_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    decoder: str,
) -> None:
    """Refuse, by name, a chunk that cannot continue ``cache``'s session on this decoder: a cache of
    another decoder, latents of the wrong rank, channels, size or kind, or a decoder whose dtype or
    device changed mid-session."""
    if not isinstance(cache, DecodeCache):
        raise ValueError(f"cache must be a DecodeCache, got {type(cache).__name__}")
    if cache.owner_id != owner_id or len(cache.feat_map) != slots:
        raise ValueError(f"cache was created by another {decoder}; use this decoder's new_decode_cache()")
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a [B, {z_dim}, F, h, w] tensor, got {shape}")
    batch, channels, num_frames, height, width = latents.shape
    if channels != z_dim:
        raise ValueError(f"latents must have {z_dim} channels, got shape {tuple(latents.shape)}")
    if num_frames < 1 or batch < 1 or height < 1 or width < 1:
        raise ValueError(f"latents must be non-empty, got shape {tuple(latents.shape)}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")
    if cache.latent_shape is not None and cache.latent_shape != (batch, height, width):
        raise ValueError(
            f"latents (batch, h, w) = {(batch, height, width)} differ from the session's "
            f"{cache.latent_shape}; start a new cache for a new size"
        )
    if cache.num_latent_frames and (cache.dtype != dtype or cache.device != device):
        raise ValueError(f"cache holds {cache.dtype} on {cache.device} but the decoder now runs {dtype} on {device}")


@dataclass(frozen=True)
class ConditionLatents:
    """The I2V condition of an endless session: mask ⊕ VAE latents of [image, zero frames, ...].

    `latents` holds the normalised latent frames 0..K-1 of the condition video; frame K-1 is the
    constant tail: every later latent frame of the endless condition video equals it exactly
    (the encoder's feature cache reached a fixed point). `mask_channels` is the VAE's temporal
    compression (4 for Wan): the mask is 1 in all of them on latent frame 0 and 0 elsewhere.
    """

    latents: torch.Tensor  # [B, z_dim, K, h, w], normalised with latents_mean/std
    mask_channels: int

    @property
    def num_encoded_frames(self) -> int:
        return self.latents.shape[2]

    def slice(self, start_frame: int, num_frames: int) -> torch.Tensor:
        """Condition of latent frames [start_frame, start_frame + num_frames): [B, mask + z_dim, F, h, w].

        Channel order is the 4 mask channels, then the 16 latent channels (the DiT input is
        16 noisy ⊕ 4 mask ⊕ 16 condition).
        """
        if isinstance(start_frame, bool) or not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"start_frame must be a non-negative int, got {start_frame!r}")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        batch, _, encoded, height, width = self.latents.shape
        frames = torch.arange(start_frame, start_frame + num_frames, device=self.latents.device)
        latents = self.latents.index_select(2, frames.clamp(max=encoded - 1))
        mask = (frames == 0).to(self.latents.dtype).view(1, 1, num_frames, 1, 1)
        mask = mask.expand(batch, self.mask_channels, num_frames, height, width)
        return torch.cat([mask, latents], dim=1)


# --------------------------------------------------------------------------------------------------
# The model wrapper
# --------------------------------------------------------------------------------------------------


class StreamingWanVAE:
    """Wan2.1 VAE with session-owned causal state.

    Holds only the (shared, read-only) `AutoencoderKLWan`; every session keeps its own
    `DecodeCache`. Decoding runs in the VAE's parameter dtype (choose it with
    `from_pretrained(dtype=...)`); de-normalisation is done in float32 first.

    Args:
        vae: a loaded `AutoencoderKLWan`; its weights are used as they are, its RMS norms get the
            faster forward of the same maths (`wan_norm.use_fast_norms`, in place).
        max_condition_frames: bound on the latent frames encoded while looking for the encoder's
            fixed point in `encode_condition`.
    """

    def __init__(self, vae: AutoencoderKLWan, *, max_condition_frames: int = 64) -> None:
        if not isinstance(vae, AutoencoderKLWan):
            raise ValueError(f"vae must be an AutoencoderKLWan, got {type(vae).__name__}")
        if max_condition_frames < 2:
            raise ValueError(f"max_condition_frames must be >= 2, got {max_condition_frames}")
        if vae.config.patch_size is not None:
            # Patchified VAEs (Wan2.2 TI2V, z_dim 48) belong to other model families.
            raise ValueError(f"only Wan2.1-layout VAEs (patch_size None) are supported, got {vae.config.patch_size}")
        if vae.use_tiling:
            logger.warning("AutoencoderKLWan tiling is enabled but ignored: streaming decodes whole frames")
        self.vae = use_fast_norms(vae.eval())
        self.max_condition_frames = max_condition_frames
        config = vae.config
        self.z_dim: int = config.z_dim
        self.temporal_ratio: int = 2 ** sum(bool(t) for t in config.temperal_downsample)
        self.spatial_ratio: int = config.scale_factor_spatial
        self._decoder_slots = _count_cached_convs(vae.decoder)
        self._encoder_slots = _count_cached_convs(vae.encoder)
        self._latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if self._latents_mean.shape[1] != self.z_dim or self._latents_std.shape[1] != self.z_dim:
            raise ValueError(
                f"latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                f"{self._latents_mean.shape[1]}/{self._latents_std.shape[1]}"
            )

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        subfolder: str | None = "vae",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_condition_frames: int = 64,
    ) -> StreamingWanVAE:
        """Load `folder/vae` (or `folder` itself with `subfolder=None`) of a diffusers-style checkpoint."""
        path = os.path.join(os.fspath(folder), subfolder) if subfolder else os.fspath(folder)
        vae = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
        return cls(vae.to(device), max_condition_frames=max_condition_frames)

    def with_dtype(self, dtype: torch.dtype) -> StreamingWanVAE:
        """A copy of this VAE in ``dtype`` (the weights copied, this one unchanged)."""
        return type(self)(copy.deepcopy(self.vae).to(dtype=dtype), max_condition_frames=self.max_condition_frames)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def num_pixel_frames(self, num_latent_frames: int, *, first_chunk: bool) -> int:
        """Pixel frames that `decode_chunk` returns for a chunk of `num_latent_frames`."""
        return pixel_frames(num_latent_frames, self.temporal_ratio, first_chunk=first_chunk)

    # ---------------------------------------------------------------------------------- decode

    def new_decode_cache(self) -> DecodeCache:
        return DecodeCache(
            feat_map=[None] * self._decoder_slots, temporal_ratio=self.temporal_ratio, owner_id=id(self.vae)
        )

    # no_grad rather than inference_mode: callers may post-process the frames in place.
    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        """Decode the session's next latent frames.

        Args:
            latents: [B, z_dim, F, h, w], normalised as the DiT produces them.
            cache: the session's `DecodeCache`; updated only if the whole chunk decodes.

        Returns:
            frames [B, 3, T, H, W] in [-1, 1] (VAE dtype), with T = 1 + 4(F-1) on the session's first
            chunk and 4F afterwards; and the same `cache`, advanced by F latent frames.
        """
        # Step 1: validate against the VAE and the session's earlier chunks.
        self._check_decode_input(latents, cache)
        num_frames = latents.shape[2]

        # Step 2: undo the DiT-space normalisation (float32, then the VAE's dtype).
        mean = self._latents_mean.to(latents.device)
        std = self._latents_std.to(latents.device)
        z = (latents.float() * std + mean).to(device=self.device, dtype=self.dtype)
        z = self.vae.post_quant_conv(z)

        # Step 3: one latent frame at a time through the decoder, on a snapshot of the cache so a
        # failure mid-chunk leaves the session's state untouched.
        feat_map = list(cache.feat_map)
        pieces = []
        for i in range(num_frames):
            first = cache.num_latent_frames + i == 0
            pieces.append(_run_decoder_frame(self.vae, z[:, :, i : i + 1], feat_map, first_frame_of_session=first))
        frames = torch.cat(pieces, dim=2)
        frames = frames.clamp(-1.0, 1.0)

        # Step 4: commit.
        cache.commit(feat_map, latents, self.dtype, self.device)
        return frames, cache

    def _check_decode_input(self, latents: torch.Tensor, cache: DecodeCache) -> None:
        check_decode_input(latents, cache, owner_id=id(self.vae), slots=self._decoder_slots, z_dim=self.z_dim,
                           dtype=self.dtype, device=self.device, decoder="StreamingWanVAE")  # fmt: skip

    # ---------------------------------------------------------------------------------- encode

    @torch.no_grad()
    def encode_condition(
        self, image: torch.Tensor, *, max_frames: int | None = None, on_step: Callable[[], None] | None = None
    ) -> ConditionLatents:
        """Condition latents of an endless session started from `image`.

        The condition video is [image, then zero frames forever] in the VAE's [-1, 1] pixel space:
        zeros, not -1, because that is what Wan I2V trains and samples with (the original Wan
        `image2video` and diffusers' `WanImageToVideoPipeline` both pad with `zeros` after mapping the
        image to [-1, 1]); docs/MODEL.md's "black frames" means this padding.

        The encoder is causal, so the video is encoded as a stream (first pixel frame alone, then 4
        per latent frame) until its feature cache equals the previous step's; from then on every
        latent frame is identical, so the last encoded frame serves as the constant tail.

        Args:
            image: [B, 3, H, W] in [-1, 1]; H and W multiples of the VAE's spatial compression.
            max_frames: stop after this many latent frames even before the fixed point (training
                needs only a clip's first frames; those are identical either way).
            on_step: called before every encoder step after the first; raising from it abandons the
                encoding (a session closed while it opened: at 832x480 on a CPU this takes minutes).

        Returns:
            `ConditionLatents` (normalised latents in float32 on the VAE's device).
        """
        self._check_image(image)
        first = image.to(device=self.device, dtype=self.dtype).unsqueeze(2)
        batch, channels, _, height, width = first.shape
        blank = first.new_zeros(batch, channels, self.temporal_ratio, height, width)

        feat_map: list[_FeatSlot] = [None] * self._encoder_slots
        means = [_run_encoder_step(self.vae, first, feat_map)]
        fixed_point = False
        for _ in range(1, self.max_condition_frames):
            if max_frames is not None and len(means) >= max_frames:
                break
            if on_step is not None:
                on_step()
            previous = list(feat_map)
            means.append(_run_encoder_step(self.vae, blank, feat_map))
            if _same_state(previous, feat_map):
                fixed_point = True
                break
        else:
            raise RuntimeError(
                f"VAE encoder state did not reach a fixed point within max_condition_frames="
                f"{self.max_condition_frames} latent frames (non-finite weights or a non-deterministic "
                f"backend?); raise max_condition_frames"
            )
        if fixed_point:
            logger.info("condition latents: encoder fixed point after %d latent frames", len(means))

        mean = self._latents_mean.to(self.device)
        std = self._latents_std.to(self.device)
        latents = (torch.cat(means, dim=2).float() - mean) / std
        return ConditionLatents(latents=latents, mask_channels=self.temporal_ratio)

    def _check_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] != self.vae.config.in_channels:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image must be a [B, {self.vae.config.in_channels}, H, W] tensor, got {shape}")
        _, _, height, width = image.shape
        if height < self.spatial_ratio or width < self.spatial_ratio:
            raise ValueError(f"image size {height}x{width} is smaller than one latent pixel ({self.spatial_ratio})")
        if height % self.spatial_ratio or width % self.spatial_ratio:
            raise ValueError(f"image size {height}x{width} must be a multiple of {self.spatial_ratio}")
        if not image.is_floating_point():
            raise ValueError(f"image must be floating point in [-1, 1], got {image.dtype}")
        if not bool(torch.isfinite(image).all()):
            raise ValueError("image contains NaN or infinite values")
        low, high = image.aminmax()
        if low.item() < -1.0 - _PIXEL_RANGE_SLACK or high.item() > 1.0 + _PIXEL_RANGE_SLACK:
            raise ValueError(f"image values must lie in [-1, 1], got [{low.item():.4g}, {high.item():.4g}]")
