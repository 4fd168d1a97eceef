"""Teacher forcing for the causal DiT: every block of a clip trained in one forward pass.

At inference (``engine.stages.DiTStage.step``) a block is denoised while the KV cache holds the
*clean* K/V of earlier blocks (written by the extra forward at t = 0), subject to the sink + window
eviction. One training forward reproduces that for all blocks at once: the sequence is the clean
clip followed by a noisy copy of it,

    frames   [clean 0 .. F-1 | noisy 0 .. F-1]     timesteps [0 … 0 | t_block(f)]
    RoPE     [0 .. F-1       | 0 .. F-1]           (a frame and its noisy copy share a position)

and the frame mask lets a clean frame see what the cache-writing forward sees (block-causal with
the sink/window, ``kv_cache.block_causal_frame_mask``), and a noisy block see the clean frames the
cache holds when that block is generated plus its own noisy frames. The noisy half's flow then
equals the cached inference path exactly (``tests/world/test_teacher_forcing.py``). The forward
leaves out the clean frames no block reads (the last block's), and the model attends group by
group under the frame mask (``attention.FrameMask``), never scoring a pair the mask forbids.
"""

from __future__ import annotations

import torch

from ..models.kv_cache import block_causal_frame_mask


def teacher_forcing_mask(num_frames: int, frames_per_block: int, *, sink_frames: int, window_frames: int | None) -> torch.Tensor:
    """Frame mask ``[2F, 2F]`` (True = may attend) over ``[clean frames | noisy frames]``."""
    clean = block_causal_frame_mask(num_frames, frames_per_block, sink_frames=sink_frames, window_frames=window_frames)
    mask = torch.zeros(2 * num_frames, 2 * num_frames, dtype=torch.bool)
    mask[:num_frames, :num_frames] = clean
    for start in range(0, num_frames, frames_per_block):
        end = min(start + frames_per_block, num_frames)
        rows = slice(num_frames + start, num_frames + end)
        mask[rows, :start] = clean[start:end, :start]  # the clean history the cache holds for this block
        mask[rows, num_frames + start : num_frames + end] = True  # the block itself, noisy
    return mask


def teacher_forced_flow(
    model,
    clean: torch.Tensor,
    noisy: torch.Tensor,
    frame_timesteps: torch.Tensor,
    condition: torch.Tensor,
    text_embeds: torch.Tensor,
    plucker: torch.Tensor | None,
    *,
    sink_frames: int,
    window_frames: int | None,
) -> torch.Tensor:
    """The model's flow on ``noisy`` ``[B, 16, F, h, w]`` at ``frame_timesteps`` ``[B, F]``, every block
    conditioned on the clean history ``clean`` as the KV cache would hold it.

    ``condition`` is ``[B, 20, F, h, w]`` (mask ⊕ first-frame latent, as ``ConditionLatents.slice``),
    ``plucker`` ``[B, 384, F, H/8, W/8]`` (each block's map from ``CameraTrajectory.chunk_c2w``).
    """
    batch, _, frames = clean.shape[:3]
    block = model.config.num_frames_per_block
    mask = teacher_forcing_mask(frames, block, sink_frames=sink_frames, window_frames=window_frames).to(clean.device)
    # Clean frames after the last one a noisy block reads (the last block's, at least) change no
    # output: the clean prefix is closed under its own block-causal attention, so they are left out.
    read = mask[frames:, :frames].any(dim=0).nonzero()
    history = int(read.max()) + 1 if len(read) else 0
    keep = list(range(history)) + list(range(frames, 2 * frames))
    mask = mask[keep][:, keep]
    hidden = torch.cat([torch.cat([clean, condition], dim=1)[:, :, :history], torch.cat([noisy, condition], dim=1)], dim=2)
    timesteps = torch.cat([torch.zeros(batch, history, dtype=torch.float32, device=clean.device), frame_timesteps.float()], dim=1)
    cameras = torch.cat([plucker[:, :, :history], plucker], dim=2) if plucker is not None else None
    flow = model(hidden, timesteps, text_embeds, cameras, frame_mask=mask, frame_positions=list(range(history)) + list(range(frames))).sample
    return flow[:, :, history:]
