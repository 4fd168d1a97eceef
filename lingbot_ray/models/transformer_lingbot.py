"""Causal LingBot World transformer: Wan2.2 blocks with a camera adapter and block-causal KV-cached attention.

Parameter names follow diffusers' `WanTransformer3DModel` (plus the camera tensors, which keep their
on-disk names); `lingbot_ray.models.loading` maps the original Wan names on disk to these.

Two entry points share the same block code:

* `forward_block` — streaming: one block of latent frames attends to a per-session `KVCache` plus
  itself; text K/V (`TextCache`) and camera modulation (`CameraCache`) are precomputed by the caller.
* `forward` — full-sequence reference with an optional frame-level mask, for tests and training.

Both can run Ulysses sequence-parallel over a process group (`enable_sequence_parallel`): each rank
keeps a shard of the tokens, self-attention exchanges them for a share of the heads, and every rank
returns the full flow.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanTimeTextImageEmbedding

from .attention import (
    FrameMask,
    LingBotCrossAttnProcessor,
    LingBotSelfAttnProcessor,
    PositionLimitError,
    rope_cos_sin,
)
from .kv_cache import BlockPlan, KVCache, LayerKV
from .sequence_parallel import SequenceParallel


logger = logging.getLogger(__name__)

__all__ = [
    "CameraCache",
    "CausalLingBotWorldTransformer3DModel",
    "LingBotWorldTransformerBlock",
    "PositionLimitError",
    "TextCache",
]

# The camera input is a Plücker map of 6 channels (origin, direction) pixel-unshuffled by the VAE's
# 8x spatial compression so it lines up with the latent grid: 6 * 8 * 8 channels. These are fixed by
# the encoding, not model sizes, and the published config.json has no key for them; the engine checks
# CAMERA_UNSHUFFLE against the checkpoint's VAE (ModelGeometry.vae_scale_spatial).
PLUCKER_CHANNELS = 6
CAMERA_UNSHUFFLE = 8
CAMERA_CHANNELS = PLUCKER_CHANNELS * CAMERA_UNSHUFFLE * CAMERA_UNSHUFFLE


@dataclass(frozen=True)
class TextCache:
    """Per-layer cross-attention keys/values of one prompt, each `[B, L, heads, head_dim]`."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


@dataclass(frozen=True)
class CameraCache:
    """Per-layer camera modulation of one chunk, each `[B, num_frames * tokens_per_frame, dim]`.

    `shard` is `(rank, world_size)` when the tensors hold only that sequence-parallel rank's token shard
    (`[B, ceil(num_frames * tokens_per_frame / world_size), dim]`); None when they hold every token.
    """

    scales: tuple[torch.Tensor, ...]
    shifts: tuple[torch.Tensor, ...]
    num_frames: int
    tokens_per_frame: int
    shard: tuple[int, int] | None = None


