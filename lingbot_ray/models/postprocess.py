"""Per-session post-processing of generated chunks: RIFE interpolation, then Real-ESRGAN upscaling.

Frame accounting for one session with ``exp`` = e (2^e − 1 new frames per interval), chunks of N frames:

- first chunk: the N frames give N − 1 intervals → (N − 1)·2^e + 1 frames;
- every later chunk: its first frame is paired with the previous chunk's last frame, so there are N
  intervals and the previous last frame is not repeated → N·2^e frames.

Concatenating the outputs of all chunks equals interpolating the whole video at once, and the output
stream runs at fps·2^e. Interpolation runs before upscaling so RIFE works on the small frames and the
upscaler sees every output frame once. All frames of a chunk go through each model as one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from .realesrgan import SuperResolutionModel
from .rife import IFNet


logger = logging.getLogger(__name__)

__all__ = ["PostProcessSession", "PostProcessor", "output_fps", "output_frame_count"]

MAX_EXP = 4  # 16× frame rate; beyond that the batch per chunk grows past anything realtime


def output_frame_count(num_frames: int, exp: int, has_previous: bool) -> int:
    """Frames :meth:`PostProcessor.process` returns for a chunk of ``num_frames`` (see module doc)."""
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames!r}: must be >= 1")
    k = 2**exp
    return num_frames * k if has_previous else (num_frames - 1) * k + 1


def output_fps(fps: float, exp: int) -> float:
    return fps * 2**exp


@dataclass
class PostProcessSession:
    """One stream's state: the last input frame of the previous chunk ([3, H, W] float in [0, 1]),
    kept at input resolution because it is RIFE's left frame for the next chunk's first interval."""

    previous_last: torch.Tensor | None = field(default=None)
    chunks: int = 0

    def reset(self) -> None:
        """Start a new stream (e.g. after a scene reset): the next chunk is not paired backwards."""
        self.previous_last = None
        self.chunks = 0

    def release(self) -> None:
        self.reset()


class PostProcessor:
    """Stateless apart from weights; all per-stream state lives in :class:`PostProcessSession`.

    rife / esrgan: loaded models (``load_rife`` / ``load_realesrgan``) or None when that stage is off.
    tile / tile_pad: Real-ESRGAN tiling, for frames whose activations do not fit in memory.
    max_batch: most frames (RIFE: frame pairs × timesteps) per model call; None runs each stage on
    the whole chunk at once. Results do not depend on it beyond float rounding.
    """

    def __init__(
        self,
        rife: IFNet | None = None,
        esrgan: SuperResolutionModel | None = None,
        *,
        tile: int | None = None,
        tile_pad: int = 10,
        max_batch: int | None = None,
    ):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r}: must be a positive int or None")
        if rife is not None and esrgan is not None:
            a, b = next(rife.parameters()), next(esrgan.parameters())
            if (a.device, a.dtype) != (b.device, b.dtype):
                # Frames flow from one model straight into the other without a copy.
                raise ValueError(f"rife on {a.device}/{a.dtype} but esrgan on {b.device}/{b.dtype}: must match")
        self.rife = rife
        self.max_batch = max_batch
        self.esrgan = esrgan
        self.tile = tile
        self.tile_pad = tile_pad

    def _device(self) -> tuple[torch.device, torch.dtype]:
        for model in (self.rife, self.esrgan):
            if model is not None:
                p = next(model.parameters())
                return p.device, p.dtype
        return torch.device("cpu"), torch.float32

    @staticmethod
    def new_session() -> PostProcessSession:
        return PostProcessSession()

    def process(
        self,
        session: PostProcessSession,
        frames: np.ndarray,
        *,
        exp: int = 0,
        scale: float = 1.0,
        upscale: float = 1.0,
    ) -> np.ndarray:
        """uint8 [N, H, W, 3] RGB → uint8 [M, H·upscale, W·upscale, 3] with M from
        :func:`output_frame_count`.

        exp: 2^exp − 1 interpolated frames per interval (0 = no interpolation).
        scale: RIFE's flow-estimation scale (not an output scale).
        upscale: output size factor; 1 skips Real-ESRGAN, other values need ``esrgan``.
        The session's state is updated only when the call succeeds.
        """
        # Step 0: validate at the boundary.
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"frames={getattr(frames, 'dtype', type(frames))}{getattr(frames, 'shape', '')}: "
                             "expected a uint8 numpy array [N, H, W, 3]")
        if frames.shape[0] < 1:
            raise ValueError(f"frames.shape={frames.shape}: need at least one frame")
        if not isinstance(exp, int) or not 0 <= exp <= MAX_EXP:
            raise ValueError(f"exp={exp!r}: must be an int in [0, {MAX_EXP}]")
        if exp > 0 and self.rife is None:
            raise ValueError(f"exp={exp}: interpolation requested but no RIFE model is loaded")
        if not float(upscale) > 0:
            raise ValueError(f"upscale={upscale!r}: must be > 0")
        if float(upscale) != 1.0 and self.esrgan is None:
            raise ValueError(f"upscale={upscale}: upscaling requested but no Real-ESRGAN model is loaded")
        prev = session.previous_last
        if prev is not None and tuple(prev.shape[1:]) != frames.shape[1:3]:
            raise ValueError(f"frames.shape={frames.shape}: size differs from the previous chunk's "
                             f"{tuple(prev.shape[1:])}; reset the session first")

        device, dtype = self._device()
        x = torch.from_numpy(frames).to(device).permute(0, 3, 1, 2).to(dtype) / 255.0
        # Step 1: interpolation over the chunk's intervals, the previous chunk's last frame first.
        out = self._interpolate(prev, x, exp, scale) if exp > 0 else x
        # Step 2: upscaling of every output frame in one batch.
        if float(upscale) != 1.0:
            out = self._batched(
                lambda f: self.esrgan.upscale(f, float(upscale), tile=self.tile, tile_pad=self.tile_pad), out
            )
        # Step 3: commit the session state, then quantise (rounding: truncation would darken each pass).
        session.previous_last = x[-1].clone()
        session.chunks += 1
        result = (out.clamp(0, 1) * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        expected = output_frame_count(frames.shape[0], exp, prev is not None)
        assert result.shape[0] == expected, (result.shape, expected)
        return result

    def _batched(self, fn, *tensors: torch.Tensor) -> torch.Tensor:
        n = tensors[0].shape[0]
        step = n if self.max_batch is None else self.max_batch
        return torch.cat([fn(*(t[i : i + step] for t in tensors)) for i in range(0, n, step)], 0)

    def _interpolate(self, prev: torch.Tensor | None, x: torch.Tensor, exp: int, scale: float) -> torch.Tensor:
        seq = x if prev is None else torch.cat((prev.unsqueeze(0), x), 0)
        pairs = seq.shape[0] - 1
        if pairs == 0:
            return x
        k = 2**exp
        # Batch every (interval, timestep) at once: pair-major, timestep-minor.
        t = torch.arange(1, k, device=x.device, dtype=x.dtype) / k
        left = seq[:-1].repeat_interleave(k - 1, 0)
        right = seq[1:].repeat_interleave(k - 1, 0)
        mids = self._batched(lambda a, b, tt: self.rife.interpolate(a, b, tt, scale), left, right, t.repeat(pairs))
        mids = mids.view(pairs, k - 1, *x.shape[1:])
        # Each interval emits its left frame then its middles; the final right frame closes the chunk.
        # With a previous frame the first left frame is that frame, already emitted: drop it.
        body = torch.cat((seq[:-1].unsqueeze(1), mids), 1).flatten(0, 1)
        if prev is not None:
            body = body[1:]
        return torch.cat((body, seq[-1:]), 0)
