"""Train a small Wan2.1-architecture video VAE (diffusers' ``AutoencoderKLWan``) on rendered world clips.

Conventions (the serving path's, see :mod:`lingbot_ray.models.vae_streaming`):

* Pixels enter the VAE as ``x = frame / 127.5 − 1`` in [−1, 1], laid out ``[B, 3, T, H, W]`` with
  ``T = 1 + 4(N−1)`` for ``N`` latent frames. The encoder is causal: frame 0 is encoded alone, then
  4 frames per latent frame; the decoder runs one latent frame at a time (frame 0 gives one pixel
  frame, every later one four). Training runs exactly these loops (:func:`encode_moments`,
  :func:`decode_frames`). A served stream runs for hundreds of latent frames, far past a short
  training clip, and a model trained on short clips only drifts there (measured: PSNR falls frame
  after frame). So most batches first run a warm-up of 1 … ``max_context`` latent frames without
  gradients, filling the encoder's and decoder's caches as a long stream would, and train the next
  latent frames; the other batches (``first_frame_share``) start at frame 0 and train its path.
* Decoder: the VAE's own (Wan) decoder, or with ``tiny_widths`` a tiny temporal decoder
  (:class:`WorldAutoencoder`, ``vae.decoder: tiny``) trained with the encoder; it reads the
  normalised latents and its output is clamped to [0, 1] as served. The Wan decoder is then left as
  initialised, for ``train_decoder`` to train on the DiT's latents.
* Teacher phase (``teacher_steps``, with ``tiny_widths``): the run's first steps do not train end to
  end. A linear code of the VAE's latent grid (:class:`~lingbot_ray.world.linear_code.LinearBlockCode`,
  principal components fitted on ``teacher_clips`` training clips) is the target of both halves: the
  encoder regresses it and the tiny decoder learns to decode it. Trained from scratch end to end,
  neither half has anything to learn from for thousands of steps (the encoder's code starts
  meaningless); the code is good from step 0, so end-to-end training starts from a working
  autoencoder instead.
* Latents: the encoder posterior ``N(mu, exp(logvar))``; training decodes a sample, everything
  downstream uses ``mu``. The DiT sees ``z_norm = (mu − latents_mean) / latents_std`` per channel;
  the final config carries ``latents_mean``/``latents_std`` measured on training clips, so
  ``z_norm`` has about zero mean and unit std per channel.
* Loss per step: ``L1 + MSE`` on pixels (decoder output *not* clamped, so saturated pixels still get
  gradients), ``edge_weight`` × L1 of the horizontal and vertical finite differences,
  ``chroma_weight`` × L1 of the Cb/Cr (BT.601) error (colour carries little of the pixel variance, so
  plain L1/MSE learn luminance first), and ``kl_weight`` × the KL to ``N(0, 1)`` averaged over latent
  elements. PSNR is on the clamped output with pixel range [0, 1].
* Data: sample ``i`` (a random crop of a random clip in a random training world) depends only on
  ``(seed, i)``; batch ``s`` holds samples ``s·B … s·B + B − 1`` and its warm-up length depends only
  on ``(seed, s)``, so a resumed run sees exactly the batches an uninterrupted one would. Without
  ``data_dir`` a crop is rendered directly (the principal point is shifted), identical to cropping
  the full 160×96 frame, and training needs no data files. With ``data_dir`` (a
  ``dataset.generate_dataset`` folder, what ``train_world`` trains the DiT on) crops are cut from its
  clips instead (read in the training process): rendering a batch costs about as much CPU as the
  training step, and on 2 cores the loader process rendering beside it slowed training 1.4×
  (measured with the same warm-up lengths: 3.2 → 4.5 steps/s). ``max_context`` plus the trained
  latent frames must fit the clips (``check`` says so).
* Schedule: AdamW, linear warm-up for ``warmup`` steps, then cosine decay to ``min_lr_ratio·lr`` at
  ``total_steps``. With ``--minutes`` and no ``--steps``, ``total_steps`` is planned at the end of
  warm-up from the measured speed and re-planned at every log step from the speed of the last few
  log windows (and stored in checkpoints), so the schedule ends, annealed, when the time does (planned
  once, a run on a 2-core machine that slowed ~12 % after its first steps was cut at 2,800 of 3,172,
  its learning rate still high). A resumed run keeps the stored schedule. The wall-clock limit of one
  invocation stops training in any case.

Output folder: ``checkpoints/step_XXXXXXX.pt`` (model, optimizer, step, RNG states; the newest
``keep_checkpoints`` are kept), ``log.jsonl`` (one line per ``log_every`` steps), ``vae/`` (the
trained model, ``save_pretrained``), ``eval.json`` and ``eval_side_by_side.png``.

``python -m lingbot_ray.world.train_vae OUT_DIR --minutes 25`` (``--resume`` continues from the
newest checkpoint in ``OUT_DIR``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoint import TINY_DECODER_FOLDER
from ..control.camera import Intrinsics
from ..models.wan_norm import use_fast_norms
from .dataset import EVAL_SEED_START, make_clip, random_actions
from .progress import progress_bar
from .render import TEMPORAL_STRIDE, world_intrinsics

FRAME_SIZE = (160, 96)  # (width, height) the trained model serves
Z_DIM = 16  # the latent's channels by default (Wan2.1's); TrainConfig.z_dim sets a run's
DIM_MULT = (1, 2, 4, 4)
SPATIAL_RATIO = 8
LOGVAR_INIT = -6.0  # initial posterior log-variance (see build_vae)
MU_INIT_GAIN = 10.0  # initial scale-up of the posterior mean (see build_vae)
# Cb and Cr rows of the JPEG (BT.601) RGB → YCbCr matrix: the colour that luminance does not carry.
_CHROMA = torch.tensor([[-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
_DATA_SALT, _STATS_SALT, _EVAL_SALT, _CONTEXT_SALT, _TEACHER_SALT = 0x7A3E, 0x57A7, 0xE7A1, 0xC0A7, 0x7EAC


def trained_latent_frames(frames: int) -> int:
    """Latent frames of a trained part of ``frames = 1 + 4k`` pixel frames."""
    return 1 + (frames - 1) // TEMPORAL_STRIDE


@dataclass
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint (``--resume`` reuses it)."""

    out_dir: str
    steps: int | None = None  # schedule length; None: estimated from the speed when ``minutes`` is set
    minutes: float | None = None  # wall-clock limit of the training loop of one invocation
    base_dim: int = 4
    res_blocks: int = 2
    z_dim: int = Z_DIM  # latent channels per 8×8-pixel, 4-frame block (docs/EMBEDDED_MODEL.md, "How far this is from the target")
    # Decode the latents with a tiny temporal decoder of these widths (``vae.decoder: tiny``), trained
    # with the encoder: it shapes the latent space, the Wan decoder is left for ``train_decoder``. None:
    # the Wan decoder is trained with the encoder (the layout's own autoencoder).
    tiny_widths: tuple[int, int, int, int] | None = None
    decoder_base_dim: int | None = None  # the Wan decoder's width (None: base_dim)
    stats_momentum: float = 0.01  # with tiny_widths: EMA rate of the latent statistics (see WorldAutoencoder)
    # With tiny_widths: the first teacher_steps steps learn from a linear code (linear_code.LinearBlockCode,
    # fitted on teacher_clips training clips) instead of end to end: the encoder regresses it, the tiny
    # decoder decodes it.
    teacher_steps: int = 0
    teacher_clips: int = 150
    # The encoder's regression of the code weighs each channel by what its error costs in pixels (the
    # component's variance, LinearBlockCode.pixel_weights) with this share, against 1 each: with many
    # channels most carry almost nothing, and uniform weights spend the encoder on them.
    teacher_pixel_share: float = 0.0
    # With tiny_widths: the tiny decoder gets a linear path from each latent to its pixels
    # (tiny_decoder.LinearSkip), started at the teacher's linear decode when there is a teacher.
    tiny_skip: bool = False
    crop: tuple[int, int] = (32, 32)  # (width, height), multiples of 8
    frames: int = 5  # trained pixel frames per clip from frame 0, 1 + 4k (4k after a warm-up)
    max_context: int = 10  # latent frames of no-gradient cache warm-up, up to
    first_frame_share: float = 0.3  # share of batches without warm-up (they train frame 0)
    batch: int = 4
    seed: int = 0
    lr: float = 4e-3
    warmup: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 1e-4
    kl_weight: float = 1e-5
    edge_weight: float = 0.25
    chroma_weight: float = 2.0
    grad_clip: float = 1.0
    frame_size: tuple[int, int] = FRAME_SIZE  # (width, height) of the rendered frames
    data_dir: str | None = None  # crop the clips of this dataset folder instead of rendering crops
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 50
    workers: int = 1
    stats_clips: int = 32
    stats_latent_frames: int = 5
    eval_clips: int = 8
    eval_latent_frames: int = 12
    stop_at: int | None = None  # stop after this step (as if interrupted; for tests)
    progress: bool = True

    def check(self) -> None:
        width, height = self.crop
        frame_w, frame_h = self.frame_size
        if width % SPATIAL_RATIO or height % SPATIAL_RATIO or width < 8 or height < 8:
            raise ValueError(f"crop {width}x{height}: sides must be positive multiples of {SPATIAL_RATIO}")
        if width > frame_w or height > frame_h or frame_w % SPATIAL_RATIO or frame_h % SPATIAL_RATIO:
            raise ValueError(f"crop {width}x{height} must fit the frame {frame_w}x{frame_h} (multiples of 8)")
        if self.frames < 1 or (self.frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"frames={self.frames}: must be 1 + {TEMPORAL_STRIDE}k")
        if self.steps is None and self.minutes is None:
            raise ValueError("give --steps or --minutes")
        if self.batch < 1 or self.base_dim < 2 or self.base_dim % 2 or self.res_blocks < 1:
            raise ValueError("batch >= 1, even base_dim >= 2 and res_blocks >= 1 are required")
        if self.decoder_base_dim is not None and (self.decoder_base_dim < 2 or self.decoder_base_dim % 2):
            raise ValueError(f"decoder_base_dim={self.decoder_base_dim}: must be even and >= 2")
        if self.tiny_widths is not None and (len(self.tiny_widths) != 4 or min(self.tiny_widths) < 1):
            raise ValueError(f"tiny_widths={self.tiny_widths}: must be 4 positive widths")
        if self.teacher_steps < 0 or (self.teacher_steps and self.tiny_widths is None):
            raise ValueError(f"teacher_steps={self.teacher_steps}: must be >= 0, and needs tiny_widths (the teacher trains the tiny decoder)")
        if self.tiny_skip and self.tiny_widths is None:
            raise ValueError("tiny_skip needs tiny_widths (it is part of the tiny decoder)")
        if not 0.0 <= self.teacher_pixel_share <= 1.0:
            raise ValueError(f"teacher_pixel_share={self.teacher_pixel_share}: must be within [0, 1]")
        if self.teacher_steps and self.teacher_clips < 1:
            raise ValueError(f"teacher_clips={self.teacher_clips}: the linear code needs clips to be fitted on")
        if self.data_dir is not None:
            from .dataset import ClipDataset

            meta = ClipDataset(self.data_dir).meta
            if (meta["width"], meta["height"]) != (frame_w, frame_h):
                raise ValueError(f"data_dir {self.data_dir}: clips are {meta['width']}x{meta['height']}, frame_size is {frame_w}x{frame_h}")
            needed = self.max_context + trained_latent_frames(self.frames)
            if needed > meta["num_latent_frames"]:
                raise ValueError(f"data_dir {self.data_dir}: clips have {meta['num_latent_frames']} latent frames, max_context="
                                 f"{self.max_context} with frames={self.frames} needs {needed}")