class LingBotWorldTransformerBlock(nn.Module):
    r"""
    One Wan2.2 block with LingBot's camera injection between self- and cross-attention.

    Names follow diffusers' `WanTransformerBlock`: `norm2` is the affine norm before cross-attention
    (the original's `norm3`) and `norm3` the non-affine one before the FFN (the original's `norm2`).

    Args:
        dim (`int`): Hidden size (`num_attention_heads * attention_head_dim`).
        ffn_dim (`int`): Feed-forward inner size.
        num_heads (`int`): Attention heads.
        cross_attn_norm (`bool`): Affine LayerNorm before cross-attention, else identity.
        eps (`float`): Epsilon of every norm.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        head_dim = dim // num_heads

        # 1. Self-attention
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(
            dim=dim, heads=num_heads, dim_head=head_dim, eps=eps, processor=LingBotSelfAttnProcessor()
        )

        # 2. Camera injection
        self.cam_injector_layer1 = nn.Linear(dim, dim)
        self.cam_injector_layer2 = nn.Linear(dim, dim)
        self.cam_scale_layer = nn.Linear(dim, dim)
        self.cam_shift_layer = nn.Linear(dim, dim)

        # 3. Cross-attention
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.attn2 = WanAttention(
            dim=dim,
            heads=num_heads,
            dim_head=head_dim,
            eps=eps,
            cross_attention_dim_head=head_dim,
            processor=LingBotCrossAttnProcessor(),
        )

        # 4. Feed-forward
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")

        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def camera_modulation(self, camera_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model-level camera embedding `c [B, S, dim]` → this block's `(scale, shift)`, each `[B, S, dim]`."""
        hidden = self.cam_injector_layer2(F.silu(self.cam_injector_layer1(camera_embeds))) + camera_embeds
        return self.cam_scale_layer(hidden), self.cam_shift_layer(hidden)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep_proj: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor],
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        camera_modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: LayerKV | None = None,
        plan: BlockPlan | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ) -> torch.Tensor:
        r"""
        Args:
            hidden_states (`torch.Tensor` `[B, S, dim]`, float32): Residual stream.
            timestep_proj (`torch.Tensor` `[B, 1 or S, 6, dim]`, float32): Projected time embedding.
            text_kv: Cross-attention `(key, value)` of this layer, each `[B, L, heads, head_dim]`.
            rotary_emb: `(cos, sin)` from `rope_cos_sin`.
            camera_modulation: `(scale, shift)` `[B, S, dim]` of this layer, or None to skip the camera path.
            attention_mask (`FrameMask` or `torch.Tensor` `[1, 1, S, S]` bool, *optional*): Full-sequence path only.
            kv_cache, plan: Causal path only: this layer's view of the session's KV cache, and the block's plan.
            sequence_parallel (`SequenceParallel`, *optional*): Every `S` above is this rank's token shard,
                except in `rotary_emb`, `attention_mask` and the KV cache, which cover the full sequence.

        Returns:
            `torch.Tensor` `[B, S, dim]` float32.
        """
        # The residual stays fp32 and the modulation is fp32, as in the original Wan (where the fp32
        # modulation promotes the residual); matmuls run in the weights' dtype.
        # read from a layer FP8 conversion keeps (lingbot_ray/models/fp8.py)
        compute_dtype = self.cam_scale_layer.weight.dtype
        shift, scale, gate, c_shift, c_scale, c_gate = (self.scale_shift_table.float() + timestep_proj).unbind(-2)

        # 1. Self-attention
        norm_hidden = self.norm1(hidden_states) * (1 + scale) + shift
        attn_out = self.attn1(
            norm_hidden.to(compute_dtype),
            None,
            attention_mask,
            rotary_emb,
            kv_cache=kv_cache,
            plan=plan,
            sequence_parallel=sequence_parallel,
        )
        hidden_states = hidden_states + attn_out.float() * gate

        # 2. Camera injection (after self-attention, before cross-attention)
        if camera_modulation is not None:
            cam_scale, cam_shift = camera_modulation
            hidden_states = hidden_states * (1 + cam_scale.float()) + cam_shift.float()

        # 3. Cross-attention
        norm_hidden = self.norm2(hidden_states)
        attn_out = self.attn2(norm_hidden.to(compute_dtype), None, None, None, text_kv=text_kv)
        hidden_states = hidden_states + attn_out.float()

        # 4. Feed-forward
        norm_hidden = self.norm3(hidden_states) * (1 + c_scale) + c_shift
        ff_out = self.ffn(norm_hidden.to(compute_dtype))
        return hidden_states + ff_out.float() * c_gate


