"""Attention maths of the LingBot World transformer: 3D RoPE and the self/cross-attention processors.

The processors follow diffusers' split: `diffusers.models.transformers.transformer_wan.WanAttention`
holds the weights (`to_q/to_k/to_v/to_out.0`, `norm_q/norm_k` = RMSNorm across all heads), a processor
does the maths. The core attention call is one replaceable function (`attention_fn`) and one method
(`LingBotSelfAttnProcessor.core`), so sequence parallelism can wrap exactly that part: all-to-all
sequence→heads on the rotated q/k/v, the KV-cache write and attention over full sequences on a share of
the heads, then heads→sequence on the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn


if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_wan import WanAttention

    from .kv_cache import BlockPlan, LayerKV
    from .sequence_parallel import SequenceParallel


class PositionLimitError(ValueError):
    """A block would need a RoPE position at or beyond `rope_max_seq_len`.

    Temporal positions are absolute latent-frame indices that grow over a session; the session must stop
    (or re-base its positions) before this is raised.
    """


# ---------------------------------------------------------------------------------------------- RoPE


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the (frame, height, width) axes; (44, 42, 42) for head_dim 128.

    Same split as the original Wan (`d - 4*(d//6), 2*(d//6), 2*(d//6)`) and diffusers' WanRotaryPosEmbed.
    """
    if head_dim % 2 != 0 or head_dim < 6:
        raise ValueError(f"attention_head_dim must be even and >= 6 for 3D RoPE, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    # float64 like the original Wan, so large absolute frame indices keep their precision.
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    return torch.outer(positions.to(torch.float64), inv_freq)


def rope_cos_sin(
    head_dim: int,
    start_frame: int,
    num_frames: int,
    height: int,
    width: int,
    *,
    max_seq_len: int,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation tables for a `num_frames × height × width` token grid starting at latent frame `start_frame`.

    Returns:
        `(cos, sin)`, each `[1, num_frames*height*width, 1, head_dim // 2]` float32, token order (f, h, w),
        one entry per interleaved channel pair `(x[2i], x[2i+1])`.

    Raises:
        PositionLimitError: if `start_frame + num_frames > max_seq_len`.
    """
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}")
    if start_frame + num_frames > max_seq_len:
        raise PositionLimitError(
            f"latent frames {start_frame}..{start_frame + num_frames - 1} exceed RoPE's rope_max_seq_len={max_seq_len} "
            f"temporal positions; end the session (or re-base positions) before latent frame {max_seq_len}"
        )
    if height > max_seq_len or width > max_seq_len:
        raise ValueError(f"token grid {height}x{width} exceeds rope_max_seq_len={max_seq_len}")
    dt, dh, dw = rope_axis_dims(head_dim)
    frames = torch.arange(start_frame, start_frame + num_frames, device=device)
    angles_f = _axis_angles(frames, dt, theta)
    angles_h = _axis_angles(torch.arange(height, device=device), dh, theta)
    angles_w = _axis_angles(torch.arange(width, device=device), dw, theta)
    grid = (num_frames, height, width)
    angles = torch.cat(
        [
            angles_f[:, None, None, :].expand(*grid, -1),
            angles_h[None, :, None, :].expand(*grid, -1),
            angles_w[None, None, :, :].expand(*grid, -1),
        ],
        dim=-1,
    ).reshape(1, -1, 1, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of `x` `[B, S, H, D]` (complex view of the original Wan), in fp32."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


# ------------------------------------------------------------------------------------ core attention

AttentionFn = Callable[..., torch.Tensor]


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    backend=None,
) -> torch.Tensor:
    """`[B, Sq, H, D] × [B, Sk, H, D] → [B, Sq, H, D]`; `attn_mask` bool, broadcastable to `[B, H, Sq, Sk]`.

    Goes through diffusers' dispatcher so `model.set_attention_backend(...)` picks the kernel.
    """
    if attn_mask is not None and attn_mask.ndim != 4:
        # The dispatcher reads a 2D mask as [batch, keys]; a 4D mask is never ambiguous.
        raise ValueError(f"attn_mask must be 4D [B|1, H|1, Sq, Sk], got shape {tuple(attn_mask.shape)}")
    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, backend=backend)


class FrameMask:
    """A frame-level attention mask ``[F, F]`` (True = the query frame may attend to the key frame)
    over a sequence of ``F`` frames of ``tokens_per_frame`` tokens each, ordered (f, h, w).

    Attention under it runs as one unmasked call per group of query frames that share a row: those
    frames' queries against the keys of exactly the frames their row allows. The same maths as the
    dense token mask (``dense``), without computing the scores it would throw away: a block-causal
    training sequence wastes most of them (teacher forcing: ~70 %), and the masked CPU kernel is
    slower per score than the unmasked one.
    """

    def __init__(self, frame_mask: torch.Tensor, tokens_per_frame: int) -> None:
        self.frames, self.tokens_per_frame = frame_mask.shape[0], tokens_per_frame
        self.frame_mask = frame_mask
        rows: dict[tuple[bool, ...], list[int]] = {}
        for frame, row in enumerate(frame_mask.tolist()):
            rows.setdefault(tuple(row), []).append(frame)
        device = frame_mask.device
        # (query frames, key frames) per group, and where each query frame's output lands
        self.groups = [
            (torch.tensor(queries, device=device), torch.tensor([f for f, on in enumerate(row) if on], device=device))
            for row, queries in rows.items()
        ]
        order = torch.cat([queries for queries, _ in self.groups])
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(len(order), device=device)

    def dense(self) -> torch.Tensor:
        """The token-level mask ``[1, 1, S, S]`` (S = frames × tokens_per_frame)."""
        tokens = self.tokens_per_frame
        return self.frame_mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)[None, None]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_fn: AttentionFn, backend=None) -> torch.Tensor:
        """``[B, S, H, D]`` query/key/value → ``[B, S, H, D]``, attention under this mask."""
        tokens = query.shape[1]
        if tokens != self.frames * self.tokens_per_frame or key.shape[1] != tokens:
            raise ValueError(f"FrameMask covers {self.frames} frames x {self.tokens_per_frame} tokens, got {tokens} queries, {key.shape[1]} keys")
        per_frame = [x.unflatten(1, (self.frames, self.tokens_per_frame)) for x in (query, key, value)]
        outs = []
        for queries, keys in self.groups:
            q, k, v = (x.index_select(1, index).flatten(1, 2) for x, index in zip(per_frame, (queries, keys, keys)))
            outs.append(attention_fn(q, k, v, None, backend=backend).unflatten(1, (len(queries), self.tokens_per_frame)))
        return torch.cat(outs, dim=1).index_select(1, self.inverse).flatten(1, 2)


def _rms_norm_fp32(norm: torch.nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # fp32 like the original WanRMSNorm; the weight may be kept in fp32 while x is bf16.
    weight = norm.weight.float() if norm.weight is not None else None
    return F.rms_norm(x.float(), norm.normalized_shape, weight, norm.eps).to(x.dtype)


class LingBotSelfAttnProcessor:
    r"""
    Self-attention with RoPE at absolute latent-frame positions, over either the tokens of the call
    (full-sequence path, optional mask) or a KV cache plus the block's own tokens (causal path).

    With `sequence_parallel`, `hidden_states` is this rank's token shard; q/k/v are projected and
    normalised on the shard (norm_q/norm_k span all heads), then exchanged so that RoPE, the KV cache
    and attention see the full sequence on `heads / N` heads, and the output is exchanged back.
    """

    # Read and set by diffusers' `ModelMixin.set_attention_backend`.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, attention_fn: AttentionFn = scaled_dot_product_attention) -> None:
        self.attention_fn = attention_fn

    def __call__(
        self,
        attn: "WanAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        kv_cache: "LayerKV | None" = None,
        plan: "BlockPlan | None" = None,
        sequence_parallel: "SequenceParallel | None" = None,
    ) -> torch.Tensor:
        """`hidden_states [B, S, dim]` → `[B, S, dim]` (with `sequence_parallel`, S is this rank's shard length).

        `rotary_emb` and `attention_mask` always cover the full sequence.
        """
        if encoder_hidden_states is not None:
            raise ValueError("self-attention takes no encoder_hidden_states")
        if rotary_emb is None:
            raise ValueError("self-attention needs rotary_emb (cos, sin)")
        query = _rms_norm_fp32(attn.norm_q, attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = _rms_norm_fp32(attn.norm_k, attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if sequence_parallel is not None:
            # One exchange for q, k and v stacked on the batch axis instead of three collectives. RoPE runs
            # after it so that every token is rotated at its true (frame, h, w) position in the full sequence.
            qkv = sequence_parallel.sequence_to_heads(torch.cat([query, key, value]), rotary_emb[0].shape[1])
            query, key, value = qkv.chunk(3)
        query = apply_rope(query, *rotary_emb)
        key = apply_rope(key, *rotary_emb)

        out = self.core(
            query, key, value, attention_mask=attention_mask, kv_cache=kv_cache, plan=plan
        )
        if sequence_parallel is not None:
            out = sequence_parallel.heads_to_sequence(out)
        out = out.flatten(2).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def core(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        kv_cache: "LayerKV | None" = None,
        plan: "BlockPlan | None" = None,
    ) -> torch.Tensor:
        """Rotated `query/key/value [B, S, H, D]` → `[B, S, H, D]`; with a cache, keys/values go through it."""
        if kv_cache is not None:
            if attention_mask is not None:
                raise ValueError("attention_mask is not supported together with a KV cache")
            key, value = kv_cache.write_and_read(plan, key.to(kv_cache.dtype), value.to(kv_cache.dtype))
            query = query.to(kv_cache.dtype)
        if isinstance(attention_mask, FrameMask):
            return attention_mask.attend(query, key, value, self.attention_fn, self._attention_backend)
        return self.attention_fn(query, key, value, attention_mask, backend=self._attention_backend)


class LingBotCrossAttnProcessor:
    r"""
    Text cross-attention whose keys/values are computed once per prompt (`project_text`) and reused.
    """

    _attention_backend = None
    _parallel_config = None

    def __init__(self, attention_fn: AttentionFn = scaled_dot_product_attention) -> None:
        self.attention_fn = attention_fn

    @staticmethod
    def project_text(attn: "WanAttention", context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded text `[B, L, dim]` → `(key, value)`, each `[B, L, H, D]` (key after norm_k)."""
        key = _rms_norm_fp32(attn.norm_k, attn.to_k(context)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(context).unflatten(2, (attn.heads, -1))
        return key, value

    def __call__(
        self,
        attn: "WanAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        text_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`hidden_states [B, S, dim]` attending to `text_kv` (or `encoder_hidden_states [B, L, dim]`)."""
        if text_kv is None:
            if encoder_hidden_states is None:
                raise ValueError("cross-attention needs text_kv or encoder_hidden_states")
            text_kv = self.project_text(attn, encoder_hidden_states)
        key, value = text_kv
        query = _rms_norm_fp32(attn.norm_q, attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        if key.shape[0] != query.shape[0]:
            if key.shape[0] != 1:
                raise ValueError(f"text batch {key.shape[0]} does not match latent batch {query.shape[0]}")
            key = key.expand(query.shape[0], -1, -1, -1)
            value = value.expand(query.shape[0], -1, -1, -1)
        key, value = key.to(query.dtype), value.to(query.dtype)
        out = self.attention_fn(query, key, value, attention_mask, backend=self._attention_backend)
        out = out.flatten(2).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))
