"""The linear code of a video on the Wan VAE's latent grid: the teacher of the VAE's first steps.

A Wan2.1 latent stands for an 8×8-pixel block of one frame (the first latent frame of a stream) or of
four frames (every later one), in 16 channels. The best *linear* 16-value code of such a block is its
principal components (PCA): this module fits them on training clips, one basis for the single-frame
blocks (192 values) and one for the four-frame blocks (768 values), and codes a clip on exactly the
grid the causal encoder produces (frame 0 alone, then four frames per latent frame).

Why it exists: trained end to end from scratch, the VAE learns slowly on a CPU — its encoder's code
starts meaningless, and the decoder has nothing to learn from (measured: 19.3 dB after 1,000 steps,
21.4 dB after 8,000, on training crops). The principal components are a good code from the first
step (about 24 dB decoded linearly), so the VAE's first ``teacher_steps`` learn two supervised
problems instead (``train_vae``): the encoder regresses the code, and the decoder decodes it (23.0 dB
after 1,000 steps). End-to-end training then starts from there. docs/EMBEDDED_MODEL.md gives the
measurements.

Each component is divided by its standard deviation on the fitted blocks, so every channel of the
code has unit spread, in both bases: the code is already "normalised" in the sense of the VAE's
``latents_mean``/``latents_std`` (0 and 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .render import TEMPORAL_STRIDE

BLOCK = 8  # pixels per latent, each way (the Wan VAE's spatial ratio)
CHANNELS = 16  # values per latent by default (the Wan2.1 latent's channels)


def blocks(frames: torch.Tensor) -> torch.Tensor:
    """Pixels ``[B, 3, t, H, W]`` → ``[B, H/8, W/8, t·8·8·3]``: each 8×8 block of ``t`` frames, flat."""
    batch, colours, steps, height, width = frames.shape
    grid = frames.reshape(batch, colours, steps, height // BLOCK, BLOCK, width // BLOCK, BLOCK)
    return grid.permute(0, 3, 5, 2, 4, 6, 1).reshape(batch, height // BLOCK, width // BLOCK, -1)


def unblocks(values: torch.Tensor, steps: int) -> torch.Tensor:
    """Inverse of :func:`blocks`: ``[B, h, w, t·8·8·3]`` → ``[B, 3, t, 8h, 8w]``."""
    batch, height, width, _ = values.shape
    grid = values.reshape(batch, height, width, steps, BLOCK, BLOCK, 3)
    return grid.permute(0, 6, 3, 1, 4, 2, 5).reshape(batch, 3, steps, height * BLOCK, width * BLOCK)


def latent_groups(frames: torch.Tensor, fresh: bool) -> list[torch.Tensor]:
    """The frames each latent frame stands for: a fresh stream's frame 0 alone, then groups of 4."""
    rest = frames[:, :, 1:] if fresh else frames
    if rest.shape[2] % TEMPORAL_STRIDE:
        raise ValueError(f"{frames.shape[2]} frames: a {'fresh' if fresh else 'continued'} stream takes "
                         f"{'1 + ' if fresh else ''}{TEMPORAL_STRIDE}k")
    return ([frames[:, :, :1]] if fresh else []) + list(rest.split(TEMPORAL_STRIDE, dim=2))