# ------------------------------------------------------------------------------------------------ model


def build_vae(base_dim: int, res_blocks: int, decoder_base_dim: int | None = None, z_dim: int = Z_DIM) -> AutoencoderKLWan:
    """The Wan2.1 layout of :func:`~lingbot_ray.models.tiny_components.build_tiny_vae` (``z_dim``, 8×
    spatial, 4× temporal, no attention), initialised from the global torch RNG; latent statistics
    are placeholders (0 and 1) until :func:`latent_statistics` measures them.

    Two changes to diffusers' initialisation of ``quant_conv`` (the 1×1 conv giving mean ⊕ log-variance)
    speed up a short run: the log-variance bias starts at ``LOGVAR_INIT`` (std 0.05) instead of 0 (a
    unit-std posterior drowns the latents in noise, and with a small KL weight and AdamW the bias would
    take thousands of steps to come down), and the mean's weights and bias are scaled by
    ``MU_INIT_GAIN``: the default init gives latents that vary by only ~0.1 across positions, and the
    decoder ignores them for the first few hundred steps (measured at 100 steps, crop 32: PSNR 14.8 dB
    without the gain, 16.5 dB with it).
    """
    vae = AutoencoderKLWan(
        base_dim=base_dim,
        decoder_base_dim=decoder_base_dim,
        z_dim=z_dim,
        dim_mult=list(DIM_MULT),
        num_res_blocks=res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    use_fast_norms(vae)
    with torch.no_grad():
        vae.quant_conv.weight[:z_dim].mul_(MU_INIT_GAIN)
        vae.quant_conv.bias[:z_dim].mul_(MU_INIT_GAIN)
        vae.quant_conv.bias[z_dim:].fill_(LOGVAR_INIT)
    return vae


class WorldAutoencoder(torch.nn.Module):
    """The Wan encoder (``vae``) trained with a tiny temporal decoder (``tiny``) of its latents.

    The tiny decoder reads normalised latents ``(z − latents_mean) / latents_std``, as served. The
    statistics are buffers, an exponential moving average (rate ``momentum``) of each training batch's
    per-channel mean and std of the posterior means, updated before the batch is decoded: the decoder
    is always trained behind the normalisation it will be served with, and at the end of training
    (learning rate annealed, statistics settled) the buffers become the VAE config's
    ``latents_mean``/``latents_std``. The Wan decoder inside ``vae`` is not trained here.

    ``teacher`` (a :class:`~lingbot_ray.world.linear_code.LinearBlockCode`, or None) is the linear code
    the first steps of a run learn from (see :func:`loss_terms`); it is part of the training checkpoint,
    not of the saved model."""

    def __init__(self, vae: AutoencoderKLWan, tiny: torch.nn.Module, momentum: float, teacher: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.vae, self.tiny, self.momentum, self.teacher = vae, tiny, momentum, teacher
        z_dim = vae.config.z_dim
        self.register_buffer("latents_mean", torch.zeros(z_dim))
        self.register_buffer("latents_std", torch.ones(z_dim))
        self.register_buffer("observed", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, mu: torch.Tensor) -> None:
        """Fold a batch's posterior means ``[B, z, N, h, w]`` into the statistics (the first batch sets them)."""
        flat = mu.detach().transpose(0, 1).reshape(mu.shape[1], -1)
        rate = 1.0 if int(self.observed) == 0 else self.momentum
        self.latents_mean.lerp_(flat.mean(dim=1), rate)
        self.latents_std.lerp_(flat.std(dim=1).clamp_min(1e-6), rate)
        self.observed += 1

    def decode(self, z: torch.Tensor, memory: list | None = None) -> tuple[torch.Tensor, list]:
        """Pixels in [−1, 1] of raw latents ``[B, z, N, h, w]`` and the decoder's memory after them:
        ``1 + 4(N−1)`` frames for a fresh stream (``memory`` None), ``4N`` for a continued one."""
        shape = (1, -1, 1, 1, 1)
        normalised = (z - self.latents_mean.view(shape)) / self.latents_std.view(shape)
        frames, after = self.tiny.decode_frames(normalised.movedim(2, 1), memory)
        if memory is None:  # the first latent frame stands for one video frame
            frames = frames[:, self.tiny.frames_to_trim :]
        return frames.movedim(1, 2) * 2 - 1, after


def build_model(cfg: TrainConfig) -> AutoencoderKLWan | WorldAutoencoder:
    """The model a run trains, initialised from the global torch RNG: the VAE alone, or with
    ``cfg.tiny_widths`` a :class:`WorldAutoencoder` (its tiny decoder's output starting at mid-grey)."""
    vae = build_vae(cfg.base_dim, cfg.res_blocks, cfg.decoder_base_dim, cfg.z_dim)
    if cfg.tiny_widths is None:
        return vae
    from .train_tiny_decoder import new_model

    tiny = new_model(cfg.z_dim, tuple(cfg.tiny_widths), int(torch.randint(2**31, ())), linear_skip=cfg.tiny_skip)
    for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters(), *tiny.encoder.parameters()]:
        p.requires_grad_(False)
    teacher = None
    if cfg.teacher_steps:
        from .linear_code import LinearBlockCode

        teacher = LinearBlockCode(cfg.z_dim)
    return WorldAutoencoder(vae, tiny, cfg.stats_momentum, teacher)


def _num_cached_convs(module: torch.nn.Module) -> int:
    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())


