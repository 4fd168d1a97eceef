"""Per-session self-attention KV cache for block-causal generation with attention sinks.

The cache is session state, not module state: the transformer allocates one per session with
`CausalLingBotWorldTransformer3DModel.new_kv_cache` and is handed it on every `forward_block` call.

Layout of each layer's buffer `[B, window_frames * tokens_per_frame, heads, head_dim]`, in latent frames:

    [ sink frames (absolute 0 .. sink-1, never move) | recent frames (contiguous, oldest first) | free ]

Visibility rule (the one the full-sequence reference mask of `block_causal_frame_mask` reproduces): a
block of `F` frames starting at absolute frame `s` attends to the sink frames plus the most recent
`window - sink` frames ending with its own last frame `s + F - 1`. The capacity `window_frames` therefore
counts the sink frames and the current block.

Every index here is a host-side Python int, so no call synchronises with the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockPlan:
    """Where one block's keys/values go and what it reads, in token offsets into each layer buffer.

    `write_start:write_end` is the block's own slot; attention reads `0:write_end` (cached frames plus
    the block itself).
    """

    start_frame: int
    num_frames: int
    write_start: int
    write_end: int


@dataclass(frozen=True, eq=False)
class LayerKV:
    """One layer's key/value buffers of a :class:`KVCache`. A transformer block is handed its layer's
    view rather than the cache and a layer index, so that every block runs the same code on tensors
    (a compiled block then serves every layer with one graph: docs/MODEL.md, "Compiled DiT")."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def write_and_read(self, plan: BlockPlan, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put the block's keys/values `[B, tokens, heads, head_dim]` in its slot; return what it attends to.

        Writing the slot does not commit it: until `KVCache.commit(plan)` the slot lies past the
        committed frames and is overwritten by the next call.
        """
        self.keys[:, plan.write_start : plan.write_end] = key
        self.values[:, plan.write_start : plan.write_end] = value
        return self.keys[:, : plan.write_end], self.values[:, : plan.write_end]


class KVCache:
    r"""
    Preallocated per-layer self-attention keys/values of one session.

    Keys are stored already rotated (RoPE at absolute positions), so moving a frame inside the buffer
    never changes its keys.

    Args:
        num_layers (`int`): Number of transformer blocks.
        batch_size (`int`): Batch size of the session's latents.
        tokens_per_frame (`int`): Tokens per latent frame after patching, `(h / p_h) * (w / p_w)`.
        num_heads (`int`): Attention heads held by this cache (all heads, or a sequence-parallel share).
        head_dim (`int`): Channels per head.
        sink_frames (`int`): Latent frames at the start of the session that stay visible forever.
        window_frames (`int`): Capacity in latent frames, including the sink frames and the current block.
        device, dtype: Where and how the buffers are allocated.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        sink_frames: int,
        window_frames: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("tokens_per_frame", tokens_per_frame),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("window_frames", window_frames),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(sink_frames, int) or sink_frames < 0:
            raise ValueError(f"sink_frames must be a non-negative int, got {sink_frames!r}")
        if sink_frames >= window_frames:
            raise ValueError(
                f"sink_frames={sink_frames} must be smaller than window_frames={window_frames}: "
                "the window must leave room for the current block"
            )
        self.num_layers = num_layers
        self.batch_size = batch_size
        self.tokens_per_frame = tokens_per_frame
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.sink_frames = sink_frames
        self.window_frames = window_frames

        self._dtype = dtype
        shape = (batch_size, window_frames * tokens_per_frame, num_heads, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self._device = self.keys[0].device

        self.released = False
        # Committed frames held in the buffers, and the absolute index one past the last of them.
        self.num_frames = 0
        self.end_frame = 0
        # Absolute index of the oldest non-sink frame held (== end_frame when none is held).
        self.first_recent_frame = 0

    # ------------------------------------------------------------------ properties

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_block_frames(self) -> int:
        """The largest block this cache can take: the window minus the sink frames."""
        return self.window_frames - self.sink_frames

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def held_frames(self) -> list[int]:
        """Absolute indices of the committed frames in buffer order (for logging and tests)."""
        num_sink = min(self.num_frames, self.sink_frames)
        return list(range(num_sink)) + list(range(self.first_recent_frame, self.end_frame))

    # ------------------------------------------------------------------ lifecycle

    def reset(self) -> None:
        """Forget every frame; buffers stay allocated (their stale contents are never read)."""
        if self.released:
            raise ValueError("KV cache was released")
        self.num_frames = 0
        self.end_frame = 0
        self.first_recent_frame = 0

    def release(self) -> None:
        """Drop the buffers (end of session); the cache cannot be used afterwards."""
        self.keys = []
        self.values = []
        self.released = True

    # ------------------------------------------------------------------ block protocol

    def plan_block(self, start_frame: int, num_frames: int, tokens_per_frame: int, batch_size: int) -> BlockPlan:
        """Make room for a block and say where it goes.

        Frames the block cannot see (older than its window) are dropped here, in place, for both
        denoising and clean forwards: the next block sees even fewer frames, so dropping them early
        changes no result. The only caller that could notice is one that re-runs the same
        `start_frame` with a *smaller* block; that raises instead of returning a wrong answer.
        """
        if self.released:
            raise ValueError("KV cache was released; allocate a new one with new_kv_cache")
        if batch_size != self.batch_size:
            raise ValueError(f"batch size {batch_size} does not match the KV cache's batch_size={self.batch_size}")
        if tokens_per_frame != self.tokens_per_frame:
            raise ValueError(
                f"tokens per frame {tokens_per_frame} does not match the KV cache's "
                f"tokens_per_frame={self.tokens_per_frame} (latent size changed within a session?)"
            )
        if start_frame != self.end_frame:
            raise ValueError(
                f"start_frame={start_frame} but the KV cache holds frames up to {self.end_frame}: "
                "blocks must be fed in order, each after the clean forward (update_cache=True) of the previous one"
            )
        if num_frames < 1 or num_frames > self.max_block_frames:
            raise ValueError(
                f"block of {num_frames} latent frames does not fit: need 1 <= frames <= window_frames - sink_frames "
                f"= {self.window_frames} - {self.sink_frames}"
            )

        num_sink = min(self.num_frames, self.sink_frames)
        num_recent = self.num_frames - num_sink
        # Oldest non-sink frame the block may see: its window ends with its own last frame.
        keep_from = max(self.sink_frames, start_frame + num_frames - self.max_block_frames)
        if keep_from < min(self.first_recent_frame, self.end_frame):
            raise ValueError(
                f"block at start_frame={start_frame} with {num_frames} frames needs frame {keep_from}, which an "
                f"earlier call with a larger block already dropped; keep the block size fixed within a block"
            )
        drop = min(num_recent, max(0, keep_from - self.first_recent_frame))
        if drop > 0:
            self._drop_oldest_recent(num_sink, num_recent, drop)

        write_start = self.num_frames * self.tokens_per_frame
        write_end = write_start + num_frames * self.tokens_per_frame
        assert self.num_frames + num_frames <= self.window_frames, "visibility rule exceeded the capacity"
        return BlockPlan(start_frame, num_frames, write_start, write_end)

    def layer(self, layer_idx: int) -> LayerKV:
        """One layer's buffers, what that layer's attention reads and writes."""
        return LayerKV(self.keys[layer_idx], self.values[layer_idx])

    def commit(self, plan: BlockPlan) -> None:
        """Make the block's slot part of the cache (the clean context forward)."""
        if plan.start_frame != self.end_frame or plan.write_start != self.num_frames * self.tokens_per_frame:
            raise ValueError(f"stale block plan for start_frame={plan.start_frame}; the cache moved since")
        self.num_frames += plan.num_frames
        self.end_frame += plan.num_frames
        num_sink = min(self.num_frames, self.sink_frames)
        self.first_recent_frame = self.end_frame - (self.num_frames - num_sink)

    # ------------------------------------------------------------------ internals

    def _drop_oldest_recent(self, num_sink: int, num_recent: int, drop: int) -> None:
        tpf = self.tokens_per_frame
        dst = num_sink * tpf
        src = (num_sink + drop) * tpf
        length = (num_recent - drop) * tpf
        # Copy left in pieces no longer than the shift so source and destination never overlap,
        # which avoids a temporary copy of the whole window.
        step = src - dst
        for buf in (*self.keys, *self.values):
            for offset in range(0, length, step):
                n = min(step, length - offset)
                buf[:, dst + offset : dst + offset + n] = buf[:, src + offset : src + offset + n]
        self.num_frames -= drop
        self.first_recent_frame += drop
        logger.debug("KV cache dropped %d frame(s); holds %s", drop, self.held_frames())


def block_causal_frame_mask(
    num_frames: int,
    frames_per_block: int,
    *,
    sink_frames: int = 0,
    window_frames: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Frame-level mask `[F, F]` (True = may attend) that the KV cache reproduces.

    Frames are grouped in blocks of `frames_per_block` (the last may be shorter); a block sees every
    earlier frame and itself, or with `window_frames` only the first `sink_frames` frames plus the most
    recent `window_frames - sink_frames` frames ending with its own last frame.
    """
    if frames_per_block < 1:
        raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
    if window_frames is not None and not 0 <= sink_frames < window_frames:
        raise ValueError(
            f"need 0 <= sink_frames < window_frames, got sink_frames={sink_frames}, window_frames={window_frames}"
        )
    mask = torch.zeros(num_frames, num_frames, dtype=torch.bool, device=device)
    for start in range(0, num_frames, frames_per_block):
        end = min(start + frames_per_block, num_frames)
        mask[start:end, :end] = True
        if window_frames is not None:
            first_recent = max(sink_frames, end - (window_frames - sink_frames))
            mask[start:end, sink_frames:first_recent] = False
    return mask