def blend_with_uniform(weights: torch.Tensor, share: float) -> torch.Tensor:
    """Per-channel loss weights ``weights`` divided by their mean (mean 1), blended with uniform
    weights: ``1 − share + share·w``. ``share`` 0 gives every channel 1, ``share`` 1 the weights alone."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share={share}: must be within [0, 1]")
    return 1 - share + share * weights / weights.mean()


class LinearBlockCode(torch.nn.Module):
    """Principal components of 8×8 blocks of 1 and of 4 frames, divided by their spread (buffers,
    so a training checkpoint keeps them), ``channels`` of them per block. Fit with :meth:`fit`; a fresh
    module codes nothing useful."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        self.channels = channels
        for name, steps in (("first", 1), ("rest", TEMPORAL_STRIDE)):
            size = steps * BLOCK * BLOCK * 3
            self.register_buffer(f"{name}_mean", torch.zeros(size))
            self.register_buffer(f"{name}_basis", torch.zeros(channels, size))  # rows: components ÷ their std
            self.register_buffer(f"{name}_scale", torch.ones(channels))  # the components' std

    @torch.no_grad()
    def fit(self, clips: Iterable[torch.Tensor]) -> LinearBlockCode:
        """Fit both bases on clips ``[3, T, H, W]`` in [−1, 1]: every frame is a single-frame block,
        every group of 4 frames after the first a four-frame block."""
        sums: dict[str, list] = {"first": [0, 0.0, 0.0], "rest": [0, 0.0, 0.0]}  # count, Σx, Σxxᵀ (float64)
        for clip in clips:
            x = clip[None].double()
            singles = blocks(x.transpose(1, 2).reshape(-1, 3, 1, *x.shape[-2:])).reshape(-1, BLOCK * BLOCK * 3)
            fours = [blocks(group).reshape(-1, TEMPORAL_STRIDE * BLOCK * BLOCK * 3) for group in latent_groups(x, True)[1:]]
            for name, rows in (("first", singles), ("rest", torch.cat(fours) if fours else None)):
                if rows is not None:
                    total = sums[name]
                    total[0] += rows.shape[0]
                    total[1] = total[1] + rows.sum(0)
                    total[2] = total[2] + rows.T @ rows
        for name, (count, first, second) in sums.items():
            if count < self.channels + 1:
                raise ValueError(f"LinearBlockCode.fit: {count} {name} blocks, need more than {self.channels}")
            mean = first / count
            covariance = second / count - torch.outer(mean, mean)
            variance, vectors = torch.linalg.eigh(covariance)  # ascending
            variance, vectors = variance.flip(0)[: self.channels].clamp_min(1e-12), vectors.flip(1)[:, : self.channels]
            vectors = vectors * torch.where(vectors.sum(0) < 0, -1.0, 1.0).to(vectors)  # a fixed sign per component
            getattr(self, f"{name}_mean").copy_(mean)
            getattr(self, f"{name}_scale").copy_(variance.sqrt())
            getattr(self, f"{name}_basis").copy_(vectors.T / variance.sqrt()[:, None])
        return self

    def encode(self, frames: torch.Tensor, fresh: bool = True) -> torch.Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [−1, 1] → the code ``[B, channels, N, H/8, W/8]``, on the causal
        encoder's grid (a fresh stream: ``T = 1 + 4(N−1)``; a continued one: ``T = 4N``)."""
        codes = []
        for index, group in enumerate(latent_groups(frames, fresh)):
            name = "first" if fresh and index == 0 else "rest"
            mean, basis = getattr(self, f"{name}_mean"), getattr(self, f"{name}_basis")
            codes.append((blocks(group).to(basis) - mean) @ basis.T)
        return torch.stack(codes, dim=1).permute(0, 4, 1, 2, 3).to(frames.dtype)

    def decode(self, code: torch.Tensor, fresh: bool = True) -> torch.Tensor:
        """The linear reconstruction of :meth:`encode`'s output (frames in [−1, 1], not clamped)."""
        pieces = []
        for index in range(code.shape[2]):
            first = fresh and index == 0
            name = "first" if first else "rest"
            mean, basis, scale = (getattr(self, f"{name}_{part}") for part in ("mean", "basis", "scale"))
            # basis rows are vectors ÷ std, so vectors = basis · std, and x ≈ mean + Σ code · vector
            values = code[:, :, index].permute(0, 2, 3, 1).to(basis) @ (basis * scale.square()[:, None]) + mean
            pieces.append(unblocks(values, 1 if first else TEMPORAL_STRIDE))
        return torch.cat(pieces, dim=2).to(code.dtype)

    def pixel_weights(self, latent_frames: int, fresh: bool = True, share: float = 1.0) -> torch.Tensor:
        """``[channels, latent_frames]``: what an error of one unit in each code channel costs in pixels.
        The components are orthonormal, so a code error ``e`` in channel ``c`` adds ``scale_c²·e²`` to
        the linear decode's squared pixel error: the weights are the components' variances, divided
        by their mean per basis and blended with uniform ones by ``share``
        (:func:`blend_with_uniform`). A fresh stream's first latent frame uses the single-frame basis."""
        first, rest = (blend_with_uniform(scale.square(), share) for scale in (self.first_scale, self.rest_scale))
        return torch.stack([first if fresh and index == 0 else rest for index in range(latent_frames)], dim=1)

    def skip_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear decode of basis ``name`` ("first" or "rest") as a 1x1 conv's weight ``[t·3·64,
        channels]`` and bias, in pixel-shuffle order (time, colour, row, column) and the tiny decoder's [0, 1]
        pixels: what :class:`~lingbot_ray.models.tiny_decoder.LinearSkip` starts from."""
        steps = 1 if name == "first" else TEMPORAL_STRIDE
        mean, basis, scale = (getattr(self, f"{name}_{part}") for part in ("mean", "basis", "scale"))
        vectors = basis * scale.square()[:, None]  # [channels, t·8·8·3], block order (time, row, column, colour)

        def reorder(values: torch.Tensor) -> torch.Tensor:
            return values.reshape(-1, steps, BLOCK, BLOCK, 3).permute(0, 1, 4, 2, 3).reshape(values.shape[0], -1)

        return (reorder(vectors).T / 2).float(), ((reorder(mean[None])[0] + 1) / 2).float()