class CausalLingBotWorldTransformer3DModel(ModelMixin, ConfigMixin):
    r"""
    Block-causal LingBot World transformer (Wan2.2 I2V backbone, one expert, plus a camera adapter).

    Config keys are those of the published `transformer/config.json`; defaults are the real model's.

    Args:
        patch_size (`tuple[int, int, int]`, defaults to `(1, 2, 2)`): (t, h, w) patch; t must be 1.
        num_attention_heads (`int`, defaults to 40): Attention heads.
        attention_head_dim (`int`, defaults to 128): Channels per head.
        in_channels (`int`, defaults to 36): 16 noisy latent + 4 mask + 16 condition latent channels.
        out_channels (`int`, defaults to 16): Flow prediction channels.
        text_dim (`int`, defaults to 4096): Text encoder width.
        freq_dim (`int`, defaults to 256): Sinusoidal timestep embedding width.
        ffn_dim (`int`, defaults to 13824): Feed-forward inner size.
        num_layers (`int`, defaults to 40): Transformer blocks.
        cross_attn_norm (`bool`, defaults to True): Affine LayerNorm before cross-attention.
        qk_norm (`str`, defaults to `"rms_norm_across_heads"`): Only that value is supported.
        eps (`float`, defaults to 1e-6): Norm epsilon.
        image_dim, added_kv_proj_dim, pos_embed_seq_len: Wan I2V CLIP-image inputs; must be None.
        rope_max_seq_len (`int`, defaults to 1024): RoPE positions per axis; bounds a session's latent frames.
        local_attn_size (`int`, defaults to -1): Kept from the training config; the serving window is
            `sliding_window_num_frames`.
        sink_size (`int`, defaults to 9): Default sink latent frames of a KV cache.
        num_frames_per_block (`int`, defaults to 3): Latent frames per causal block.
        sliding_window_num_frames (`int`, defaults to 18): Default KV-cache window in latent frames,
            including the sink and the current block.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LingBotWorldTransformerBlock"]
    # Matched as substrings of parameter names (diffusers' rule): time embedding and projection,
    # modulation tables and every norm stay fp32 when the rest is cast.
    _keep_in_fp32_modules = [
        "time_embedder",
        "time_proj",
        "scale_shift_table",
        "norm1",
        "norm2",
        "norm3",
        "norm_out",
        "norm_q",
        "norm_k",
    ]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        local_attn_size: int = -1,
        sink_size: int = 9,
        num_frames_per_block: int = 3,
        sliding_window_num_frames: int = 18,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if len(patch_size) != 3 or patch_size[0] != 1:
            raise ValueError(f"patch_size must be (1, p_h, p_w) for frame-level causality, got {patch_size}")
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"qk_norm={qk_norm!r} is not supported; expected 'rms_norm_across_heads'")
        clip_inputs = dict(image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim, pos_embed_seq_len=pos_embed_seq_len)
        for name, value in clip_inputs.items():
            if value is not None:
                raise ValueError(f"{name}={value!r} is not supported (LingBot World has no CLIP image input); use None")

        inner_dim = num_attention_heads * attention_head_dim

        # 1. Patch embeddings (latents and camera)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_embedding_wancamctrl = nn.Linear(CAMERA_CHANNELS * math.prod(patch_size), inner_dim)
        self.c2ws_hidden_states_layer1 = nn.Linear(inner_dim, inner_dim)
        self.c2ws_hidden_states_layer2 = nn.Linear(inner_dim, inner_dim)

        # 2. Time and text embeddings (diffusers' module; its forward is not used because it casts
        # the time embedding to the text dtype, and the modulation must stay fp32)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=inner_dim, time_freq_dim=freq_dim, time_proj_dim=inner_dim * 6, text_embed_dim=text_dim
        )

        # 3. Transformer blocks
        self.blocks = nn.ModuleList(
            [
                LingBotWorldTransformerBlock(inner_dim, ffn_dim, num_attention_heads, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )

        # 4. Output norm and projection
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)

        self.gradient_checkpointing = False
        self._sequence_parallel: SequenceParallel | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> CausalLingBotWorldTransformer3DModel:
        r"""
        Load from a local folder in either tensor-name layout, strictly: every tensor is materialised or a
        ValueError names the missing, unexpected and mis-shaped ones.

        Replaces diffusers' loader (which needs `accelerate` for `_keep_in_fp32_modules` and knows only
        diffusers names) with `lingbot_ray.models.loading`'s, the one `load_transformer` uses.

        Args:
            pretrained_model_name_or_path: A local folder: the transformer folder, or a checkpoint folder
                with `subfolder="transformer"`.
            kwargs: `subfolder`, `torch_dtype` (or `dtype`; default float32, `_keep_in_fp32_modules` stay
                float32), `device` (default "cpu"); diffusers' other keywords only at values that change nothing.
                See `lingbot_ray.models.loading.load_pretrained`.
        """
        from .loading import load_pretrained  # loading imports this module

        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------ small helpers

    @property
    def max_latent_frames(self) -> int:
        """Latent frames a session can reach before `PositionLimitError`."""
        return self.config.rope_max_seq_len

    def _rope(self, start_frame: int, frames: int, height: int, width: int, device: torch.device):
        """RoPE tables for ``frames`` latent frames from absolute frame ``start_frame``."""
        return rope_cos_sin(
            self.config.attention_head_dim,
            start_frame,
            frames,
            height // self.config.patch_size[1],
            width // self.config.patch_size[2],
            max_seq_len=self.config.rope_max_seq_len,
            device=device,
        )

    def _rope_at(self, positions: Sequence[int], frames: int, height: int, width: int, device: torch.device):
        """RoPE tables for frames at arbitrary absolute ``positions`` (one per frame)."""
        positions = [int(p) for p in positions]
        if len(positions) != frames or min(positions) < 0:
            raise ValueError(f"frame_positions must be {frames} non-negative ints, got {positions}")
        cos, sin = self._rope(0, max(positions) + 1, height, width, device)
        index = torch.tensor(positions, device=device)

        def pick(table: torch.Tensor) -> torch.Tensor:
            per_frame = table.reshape(max(positions) + 1, -1, *table.shape[2:])
            return per_frame.index_select(0, index).reshape(1, -1, *table.shape[2:])

        return pick(cos), pick(sin)

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens per latent frame of a `latent_height × latent_width` latent grid after patching."""
        _, p_h, p_w = self.config.patch_size
        if latent_height % p_h or latent_width % p_w:
            raise ValueError(f"latent size {latent_height}x{latent_width} is not divisible by the patch {p_h}x{p_w}")
        return (latent_height // p_h) * (latent_width // p_w)

    @property
    def _compute_dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    # ------------------------------------------------------------------------------ sequence parallel

    @property
    def sequence_parallel(self) -> SequenceParallel | None:
        return self._sequence_parallel

    @property
    def local_attention_heads(self) -> int:
        """Self-attention heads this rank holds in its KV cache: all of them, or `heads / N` under SP."""
        heads = self.config.num_attention_heads
        sp = self._sequence_parallel
        return heads if sp is None else sp.local_heads(heads)

    def enable_sequence_parallel(self, sequence_parallel: SequenceParallel) -> None:
        r"""
        Run `forward_block` and `forward` Ulysses sequence-parallel over `sequence_parallel`'s group.

        Every rank of the group holds the same weights and must make the same calls, in the same order,
        with the same arguments; each returns the full flow. KV caches must be allocated (`new_kv_cache`)
        and camera caches built (`build_camera_cache`) after this call: they then hold `heads / N` heads
        and this rank's token shard respectively. Inference only.

        Raises:
            ValueError: if `num_attention_heads` is not divisible by the group's size.
        """
        sequence_parallel.check_heads(self.config.num_attention_heads)
        self._sequence_parallel = sequence_parallel
        logger.info(
            "sequence parallel on: rank %d of %d, %d of %d attention heads per rank",
            sequence_parallel.rank,
            sequence_parallel.world_size,
            self.local_attention_heads,
            self.config.num_attention_heads,
        )

    def disable_sequence_parallel(self) -> None:
        """Back to single-process forwards; caches built under sequence parallelism no longer fit."""
        self._sequence_parallel = None

    # ------------------------------------------------------------------------------ session state

    def new_kv_cache(
        self,
        *,
        batch_size: int = 1,
        tokens_per_frame: int,
        sink_frames: int | None = None,
        window_frames: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        r"""
        Allocate a session's KV cache: per layer `[batch_size, window_frames * tokens_per_frame, heads, head_dim]`,
        where `heads` is `local_attention_heads` (`num_attention_heads / N` under sequence parallelism).

        Args:
            batch_size (`int`): Latent batch size.
            tokens_per_frame (`int`): See `tokens_per_frame(latent_height, latent_width)`.
            sink_frames (`int`, *optional*): Defaults to `config.sink_size`.
            window_frames (`int`, *optional*): Capacity incl. sink and current block; defaults to
                `config.sliding_window_num_frames`.
            device, dtype: Default to the model's attention weights.
        """
        sink = self.config.sink_size if sink_frames is None else sink_frames
        window = self.config.sliding_window_num_frames if window_frames is None else window_frames
        block = self.config.num_frames_per_block
        if sink < 0 or sink + block > window:
            raise ValueError(
                f"sink_frames={sink} + num_frames_per_block={block} must not exceed window_frames={window} "
                "(and sink_frames must be >= 0)"
            )
        weight = self.blocks[0].attn1.to_k.weight
        cache = KVCache(
            num_layers=self.config.num_layers,
            batch_size=batch_size,
            tokens_per_frame=tokens_per_frame,
            num_heads=self.local_attention_heads,
            head_dim=self.config.attention_head_dim,
            sink_frames=sink,
            window_frames=window,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )
        logger.debug("new KV cache: sink=%d window=%d frames, %.1f MiB", sink, window, cache.nbytes() / 2**20)
        return cache

    def build_text_cache(self, text_embeds: torch.Tensor) -> TextCache:
        r"""
        Embed a prompt and project every layer's cross-attention keys/values (incl. norm_k).

        Args:
            text_embeds (`torch.Tensor` `[B, L, text_dim]`): Encoder output, zero-padded to L tokens.

        Returns:
            `TextCache` with per-layer `[B, L, heads, head_dim]` keys and values.
        """
        if text_embeds.ndim != 3 or text_embeds.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"text_embeds must be [B, L, text_dim={self.config.text_dim}], got shape {tuple(text_embeds.shape)}"
            )
        context = self.condition_embedder.text_embedder(text_embeds.to(self._compute_dtype))
        keys, values = [], []
        for block in self.blocks:
            key, value = block.attn2.processor.project_text(block.attn2, context)
            keys.append(key)
            values.append(value)
        return TextCache(tuple(keys), tuple(values))

    def build_camera_cache(self, plucker: torch.Tensor) -> CameraCache:
        r"""
        Camera modulation of every layer for one chunk; it depends on neither latents nor timestep, so
        one cache serves all denoising steps and the clean forward of the chunk.

        Args:
            plucker (`torch.Tensor` `[B, 384, F, H/8, W/8]`): Pixel-unshuffled Plücker map (channel c·64 + r·8 + s).

        Returns:
            `CameraCache` with per-layer `[B, F * tokens_per_frame, dim]` scale and shift; under sequence
            parallelism only this rank's token shard (see `CameraCache.shard`).
        """
        # 1. Patchify: [B, C, F, h*p_h, w*p_w] -> [B, F*h*w, C*p_t*p_h*p_w], features ordered (c, p_t, p_h, p_w)
        if plucker.ndim != 5 or plucker.shape[1] != CAMERA_CHANNELS:
            raise ValueError(f"plucker must be [B, {CAMERA_CHANNELS}, F, H/8, W/8], got shape {tuple(plucker.shape)}")
        batch, channels, frames, height, width = plucker.shape
        p_t, p_h, p_w = self.config.patch_size
        tokens_per_frame = self.tokens_per_frame(height, width)
        h, w = height // p_h, width // p_w
        patches = plucker.to(self._compute_dtype).reshape(batch, channels, frames // p_t, p_t, h, p_h, w, p_w)
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(batch, frames * tokens_per_frame, -1)
        sp = self._sequence_parallel
        if sp is not None:
            # Per-token maths: each rank computes (and holds, for every layer) only its own shard.
            patches = sp.shard(patches)

        # 2. Model-level embedding: c = P(cam); c = c + L2(SiLU(L1(c)))
        camera_embeds = self.patch_embedding_wancamctrl(patches)
        camera_embeds = camera_embeds + self.c2ws_hidden_states_layer2(
            F.silu(self.c2ws_hidden_states_layer1(camera_embeds))
        )

        # 3. Per-layer scale/shift
        scales, shifts = [], []
        for block in self.blocks:
            scale, shift = block.camera_modulation(camera_embeds)
            scales.append(scale)
            shifts.append(shift)
        shard = None if sp is None else (sp.rank, sp.world_size)
        return CameraCache(tuple(scales), tuple(shifts), frames, tokens_per_frame, shard)

    # ------------------------------------------------------------------------------ forwards

    def forward_block(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        *,
        kv_cache: KVCache,
        start_frame: int,
        text_cache: TextCache,
        camera_cache: CameraCache | None = None,
        update_cache: bool,
    ) -> torch.Tensor:
        r"""
        One causal block: its tokens attend to the KV cache plus themselves.

        Args:
            latents (`torch.Tensor` `[B, in_channels, F, h, w]`): Noisy latent ⊕ mask ⊕ condition latent.
            timestep (`torch.Tensor` `[B]`): t in [0, 1000] (or `[B, F]`, one per frame).
            kv_cache (`KVCache`): The session's cache; `start_frame` must equal `kv_cache.end_frame`.
            start_frame (`int`): Absolute latent index of the block's first frame (RoPE position).
            text_cache (`TextCache`): From `build_text_cache`.
            camera_cache (`CameraCache`, *optional*): From `build_camera_cache` for these F frames; None
                skips the camera paths.
            update_cache (`bool`): False for denoising steps (the cache's committed frames are left as they
                are); True for the clean context forward, which commits the block's keys/values.

        Returns:
            `torch.Tensor` `[B, out_channels, F, h, w]` float32 flow prediction.

        Raises:
            PositionLimitError: before any state changes, if the block's frames pass `rope_max_seq_len`.
        """
        # 1. Validate and plan (RoPE limit first, so a refused block leaves the cache untouched)
        batch, frames, height, width = self._check_latents(latents)
        tokens_per_frame = self.tokens_per_frame(height, width)
        if kv_cache.num_heads != self.local_attention_heads:
            raise ValueError(
                f"kv_cache holds {kv_cache.num_heads} heads but this model runs {self.local_attention_heads} "
                f"attention heads per rank ({self._sequence_parallel or 'no sequence parallelism'}); allocate "
                "the cache with new_kv_cache after enabling or disabling sequence parallelism"
            )
        rotary_emb = self._rope(start_frame, frames, height, width, latents.device)
        plan = kv_cache.plan_block(start_frame, frames, tokens_per_frame, batch)

        # 2-5. Embed, run the blocks against the cache, project out
        flow = self._run(
            latents,
            timestep,
            rotary_emb=rotary_emb,
            text_cache=text_cache,
            camera_cache=camera_cache,
            kv_cache=kv_cache,
            plan=plan,
        )

        # 6. Commit the block's keys/values (clean context forward only)
        if update_cache:
            kv_cache.commit(plan)
        return flow

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        plucker: torch.Tensor | None = None,
        *,
        frame_mask: torch.Tensor | None = None,
        start_frame: int = 0,
        frame_positions: Sequence[int] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Full-sequence reference path (same block code as `forward_block`, no cache).

        Args:
            hidden_states (`torch.Tensor` `[B, in_channels, F, h, w]`): Latents.
            timestep (`torch.Tensor` `[B]` or `[B, F]`): One t per sample or per latent frame.
            encoder_hidden_states (`torch.Tensor` `[B, L, text_dim]`): Text encoder output.
            plucker (`torch.Tensor` `[B, 384, F, h, w]`, *optional*): Camera input; None skips the camera paths.
            frame_mask (`torch.Tensor` `[F, F]` bool, *optional*): True where query frame may attend to key
                frame (see `kv_cache.block_causal_frame_mask`); None = full attention.
            start_frame (`int`): Absolute latent index of frame 0 (RoPE position).
            frame_positions (`Sequence[int]`, *optional*): Absolute latent index of every frame instead
                (RoPE positions, need not be distinct): training feeds a clean and a noisy copy of each
                frame at the same position (see `lingbot_ray.world.train_dit`).
            return_dict (`bool`): Return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            `Transformer2DModelOutput` whose `sample` is `[B, out_channels, F, h, w]` float32.
        """
        # 1. Validate, RoPE, token-level mask
        batch, frames, height, width = self._check_latents(hidden_states)
        tokens_per_frame = self.tokens_per_frame(height, width)
        if frame_positions is None:
            rotary_emb = self._rope(start_frame, frames, height, width, hidden_states.device)
        else:
            rotary_emb = self._rope_at(frame_positions, frames, height, width, hidden_states.device)
        attention_mask = None
        if frame_mask is not None:
            if frame_mask.shape != (frames, frames) or frame_mask.dtype != torch.bool:
                raise ValueError(
                    f"frame_mask must be bool [{frames}, {frames}], got {frame_mask.dtype} {tuple(frame_mask.shape)}"
                )
            if not bool(frame_mask.any(dim=1).all()):
                raise ValueError("frame_mask has a query frame that attends to nothing")
            attention_mask = FrameMask(frame_mask.to(hidden_states.device), tokens_per_frame)

        # 2. Conditions
        text_cache = self.build_text_cache(encoder_hidden_states)
        camera_cache = self.build_camera_cache(plucker) if plucker is not None else None

        # 3-5. Embed, blocks, head
        flow = self._run(
            hidden_states,
            timestep,
            rotary_emb=rotary_emb,
            text_cache=text_cache,
            camera_cache=camera_cache,
            attention_mask=attention_mask,
        )
        if not return_dict:
            return (flow,)
        return Transformer2DModelOutput(sample=flow)

    # ------------------------------------------------------------------------------ shared body

    def _check_latents(self, latents: torch.Tensor) -> tuple[int, int, int, int]:
        if latents.ndim != 5 or latents.shape[1] != self.config.in_channels:
            raise ValueError(
                f"latents must be [B, in_channels={self.config.in_channels}, F, h, w], got shape {tuple(latents.shape)}"
            )
        batch, _, frames, height, width = latents.shape
        return batch, frames, height, width

    def _time_embedding(self, timestep: torch.Tensor, batch: int, frames: int, tokens_per_frame: int):
        """`[B]` or `[B, F]` → `temb [B, 1 or S, dim]` and `timestep_proj [B, 1 or S, 6, dim]`, float32."""
        if timestep.shape == (batch,):
            flat, per_frame = timestep, False
        elif timestep.shape == (batch, frames):
            flat, per_frame = timestep.reshape(-1), True
        else:
            raise ValueError(
                f"timestep must be [B={batch}] or [B, F]=[{batch}, {frames}], got shape {tuple(timestep.shape)}"
            )
        embedder = self.condition_embedder
        freqs = embedder.timesteps_proj(flat.float())
        temb = embedder.time_embedder(freqs.to(embedder.time_embedder.linear_1.weight.dtype)).float()
        timestep_proj = embedder.time_proj(F.silu(temb).to(embedder.time_proj.weight.dtype)).float()
        if per_frame:
            temb = temb.unflatten(0, (batch, frames)).repeat_interleave(tokens_per_frame, dim=1)
            timestep_proj = timestep_proj.unflatten(0, (batch, frames)).repeat_interleave(tokens_per_frame, dim=1)
        else:
            temb, timestep_proj = temb[:, None], timestep_proj[:, None]
        return temb, timestep_proj.unflatten(-1, (6, -1))

    def _camera_modulations(
        self, camera_cache: CameraCache | None, batch: int, frames: int, tokens_per_frame: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer `(scale, shift)` covering the tokens this rank runs; a full cache is sharded here."""
        if camera_cache is None:
            return None
        sp = self._sequence_parallel
        expected_shard = None if sp is None else (sp.rank, sp.world_size)
        num_tokens = frames * tokens_per_frame
        if camera_cache.shard is None:
            expected_tokens = num_tokens
        elif camera_cache.shard == expected_shard:
            expected_tokens = sp.shard_length(num_tokens)
        else:
            raise ValueError(
                f"camera_cache was built for sequence-parallel shard (rank, world_size)={camera_cache.shard}, "
                f"but this model runs {expected_shard or 'without sequence parallelism'}"
            )
        if (
            len(camera_cache.scales) != len(self.blocks)
            or (camera_cache.num_frames, camera_cache.tokens_per_frame) != (frames, tokens_per_frame)
            or tuple(camera_cache.scales[0].shape[:2]) != (batch, expected_tokens)
        ):
            raise ValueError(
                f"camera_cache covers {camera_cache.num_frames} frames x {camera_cache.tokens_per_frame} tokens "
                f"(shape {tuple(camera_cache.scales[0].shape)}); this call needs batch {batch}, "
                f"{frames} frames x {tokens_per_frame} tokens"
            )
        pairs = zip(camera_cache.scales, camera_cache.shifts)
        if sp is not None and camera_cache.shard is None:
            return [(sp.shard(scale), sp.shard(shift)) for scale, shift in pairs]
        return list(pairs)

    def _run(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        *,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        text_cache: TextCache,
        camera_cache: CameraCache | None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        plan: BlockPlan | None = None,
    ) -> torch.Tensor:
        batch, _, frames, height, width = latents.shape
        _, p_h, p_w = self.config.patch_size
        h, w = height // p_h, width // p_w
        tokens_per_frame = h * w
        num_tokens = frames * tokens_per_frame
        if len(text_cache.keys) != len(self.blocks) or text_cache.batch_size not in (1, batch):
            raise ValueError(
                f"text_cache has {len(text_cache.keys)} layers and batch {text_cache.batch_size}; "
                f"expected {len(self.blocks)} layers and batch {batch} (or 1)"
            )
        camera_modulations = self._camera_modulations(camera_cache, batch, frames, tokens_per_frame)

        # 2. Patch embedding: [B, C, F, H, W] -> [B, S, dim] float32, tokens ordered (f, h, w)
        hidden_states = self.patch_embedding(latents.to(self._compute_dtype))
        hidden_states = hidden_states.flatten(2).transpose(1, 2).float().contiguous()

        # 3. Time embedding: temb [B, 1|S, dim], timestep_proj [B, 1|S, 6, dim]
        temb, timestep_proj = self._time_embedding(timestep, batch, frames, tokens_per_frame)

        # Sequence parallel: from here to the output projection every per-token tensor is this rank's
        # shard [B, ceil(S/N), ...]; only self-attention sees all S tokens.
        sp = self._sequence_parallel
        if sp is not None:
            hidden_states = sp.shard(hidden_states)
            temb = temb if temb.shape[1] == 1 else sp.shard(temb)
            timestep_proj = timestep_proj if timestep_proj.shape[1] == 1 else sp.shard(timestep_proj)

        # 4. Transformer blocks
        for index, block in enumerate(self.blocks):
            camera_modulation = None if camera_modulations is None else camera_modulations[index]
            text_kv = (text_cache.keys[index], text_cache.values[index])
            if torch.is_grad_enabled() and self.gradient_checkpointing and kv_cache is None:
                no_cache = (None, None)
                hidden_states = self._gradient_checkpointing_func(
                    block, hidden_states, timestep_proj, text_kv, rotary_emb, camera_modulation, attention_mask,
                    *no_cache, sp,
                )
            else:
                hidden_states = block(
                    hidden_states,
                    timestep_proj,
                    text_kv,
                    rotary_emb,
                    camera_modulation,
                    attention_mask,
                    None if kv_cache is None else kv_cache.layer(index),
                    plan,
                    sp,
                )

        # 5. Output norm, projection, unpatchify: [B, S, out*p_t*p_h*p_w] -> [B, out, F, H, W]
        shift, scale = (self.scale_shift_table.float() + temb.unsqueeze(-2)).unbind(-2)
        hidden_states = self.norm_out(hidden_states) * (1 + scale) + shift
        hidden_states = self.proj_out(hidden_states.to(self.proj_out.weight.dtype)).float()
        if sp is not None:
            # Gathered after the projection, where a token is out*p_t*p_h*p_w wide instead of dim.
            hidden_states = sp.gather(hidden_states, num_tokens)
        p_t = self.config.patch_size[0]
        hidden_states = hidden_states.reshape(batch, frames, h, w, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