def encode_moments(
    vae: AutoencoderKLWan, x: torch.Tensor, feat_cache: list | None = None
) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Posterior ``(mu, logvar)`` ``[B, z, N, h, w]`` of pixels ``x`` and the encoder's feature cache
    after them (diffusers' ``_encode`` loop). A fresh stream (``feat_cache`` None) takes ``1 + 4(N−1)``
    frames, frame 0 encoded alone; a continued one (the cache a previous call returned) takes ``4N``."""
    fresh = feat_cache is None
    feat_cache = [None] * _num_cached_convs(vae.encoder) if fresh else feat_cache
    rest = x[:, :, 1:] if fresh else x
    steps = ([x[:, :, :1]] if fresh else []) + (list(rest.split(TEMPORAL_STRIDE, dim=2)) if rest.shape[2] else [])
    out = torch.cat([vae.encoder(step, feat_cache=feat_cache, feat_idx=[0]) for step in steps], dim=2)
    mu, logvar = vae.quant_conv(out).chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0), feat_cache


def decode_frames(vae: AutoencoderKLWan, z: torch.Tensor, feat_cache: list | None = None) -> tuple[torch.Tensor, list]:
    """Pixels (unclamped) of raw latents ``[B, z, N, h, w]`` and the decoder's feature cache after
    them, one latent frame at a time (diffusers' ``_decode`` loop, as the streaming decoder): ``1 +
    4(N−1)`` frames for a fresh stream (``feat_cache`` None), ``4N`` for a continued one."""
    fresh = feat_cache is None
    feat_cache = [None] * _num_cached_convs(vae.decoder) if fresh else feat_cache
    x = vae.post_quant_conv(z)
    pieces = [
        vae.decoder(x[:, :, i : i + 1], feat_cache=feat_cache, feat_idx=[0], first_chunk=fresh and i == 0)
        for i in range(x.shape[2])
    ]
    return torch.cat(pieces, dim=2), feat_cache


def _sample(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Generator | None) -> torch.Tensor:
    if noise is None:
        return mu
    eps = torch.randn(mu.shape, generator=noise, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of [−1, 1] tensors, with the pixel range taken as [0, 1]."""
    mse = F.mse_loss(pred.clamp(-1, 1), target).item() / 4.0
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Cb and Cr ``[B, 2, …]`` of RGB ``[B, 3, …]``."""
    return torch.einsum("cd,bd...->bc...", _CHROMA.to(x.dtype), x)


def colour_kept(pred: torch.Tensor, target: torch.Tensor) -> float:
    """How much of the target's colour a reconstruction keeps: ``1 − |Cb/Cr error| / |Cb/Cr of the
    target|`` (mean absolute, [−1, 1] tensors ``[B, 3, …]``). 1 is exact colour, 0 a grey image of
    the right luminance. PSNR hides a grey reconstruction (colour carries little of the pixel
    variance), and so does a PSNR on Cb/Cr: this does not."""
    return float(1 - chroma(pred.clamp(-1, 1) - target).abs().mean() / chroma(target).abs().mean().clamp_min(1e-8))


def _encoder_of(model: AutoencoderKLWan | WorldAutoencoder) -> AutoencoderKLWan:
    return model.vae if isinstance(model, WorldAutoencoder) else model


def _decode(model: AutoencoderKLWan | WorldAutoencoder, z: torch.Tensor, cache: list | None) -> tuple[torch.Tensor, list]:
    """Raw latents → pixels with the model's trained decoder (the tiny one of a :class:`WorldAutoencoder`)."""
    return model.decode(z, cache) if isinstance(model, WorldAutoencoder) else decode_frames(model, z, cache)


def loss_terms(
    vae: AutoencoderKLWan | WorldAutoencoder,
    clip: torch.Tensor,
    noise: torch.Generator | None,
    kl_weight: float,
    edge_weight: float,
    context: int = 0,
    chroma_weight: float = 0.0,
    teach: bool = False,
    teacher_pixel_share: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Reconstruction of ``clip`` ``[B, 3, T, H, W]`` through posterior samples (the means when
    ``noise`` is None). The first ``context`` latent frames (``1 + 4(context−1)`` pixel frames) only
    fill the encoder's and decoder's caches, without gradients, as a long stream would have them; the
    rest is the target ``x``. Returns ``loss = l1 + mse + edge_weight·edge + chroma_weight·chroma +
    kl_weight·kl``, the terms, ``x`` and its decoded ``recon``. A training :class:`WorldAutoencoder`
    folds the batch's posterior means into its latent statistics before decoding.

    ``teach`` (a :class:`WorldAutoencoder` with a ``teacher``): the teacher phase instead. The window's
    linear code is the target of both halves, two separate supervised problems: the encoder's
    posterior means regress it (``latent``, the mean squared error in normalised units, each channel
    weighed by ``teacher_pixel_share`` of its pixel cost), and the tiny decoder decodes the code
    itself, not the encoder's output. ``loss = latent + `` the pixel terms; the KL is reported, not
    trained, and the latent statistics stay the code's (0 and 1)."""
    if teach:
        return _teacher_terms(vae, clip, edge_weight, context, chroma_weight, teacher_pixel_share)
    encoder = _encoder_of(vae)
    observe = isinstance(vae, WorldAutoencoder) and vae.training
    enc_cache = dec_cache = None
    x = clip
    if context:
        split = 1 + TEMPORAL_STRIDE * (context - 1)
        with torch.no_grad():
            mu, logvar, enc_cache = encode_moments(encoder, clip[:, :, :split])
            _, dec_cache = _decode(vae, _sample(mu, logvar, noise), dec_cache)
        x = clip[:, :, split:]
    mu, logvar, _ = encode_moments(encoder, x, enc_cache)
    if observe:
        vae.observe(mu)
    recon, _ = _decode(vae, _sample(mu, logvar, noise), dec_cache)
    terms = _pixel_terms(recon, x, edge_weight, chroma_weight)
    terms["kl"] = _kl(mu, logvar)
    terms["loss"] = terms["loss"] + kl_weight * terms["kl"]
    return terms


def _pixel_terms(recon: torch.Tensor, x: torch.Tensor, edge_weight: float, chroma_weight: float) -> dict[str, torch.Tensor]:
    error = recon - x
    l1, mse = error.abs().mean(), error.square().mean()
    edge = (error.diff(dim=-1).abs().mean() + error.diff(dim=-2).abs().mean()) / 2
    colour = chroma(error).abs().mean()
    loss = l1 + mse + edge_weight * edge + chroma_weight * colour
    return {"loss": loss, "l1": l1, "mse": mse, "edge": edge, "chroma": colour, "x": x, "recon": recon}


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of the posterior to ``N(0, 1)``, averaged over latent elements."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).mean()


def _teacher_terms(
    model: WorldAutoencoder, clip: torch.Tensor, edge_weight: float, context: int, chroma_weight: float, pixel_share: float = 0.0
) -> dict[str, torch.Tensor]:
    """:func:`loss_terms` of the teacher phase (``teach``)."""
    code = model.teacher.encode(clip)  # the window's code as a stream of its own, the grid the encoder sees
    enc_cache = dec_cache = None
    x, target = clip, code
    if context:
        split = 1 + TEMPORAL_STRIDE * (context - 1)
        with torch.no_grad():
            _, _, enc_cache = encode_moments(model.vae, clip[:, :, :split])
            _, dec_cache = model.decode(code[:, :, :context])
        x, target = clip[:, :, split:], code[:, :, context:]
    mu, logvar, _ = encode_moments(model.vae, x, enc_cache)
    recon, _ = model.decode(target, dec_cache)
    terms = _pixel_terms(recon, x, edge_weight, chroma_weight)
    # the target's latent frames: with a warm-up, none is the stream's first (single-frame) one
    weights = model.teacher.pixel_weights(code.shape[2], share=pixel_share)[:, context:].to(mu)
    error = ((mu - target) / model.latents_std.view(1, -1, 1, 1, 1)).square()
    terms["latent"] = (error * weights[None, :, :, None, None]).mean()
    terms["kl"] = _kl(mu, logvar).detach()
    terms["loss"] = terms["loss"] + terms["latent"]
    return terms


# ------------------------------------------------------------------------------------------------- data


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` → float ``[3, T, H, W]`` in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def render_crop(
    world_seed: int, actions: list[list[str]], frame_size: tuple[int, int], crop: tuple[int, int], x0: int, y0: int
) -> np.ndarray:
    """uint8 ``[T, h, w, 3]``: the window ``[y0:y0+h, x0:x0+w]`` of the full-frame clip, rendered
    alone (same focal length, principal point shifted by the window's origin)."""
    full = world_intrinsics(*frame_size)
    intrinsics = Intrinsics(fx=full.fx, fy=full.fy, cx=full.cx - x0, cy=full.cy - y0)
    return make_clip(world_seed, actions, crop[0], crop[1], intrinsics).frames


def context_frames(seed: int, batch_index: int, max_context: int, first_frame_share: float) -> int:
    """Latent frames of cache warm-up of batch ``batch_index``: 0 (the clip starts at frame 0, whose
    path is trained) with probability ``first_frame_share``, else uniform in ``1 … max_context``."""
    rng = np.random.default_rng([seed, _CONTEXT_SALT, batch_index])
    if max_context < 1 or rng.random() < first_frame_share:
        return 0
    return int(rng.integers(1, max_context + 1))


class CropDataset(Dataset):
    """Sample ``i``: a random crop of a random-play clip in a random training world, ``[3, T, h, w]``
    in [−1, 1], a pure function of ``(seed, i)``. Its batch (``i // batch``) has
    :func:`context_frames` ``c`` latent frames of warm-up before the ``n`` trained latent frames
    (``frames = 1 + 4(n−1)``): ``T = 1 + 4(c + n − 1)`` pixel frames. With ``c > 0`` the trained part
    is ``4n`` frames of continued stream, with ``c = 0`` the clip's first ``frames`` frames."""

    def __init__(
        self,
        seed: int,
        frames: int,
        crop: tuple[int, int],
        frame_size: tuple[int, int] = FRAME_SIZE,
        *,
        batch: int = 1,
        max_context: int = 0,
        first_frame_share: float = 1.0,
    ):
        self.seed, self.frames, self.crop, self.frame_size = seed, frames, tuple(crop), tuple(frame_size)
        self.batch, self.max_context, self.first_frame_share = batch, max_context, first_frame_share

    def __len__(self) -> int:
        return 2**62

    def context(self, index: int) -> int:
        """Warm-up latent frames of sample ``index`` (shared by its batch)."""
        return context_frames(self.seed, index // self.batch, self.max_context, self.first_frame_share)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, _DATA_SALT, index])
        world_seed = int(rng.integers(0, EVAL_SEED_START))
        trained = trained_latent_frames(self.frames)
        context = self.context(index)
        actions = random_actions(rng, context + trained)
        x0 = int(rng.integers(0, self.frame_size[0] - self.crop[0] + 1))
        y0 = int(rng.integers(0, self.frame_size[1] - self.crop[1] + 1))
        return to_pixels(render_crop(world_seed, actions, self.frame_size, self.crop, x0, y0))


class ClipCropDataset(CropDataset):
    """:class:`CropDataset` cut from the clips of a ``dataset.generate_dataset`` folder: sample ``i``
    is a random window of ``T`` consecutive frames of a random clip, from a random frame on (a stream
    may start anywhere in a world, and every frame of a clip is then seen, not only its first ``T``),
    a pure function of ``(seed, i)``."""

    def __init__(self, data_dir: str | Path, seed: int, frames: int, crop: tuple[int, int], **kwargs) -> None:
        from .dataset import ClipDataset

        self.clips = ClipDataset(data_dir)
        super().__init__(seed, frames, crop, (self.clips.meta["width"], self.clips.meta["height"]), **kwargs)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, _DATA_SALT, index])
        clip = int(rng.integers(len(self.clips)))
        length = 1 + TEMPORAL_STRIDE * (self.context(index) + trained_latent_frames(self.frames) - 1)
        x0 = int(rng.integers(0, self.frame_size[0] - self.crop[0] + 1))
        y0 = int(rng.integers(0, self.frame_size[1] - self.crop[1] + 1))
        frames = self.clips[clip][0]
        t0 = int(rng.integers(0, len(frames) - length + 1))
        return to_pixels(frames[t0 : t0 + length, y0 : y0 + self.crop[1], x0 : x0 + self.crop[0]])


class _FromIndex(Sampler[int]):
    """Sample indices ``start, start + 1, …`` without end."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        index = self.start
        while True:
            yield index
            index += 1


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def world_clip(
    seed: int, salt: int, index: int, num_latent_frames: int, size: tuple[int, int], split: str
) -> np.ndarray:
    """uint8 frames of full-size clip ``index`` of a stream of ``split`` ("train"/"eval") worlds."""
    rng = np.random.default_rng([seed, salt, index])
    lo = 0 if split == "train" else EVAL_SEED_START
    world_seed = int(rng.integers(lo, lo + EVAL_SEED_START))
    return make_clip(world_seed, random_actions(rng, num_latent_frames), *size).frames


# ------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, total_steps: int | None, cfg: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to ``min_lr_ratio·lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if total_steps is None:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, total_steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------- checkpoints


def _checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    paths = sorted(_checkpoint_dir(out_dir).glob("step_*.pt"))
    return paths[-1] if paths else None


def _save_checkpoint(
    cfg: TrainConfig,
    step: int,
    total_steps: int | None,
    vae: AutoencoderKLWan,
    opt: torch.optim.Optimizer,
    noise: torch.Generator,
) -> Path:
    folder = _checkpoint_dir(cfg.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    state = {
        "step": step,
        "total_steps": total_steps,
        "config": dataclasses.asdict(cfg),
        "model": vae.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "noise": noise.get_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    for old in sorted(folder.glob("step_*.pt"))[: -cfg.keep_checkpoints]:
        old.unlink()
    return path


def _load_checkpoint(path: Path) -> dict:
    # Our own file: it holds numpy/python RNG states, which the weights-only unpickler refuses.
    return torch.load(path, map_location="cpu", weights_only=False)


def config_from_checkpoint(path: Path, **overrides) -> TrainConfig:
    """The checkpoint's config with ``overrides`` (e.g. a new ``minutes`` or ``out_dir``)."""
    state = _load_checkpoint(path)
    stored = state["config"]
    if stored["steps"] is None:
        stored["steps"] = state["total_steps"]  # the schedule fixed from the measured speed, if it was
    stored.update(overrides)
    stored["crop"], stored["frame_size"] = tuple(stored["crop"]), tuple(stored["frame_size"])
    if stored.get("tiny_widths") is not None:
        stored["tiny_widths"] = tuple(stored["tiny_widths"])
    return TrainConfig(**stored)


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    step: int
    total_steps: int | None
    vae_dir: Path | None  # None when stopped at ``stop_at``
    eval: dict | None


def _log(cfg: TrainConfig, record: dict) -> None:
    with open(Path(cfg.out_dir) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    latent = f" latent {record['latent']:.4f}" if "latent" in record else ""
    print(
        f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} psnr {record['psnr']:.2f}{latent} "
        f"kl {record['kl']:.3g} lr {record['lr']:.2e} {record['steps_per_s']:.2f} steps/s "
        f"{record['clips_per_s']:.2f} clips/s {record['elapsed_s']:.0f}s",
        flush=True,
    )


def train(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train (or continue, with ``resume``, from the newest checkpoint in ``cfg.out_dir``), then
    measure the latent statistics, save ``vae/`` and evaluate. Runs on the current torch threads."""
    cfg.check()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out) if resume else None
    state = _load_checkpoint(checkpoint) if checkpoint else None

    torch.manual_seed(cfg.seed)
    vae = build_model(cfg).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    noise = torch.Generator().manual_seed(cfg.seed + 1)
    step, total_steps = 0, cfg.steps
    if state is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, total_steps = state["step"], state["total_steps"] or cfg.steps
        torch.set_rng_state(state["rng"]["torch"])
        noise.set_state(state["rng"]["noise"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        print(f"resumed from {checkpoint} at step {step}", flush=True)
    elif cfg.teacher_steps:
        fit_teacher(vae, cfg)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    batching = {"batch": cfg.batch, "max_context": cfg.max_context, "first_frame_share": cfg.first_frame_share}
    if cfg.data_dir is None:
        data = CropDataset(cfg.seed, cfg.frames, cfg.crop, cfg.frame_size, **batching)
    else:
        data = ClipCropDataset(cfg.data_dir, cfg.seed, cfg.frames, cfg.crop, **batching)
    workers = cfg.workers if cfg.data_dir is None else 0  # a crop of a memory-mapped clip costs next to nothing
    loader = DataLoader(
        data,
        batch_size=cfg.batch,
        sampler=_FromIndex(step * cfg.batch),
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    start_time = time.perf_counter()
    deadline = start_time + cfg.minutes * 60 if cfg.minutes else math.inf
    sums: dict[str, float] = {}
    window_start, window_steps, timing_start = time.perf_counter(), 0, None
    own_schedule, marks = False, deque(maxlen=5)  # a schedule planned here from the speed: (step, time) at log steps
    # the bar only on a terminal (None: tqdm checks); CI logs get the log lines
    bar = progress_bar(total=total_steps, initial=step, unit="step", enabled=None if cfg.progress else False, desc="vae")
    batches = iter(loader)
    first_step = last_saved = step
    # the teacher phase's two problems are clipped apart: the encoder's gradient does not scale the decoder's
    teacher_groups = ([p for p in _encoder_of(vae).parameters() if p.requires_grad], [p for p in vae.tiny.parameters() if p.requires_grad]) if cfg.teacher_steps else ()
    while (total_steps is None or step < total_steps) and time.perf_counter() < deadline:
        if cfg.stop_at is not None and step >= cfg.stop_at:
            break
        x = next(batches)
        lr = lr_at(step, total_steps, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        context = data.context(step * cfg.batch)
        teach = step < cfg.teacher_steps
        terms = loss_terms(vae, x, noise, cfg.kl_weight, cfg.edge_weight, context, cfg.chroma_weight, teach=teach,
                           teacher_pixel_share=cfg.teacher_pixel_share)
        if not torch.isfinite(terms["loss"]):  # stop before the optimizer or a checkpoint takes it in
            bar.close()
            raise FloatingPointError(f"train VAE: loss {terms['loss'].item()} at step {step + 1}: the run diverged; "
                                     f"{_checkpoint_dir(cfg.out_dir)} keeps its last checkpoints: resume with a lower --lr (this run: {cfg.lr})")
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        for group in teacher_groups if teach else (params,):
            torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
        opt.step()
        step += 1

        values = {k: terms[k].item() for k in ("loss", "l1", "mse", "edge", "kl", "chroma", "latent") if k in terms}
        values["psnr"] = psnr(terms["recon"].detach(), terms["x"])
        for key, value in values.items():
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value, count + 1)
        window_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", psnr=f"{values['psnr']:.2f}", lr=f"{lr:.1e}")

        if timing_start is None and step == first_step + 3:  # skip the first, slower steps
            timing_start = (step, time.perf_counter())
        if total_steps is None and timing_start is not None and step >= max(cfg.warmup, timing_start[0] + 10):
            seconds_per_step = (time.perf_counter() - timing_start[1]) / max(1, step - timing_start[0])
            total_steps = step + max(1, int(0.98 * (deadline - time.perf_counter()) / seconds_per_step))
            bar.total, own_schedule = total_steps, True
            marks.append((step, time.perf_counter()))
            print(f"schedule fixed at {total_steps} steps ({seconds_per_step:.2f} s/step measured)", flush=True)
        elif own_schedule and step % cfg.log_every == 0 and step < total_steps:
            # re-planned at the speed of the last few log windows, so the schedule ends (annealed) when the time does
            marks.append((step, time.perf_counter()))
            seconds_per_step = (marks[-1][1] - marks[0][1]) / (step - marks[0][0])
            total_steps = step + max(1, int(0.98 * (deadline - time.perf_counter()) / seconds_per_step))
            bar.total = total_steps
        if step % cfg.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            record = {key: total / count for key, (total, count) in sums.items()}
            record.update(
                step=step,
                total_steps=total_steps,
                lr=lr,
                elapsed_s=time.perf_counter() - start_time,
                steps_per_s=window_steps / elapsed,
                clips_per_s=window_steps * cfg.batch / elapsed,
            )
            _log(cfg, record)
            sums, window_start, window_steps = {}, time.perf_counter(), 0
        if step % cfg.checkpoint_every == 0:
            _save_checkpoint(cfg, step, total_steps, vae, opt, noise)
            last_saved = step
    bar.close()
    del batches
    if step != last_saved:
        _save_checkpoint(cfg, step, total_steps, vae, opt, noise)
    if cfg.stop_at is not None and step >= cfg.stop_at and step != total_steps:
        return TrainResult(step, total_steps, None, None)

    vae.eval()
    vae_dir = out / "vae"
    if isinstance(vae, WorldAutoencoder):
        from ..models.tiny_decoder import save_tiny_autoencoder

        mean, std = (np.round(t.double().numpy(), 6).tolist() for t in (vae.latents_mean, vae.latents_std))
        save_tiny_autoencoder(copy.deepcopy(vae.tiny).half(), out / TINY_DECODER_FOLDER)
        vae = vae.vae
    else:
        mean, std = latent_statistics(vae, cfg)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(vae_dir)
    print(f"saved {vae_dir} (latents_mean {np.round(mean, 3).tolist()}, latents_std {np.round(std, 3).tolist()})")
    report = evaluate(vae_dir, cfg, out / "eval_side_by_side.png") if cfg.eval_clips else None
    if report is not None:
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"eval PSNR {report['psnr']:.2f} dB, colour kept {100 * report['colour_kept']:.0f} % over {report['clips']} held-out clips", flush=True)
    return TrainResult(step, total_steps, vae_dir, report)


# ---------------------------------------------------------------------------------- statistics, eval


@torch.no_grad()
def fit_teacher(model: WorldAutoencoder, cfg: TrainConfig) -> None:
    """Fit ``model.teacher`` on ``teacher_clips`` full-frame training clips (the dataset's, drawn by
    the seed, or rendered) and start the latent statistics at the code's (0 and 1)."""
    rng = np.random.default_rng([cfg.seed, _TEACHER_SALT])
    if cfg.data_dir is not None:
        from .dataset import ClipDataset

        dataset = ClipDataset(cfg.data_dir)
        picks = rng.permutation(len(dataset))[: cfg.teacher_clips]
        clips = (to_pixels(dataset[int(i)][0]) for i in picks)
    else:
        clips = (to_pixels(world_clip(cfg.seed, _TEACHER_SALT, i, cfg.stats_latent_frames, cfg.frame_size, "train")) for i in range(cfg.teacher_clips))
    model.teacher.fit(clips)
    if model.tiny.config.linear_skip:  # the decoder starts as the code's linear decoder, its convolutions adding nothing
        for name in ("first", "rest"):
            weight, bias = model.teacher.skip_weights(name)
            conv = getattr(model.tiny.skip, name)
            conv.weight.copy_(weight[:, :, None, None])
            conv.bias.copy_(bias)
        model.tiny.decoder[-1].weight.zero_()
        model.tiny.decoder[-1].bias.zero_()
    model.latents_mean.zero_()
    model.latents_std.fill_(1.0)
    model.observed.fill_(1)  # the end-to-end phase moves the statistics from the code's, at the EMA rate


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior mean over ``stats_clips`` full-frame training clips
    (a stream of their own, not the training batches), all latent frames and positions."""
    total = torch.zeros(vae.config.z_dim, dtype=torch.float64)
    total_sq = torch.zeros(vae.config.z_dim, dtype=torch.float64)
    count = 0
    for i in range(cfg.stats_clips):
        frames = world_clip(cfg.seed, _STATS_SALT, i, cfg.stats_latent_frames, cfg.frame_size, "train")
        mu, _, _ = encode_moments(vae, to_pixels(frames)[None])
        flat = mu.double().transpose(0, 1).reshape(mu.shape[1], -1)
        total += flat.sum(dim=1)
        total_sq += flat.square().sum(dim=1)
        count += flat.shape[1]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(v, 6) for v in std.tolist()]


@torch.no_grad()
def evaluate(vae_dir: str | Path, cfg: TrainConfig, png_path: str | Path | None = None) -> dict:
    """Reconstruction PSNR on ``eval_clips`` full-frame clips of held-out worlds (seeds ≥
    ``EVAL_SEED_START``): the posterior mean, normalised with the saved statistics, decoded in chunks of
    3 latent frames as served, through :class:`~lingbot_ray.models.vae_streaming.StreamingWanVAE` or,
    for a run with ``tiny_widths``, its tiny decoder (``TINY_DECODER_FOLDER`` beside ``vae_dir``).
    Also reports how much colour survives (:func:`colour_kept`), PSNR per latent-frame position and
    the normalised latents' statistics."""
    from ..models.vae_streaming import StreamingWanVAE

    streaming = StreamingWanVAE.from_pretrained(vae_dir, subfolder=None)
    vae = streaming.vae
    if cfg.tiny_widths is not None:
        from ..models.tiny_decoder import StreamingTinyDecoder

        streaming = StreamingTinyDecoder.from_pretrained(Path(vae_dir).parent / TINY_DECODER_FOLDER)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    scores, colour, per_position, norm_latents, sheet_rows = [], [], [], [], []
    for i in range(cfg.eval_clips):
        frames = world_clip(cfg.seed, _EVAL_SALT, i, cfg.eval_latent_frames, cfg.frame_size, "eval")
        x = to_pixels(frames)[None]
        mu, _, _ = encode_moments(vae, x)
        z = (mu - mean) / std
        cache, pieces = streaming.new_decode_cache(), []
        for start in range(0, z.shape[2], 3):
            chunk, cache = streaming.decode_chunk(z[:, :, start : start + 3], cache)
            pieces.append(chunk)
        recon = torch.cat(pieces, dim=2)
        scores.append(psnr(recon, x))
        colour.append(colour_kept(recon, x))
        positions = [x[:, :, :1]] + list(x[:, :, 1:].split(TEMPORAL_STRIDE, dim=2))
        recon_positions = [recon[:, :, :1]] + list(recon[:, :, 1:].split(TEMPORAL_STRIDE, dim=2))
        per_position.append([psnr(r, t) for r, t in zip(recon_positions, positions, strict=True)])
        norm_latents.append(z.transpose(0, 1).reshape(z.shape[1], -1))
        if png_path is not None and i < 3:
            recon_u8 = ((recon[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
            pick = [t for t in (0, 1, 4, 8, 20, 32, frames.shape[0] - 1) if t < frames.shape[0]]
            sheet_rows.append((frames[pick], recon_u8[pick], pick))
    z_all = torch.cat(norm_latents, dim=1)
    report = {
        "clips": cfg.eval_clips,
        "frames_per_clip": 1 + TEMPORAL_STRIDE * (cfg.eval_latent_frames - 1),
        "frame_size": list(cfg.frame_size),
        "psnr": float(np.mean(scores)),
        "psnr_per_clip": [round(s, 3) for s in scores],
        "colour_kept": round(float(np.mean(colour)), 3),
        "psnr_per_latent_frame": [round(float(v), 3) for v in np.mean(per_position, axis=0)],
        "normalised_latent_mean": [round(v, 3) for v in z_all.mean(dim=1).tolist()],
        "normalised_latent_std": [round(v, 3) for v in z_all.std(dim=1).tolist()],
    }
    if png_path is not None and sheet_rows:
        _write_side_by_side(png_path, sheet_rows)
    return report


def _write_side_by_side(path: str | Path, rows: list[tuple[np.ndarray, np.ndarray, list[int]]]) -> None:
    from PIL import Image

    from .render import contact_sheet

    tiles, labels = [], []
    for original, recon, pick in rows:
        tiles += [original, recon]
        labels += [f"orig t={t}" for t in pick] + [f"recon t={t}" for t in pick]
    Image.fromarray(contact_sheet(np.concatenate(tiles), len(rows[0][2]), labels)).save(path)


# ------------------------------------------------------------------------------------------------- CLI


def _parse_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height or width)


def _parse_widths(text: str | None) -> tuple[int, int, int, int] | None:
    if text is None:
        return None
    widths = tuple(int(w) for w in text.split(","))
    if len(widths) != 4:
        raise ValueError(f"--tiny-widths {text!r}: give 4 comma-separated widths")
    return widths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the world model's small Wan2.1-layout VAE on rendered clips.")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=None, help="schedule length in steps")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock limit of this invocation's training")
    parser.add_argument("--base-dim", type=int, default=TrainConfig.base_dim)
    parser.add_argument("--res-blocks", type=int, default=TrainConfig.res_blocks)
    parser.add_argument("--z-dim", type=int, default=TrainConfig.z_dim, help="latent channels")
    parser.add_argument("--decoder-base-dim", type=int, default=None, help="the Wan decoder's width (default: --base-dim)")
    parser.add_argument("--tiny-widths", default=None, help="train a tiny decoder of these 4 widths, e.g. 96,48,32,32, instead of the Wan decoder")
    parser.add_argument("--teacher-steps", type=int, default=TrainConfig.teacher_steps, help="first steps learn from a linear code (needs --tiny-widths)")
    parser.add_argument("--tiny-skip", action="store_true", help="give the tiny decoder a linear path from latents to pixels")
    parser.add_argument("--teacher-clips", type=int, default=TrainConfig.teacher_clips, help="clips the linear code is fitted on")
    parser.add_argument("--teacher-pixel-share", type=float, default=TrainConfig.teacher_pixel_share,
                        help="the encoder's regression of the code weighs each channel by its pixel cost, with this share against 1 each")
    parser.add_argument("--crop", default="32", help="training crop, N or WxH (multiples of 8)")
    parser.add_argument("--frames", type=int, default=TrainConfig.frames, help="pixel frames per clip (1+4k)")
    parser.add_argument("--max-context", type=int, default=TrainConfig.max_context, help="warm-up latent frames, up to")
    parser.add_argument("--data", default=None, help="crop the clips of this dataset folder instead of rendering crops")
    parser.add_argument("--batch", type=int, default=TrainConfig.batch)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--kl-weight", type=float, default=TrainConfig.kl_weight)
    parser.add_argument("--edge-weight", type=float, default=TrainConfig.edge_weight)
    parser.add_argument("--chroma-weight", type=float, default=TrainConfig.chroma_weight)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--workers", type=int, default=TrainConfig.workers, help="data loader processes (0: inline)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    parser.add_argument("--log-every", type=int, default=TrainConfig.log_every)
    parser.add_argument("--eval-clips", type=int, default=TrainConfig.eval_clips)
    parser.add_argument("--eval-latent-frames", type=int, default=TrainConfig.eval_latent_frames)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT_DIR")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    checkpoint = latest_checkpoint(args.out_dir) if args.resume else None
    if checkpoint is not None:
        # The run's own settings win; only the time limit and the display follow this command line.
        cfg = config_from_checkpoint(checkpoint, minutes=args.minutes, progress=not args.no_progress)
    else:
        cfg = TrainConfig(
            out_dir=args.out_dir,
            steps=args.steps,
            minutes=args.minutes,
            base_dim=args.base_dim,
            res_blocks=args.res_blocks,
            z_dim=args.z_dim,
            decoder_base_dim=args.decoder_base_dim,
            tiny_widths=_parse_widths(args.tiny_widths),
            teacher_steps=args.teacher_steps,
            teacher_clips=args.teacher_clips,
            teacher_pixel_share=args.teacher_pixel_share,
            tiny_skip=args.tiny_skip,
            crop=_parse_size(args.crop),
            frames=args.frames,
            max_context=args.max_context,
            data_dir=args.data,
            batch=args.batch,
            seed=args.seed,
            lr=args.lr,
            kl_weight=args.kl_weight,
            edge_weight=args.edge_weight,
            chroma_weight=args.chroma_weight,
            workers=args.workers,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            eval_clips=args.eval_clips,
            eval_latent_frames=args.eval_latent_frames,
            progress=not args.no_progress,
        )
    train(cfg, resume=checkpoint is not None)


if __name__ == "__main__":
    main()
