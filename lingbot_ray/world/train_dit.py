"""Train the causal DiT of the embedded world model on rendered clips, for the engine's few-step sampler.

Three steps, each a function and a sub-command:

1. ``encode``: the dataset's clips through the trained VAE — clip latents (posterior mean, normalised
   with the VAE's latents_mean/std, as the decoder expects them), the first-frame condition exactly as
   the engine builds it (``StreamingWanVAE.encode_condition``), and each block's camera poses exactly
   as the engine conditions on them (``CameraTrajectory.chunk_c2w`` replayed block by block).
2. ``train``: teacher forcing (``teacher_forcing.py``: one forward = every block denoised with the
   clean history the KV cache would hold, sink/window eviction included). Each block draws one of
   the sampler's timesteps; the loss is on the sampler's own x0 estimate ``x_t − σ·v`` against the
   clean latents. The prompt plays no part in this world: cross-attention output projections start
   and stay at zero, so any prompt gives the same video. Progress bar, periodic checkpoints (model,
   optimizer, step, RNG), ``--resume``, a fixed seed.
3. ``assemble``: a diffusers-style checkpoint folder (the real classes and loaders) with the trained
   transformer and VAE, the tiny text encoder and tokenizer, and ``lingbot_ray.json`` (size, fps,
   focal length of the camera input it was trained on, ``CAMERA_FOCAL_PER_WIDTH``).

    python -m lingbot_ray.world.train_dit encode DATASET VAE_DIR LATENTS.pt
    python -m lingbot_ray.world.train_dit train LATENTS.pt RUN_DIR --minutes 40
    python -m lingbot_ray.world.train_dit train LATENTS.pt RUN_DIR --steps 1500 --lr 3e-4 --warmup 50 --init CHECKPOINT --own-history 0.5
    python -m lingbot_ray.world.train_dit assemble RUN_DIR VAE_DIR CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..control.camera import CameraTrajectory, Intrinsics
from ..engine.plucker import plucker_map
from ..engine.sampler import DMDSampler
from ..models.attention import LingBotCrossAttnProcessor
from ..models.tiny_components import TINY_TRANSFORMER_CONFIG
from .linear_code import blend_with_uniform
from .progress import progress_bar
from .render import world_intrinsics
from .teacher_forcing import teacher_forced_flow

logger = logging.getLogger(__name__)

BLOCK = 3
# The world model: small enough that a 3-latent-frame block (5 forwards) at 160x96 takes well
# under the VAE's decode time on one CPU core.
WORLD_TRANSFORMER_CONFIG: dict[str, Any] = {
    **TINY_TRANSFORMER_CONFIG,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 512,
    "num_layers": 8,
    # No sink: a block sees the 6 latent frames before it and itself, so every block of an endless
    # session is in a situation that a 9-frame training clip shows (the first-frame image lives on
    # in those frames, and relative RoPE distances never exceed what training saw).
    "sink_size": 0,
    "sliding_window_num_frames": 9,
}


def width_overrides(heads: int) -> dict[str, int]:
    """The world transformer ``heads`` heads wide (32 channels each), its FFN 4x the width: the one
    knob of its size that train_world exposes (docs/EMBEDDED_MODEL.md, "A 64-channel latent")."""
    if heads < 1:
        raise ValueError(f"heads: {heads} (want >= 1)")
    return {"num_attention_heads": heads, "ffn_dim": 4 * heads * WORLD_TRANSFORMER_CONFIG["attention_head_dim"]}


SPEED_PROBE_STEPS = 30
# Training clips: the session's first 3 blocks (the first block, then 1 and 2 blocks of context).
TRAIN_LATENT_FRAMES = 9
# The focal length of the camera input (the Plücker map), per pixel of frame width: 800 px at 160
# wide, not the renderer's 96 px. Two needs pull apart. At the renderer's focal a ray's direction
# encodes the pixel's position as much as the camera's rotation — a 6° yaw turns a token's rays into
# exactly those of a token 10 px to its side — and a transformer without absolute positions cannot
# tell the two apart locally (fidelity 39 %). With near-parallel rays (10,000 px) a rotation is the
# same change at every token, but walking forward or back is a radial flow whose direction depends
# on where the token is, and the rays then say almost nothing about that: held w lands on s. On 24
# held-out worlds (same latents, seed and 3,000 steps) fidelity went 79.2 / 82.8 / 84.4 / 89.6 % at
# 10,000 / 3,200 / 1,600 / 800 px, held w 6 / 11 / 14 / 18 of 24. The served model conditions on the
# same intrinsics (``camera_focal`` in lingbot_ray.json); the video is the renderer's.
CAMERA_FOCAL_PER_WIDTH = 5.0
RENDERER_FOCAL_PER_WIDTH = world_intrinsics(832, 480).fx / 832


def run_model_config(state: dict[str, Any]) -> dict[str, Any]:
    """The world transformer's arguments a training run's ``state.pt`` saved (its shape)."""
    return {k: v for k, v in state["config"].items() if not k.startswith("_")}


def camera_intrinsics(width: int, height: int, focal_per_width: float = CAMERA_FOCAL_PER_WIDTH) -> Intrinsics:
    """The intrinsics of the world model's camera input at ``width`` x ``height``."""
    return Intrinsics.default(width, height, focal=focal_per_width * width)


def run_focal_per_width(state: dict[str, Any]) -> float:
    """The camera focal a saved run trained with (runs saved before the key existed used the renderer's)."""
    return state.get("focal_per_width", RENDERER_FOCAL_PER_WIDTH)


# ------------------------------------------------------------------------------------------ encode


def block_poses(actions: list[list[str]]) -> np.ndarray:
    """The conditioning poses ``[N, 4, 4]`` the engine computes for a session driven by ``actions``
    (one entry per latent frame, N a multiple of the block), block by block."""
    if len(actions) % BLOCK:
        raise ValueError(f"{len(actions)} latent frames: must be a multiple of {BLOCK}")
    trajectory, poses = CameraTrajectory(), []
    for start in range(0, len(actions), BLOCK):
        trajectory.extend(actions[start : start + BLOCK])
        poses.append(trajectory.chunk_c2w(BLOCK))
    return np.concatenate(poses).astype(np.float32)


@torch.no_grad()
def encode_dataset(
    dataset_dir: Path,
    vae_dir: Path,
    out: Path,
    *,
    limit: int | None = None,
    latent_frames: int = TRAIN_LATENT_FRAMES,
    batch_size: int = 4,
    condition_frames: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode the first ``latent_frames`` latent frames of every clip of a ``generate_dataset``
    folder, ``batch_size`` clips per VAE call; saves a dict of tensors to ``out``. The conditions
    are the served ones for a checkpoint whose ``lingbot_ray.json`` says ``condition_frames`` (kept
    in ``meta``; the DiT run and its assembled checkpoint carry it on)."""
    from ..models.vae_streaming import StreamingWanVAE
    from .dataset import ClipDataset

    data = ClipDataset(dataset_dir)
    if latent_frames % BLOCK or latent_frames > data.meta["num_latent_frames"]:
        raise ValueError(f"latent_frames={latent_frames}: must be a multiple of {BLOCK} and at most the clips' {data.meta['num_latent_frames']}")
    streaming = StreamingWanVAE.from_pretrained(vae_dir, subfolder=None)
    vae = streaming.vae  # loaded as served (fast RMS norms, eval mode)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    count = len(data) if limit is None else min(limit, len(data))
    pixel_frames = 1 + 4 * (latent_frames - 1)
    latents, conditions, poses = [], [], []
    bar = progress_bar(total=count, desc="encode clips", unit="clip", enabled=progress)
    for start in range(0, count, batch_size):
        clips = [data[index] for index in range(start, min(start + batch_size, count))]
        # np.array copies: shards are read-only memory maps
        frames = np.stack([np.array(frames[:pixel_frames]) for frames, _, _ in clips])
        video = torch.from_numpy(frames).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)
        latents.append(((vae.encode(video).latent_dist.mean - mean) / std).half())
        condition = streaming.encode_condition(video[:, :, 0], max_frames=latent_frames if condition_frames is None else min(latent_frames, condition_frames))
        conditions.append(condition.slice(0, latent_frames).half())
        poses.extend(torch.from_numpy(block_poses(actions[:latent_frames])) for _, actions, _ in clips)
        bar.update(len(clips))
    bar.close()
    meta = {**data.meta, "condition_frames": condition_frames}
    result = {"latents": torch.cat(latents), "conditions": torch.cat(conditions), "poses": torch.stack(poses), "meta": meta}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    logger.info("encoded %d clips: latents %s to %s", count, tuple(result["latents"].shape), out)
    return result


# ------------------------------------------------------------------------------------------ train


CAMERA_PARAMS = ("patch_embedding_wancamctrl", "c2ws_hidden_states", "cam_")


def new_world_transformer(seed: int, **overrides: Any):
    """A fresh world transformer. Each block's camera scale/shift starts at zero (the camera path
    adds nothing until training finds a use for it, as an adapter on a pretrained model would)."""
    from ..models.transformer_lingbot import CausalLingBotWorldTransformer3DModel

    torch.manual_seed(seed)
    model = CausalLingBotWorldTransformer3DModel(**{**WORLD_TRANSFORMER_CONFIG, **overrides})
    for block in model.blocks:
        for param in block.attn2.to_out.parameters():  # the prompt plays no part: cross-attention adds nothing, and stays so
            torch.nn.init.zeros_(param)
            param.requires_grad_(False)
        for layer in (block.cam_scale_layer, block.cam_shift_layer):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    return model


class SilentTextAttention(LingBotCrossAttnProcessor):
    """The cross-attention processor while training: its output projection is zero and frozen
    (``new_world_transformer``), so its output is exactly zero — returned without the projections
    and the attention that would compute it (~6 % of a training step)."""

    def __call__(self, attn, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def silence_text_attention(model) -> None:
    """Give every block :class:`SilentTextAttention`, after checking its output projection is zero."""
    for index, block in enumerate(model.blocks):
        if any(bool(p.any()) or p.requires_grad for p in block.attn2.to_out.parameters()):
            raise ValueError(f"blocks.{index}.attn2.to_out is trainable or non-zero: the text attention is not silent")
        block.attn2.processor = SilentTextAttention()


def text_embeds_for(model, batch: int) -> torch.Tensor:
    """Any text works (its cross-attention output is zero); a fixed tensor keeps shapes real."""
    return torch.zeros(batch, 4, model.config.text_dim)


def training_batch(
    data: dict[str, Any],
    indices: torch.Tensor,
    sampler_sigmas: torch.Tensor,
    sampler_t: torch.Tensor,
    generator: torch.Generator,
    frames: int = TRAIN_LATENT_FRAMES,
    step_weights: torch.Tensor | None = None,
):
    """One batch of the clips' first ``frames`` latent frames: clean latents, noisy latents at a
    per-block sampler step (drawn with ``step_weights``, default uniform), timesteps, σ, condition, Plücker."""
    clean = data["latents"][indices, :, :frames].float()
    condition = data["conditions"][indices, :, :frames].float()
    batch, _, frames = clean.shape[:3]
    height, width = clean.shape[3] * 8, clean.shape[4] * 8
    weights = torch.ones(len(sampler_t)) if step_weights is None else step_weights
    steps = torch.multinomial(weights, batch * (frames // BLOCK), replacement=True, generator=generator)
    steps = steps.view(batch, frames // BLOCK).repeat_interleave(BLOCK, dim=1)
    sigma = sampler_sigmas[steps].view(batch, 1, frames, 1, 1)
    noise = torch.randn(clean.shape, generator=generator)
    noisy = (1 - sigma) * clean + sigma * noise
    if "plucker" in data:
        plucker = data["plucker"][indices, :, :frames]
    else:
        plucker = torch.cat([clip_plucker(data["poses"][i, :frames], height, width) for i in indices.tolist()])
    return clean, noisy, sampler_t[steps], sigma, condition, plucker


def clip_plucker(poses: torch.Tensor, height: int, width: int, focal_per_width: float = CAMERA_FOCAL_PER_WIDTH) -> torch.Tensor:
    """The engine's Plücker input ``[1, 384, F, h, w]`` for a clip's conditioning poses ``[F, 4, 4]``."""
    return plucker_map(poses.double().numpy(), height, width, camera_intrinsics(width, height, focal_per_width))


def precompute_plucker(data: dict[str, Any], frames: int = TRAIN_LATENT_FRAMES, focal_per_width: float = CAMERA_FOCAL_PER_WIDTH) -> None:
    """Every clip's Plücker input once (``data["plucker"]``), instead of once per batch."""
    height, width = data["latents"].shape[3] * 8, data["latents"].shape[4] * 8
    count = data["poses"].shape[0]
    data["plucker"] = torch.cat([clip_plucker(data["poses"][i, :frames], height, width, focal_per_width) for i in range(count)])


@torch.no_grad()
def own_estimates(model, clean: torch.Tensor, condition: torch.Tensor, plucker: torch.Tensor, first_t: torch.Tensor,
                  generator: torch.Generator, *, sink_frames: int, window_frames: int | None) -> torch.Tensor:
    """The model's own x0 estimate of every block from pure noise (the sampler's first step, σ = 1),
    each block seeing the true history: a stand-in, one forward for all blocks, for the blocks a
    session generates and writes to its KV cache. They are blurred and damped where the truth is not,
    which is what the model meets in a session after its first block and never under teacher forcing."""
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = first_t.expand(clean.shape[0], clean.shape[2])
    flow = teacher_forced_flow(model, clean, noise, timesteps, condition, text_embeds_for(model, clean.shape[0]), plucker,
                               sink_frames=sink_frames, window_frames=window_frames)
    return noise - flow  # x0 = x_t − σ·v at σ = 1


def x0_loss(
    estimate: torch.Tensor, clean: torch.Tensor, coarse_weight: float = 0.0, channel_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE of the x0 estimate, plus ``coarse_weight`` × the MSE of 2×2- and 4×4-pooled latents;
    with ``channel_weights`` (one per latent channel, mean 1) each channel's error weighs that much.

    At 160×96 a latent pixel covers 8×8 px of detailed texture that a camera step shifts by a pixel
    or more, so fine detail is barely predictable, and a blur that ignores the camera is nearly as
    good as one that follows it. Where the sky, the floor and the objects go is predictable, and it
    is what the camera decides: the pooled terms weigh that up.
    """
    weights = None if channel_weights is None else channel_weights.to(estimate).view(1, -1, *([1] * (estimate.dim() - 2)))

    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        squared = (a - b).square()
        return (squared if weights is None else squared * weights).mean()

    loss = mse(estimate, clean)
    if coarse_weight:
        for size in (2, 4):
            pooled = [torch.nn.functional.avg_pool3d(x, (1, size, size), ceil_mode=True) for x in (estimate, clean)]
            loss = loss + coarse_weight * mse(*pooled)
    return loss


@torch.no_grad()
def pixel_channel_weights(tiny_decoder: Path, latents: torch.Tensor, *, share: float = 1.0, step: float = 0.1) -> torch.Tensor:
    """How much each normalised latent channel moves the decoded pixels: the mean squared pixel change
    when channel ``c`` of ``latents`` (``[N, C, F, h, w]``, a few real clips) moves by ``step``,
    divided by their mean (so the mean weight is 1); ``share`` < 1 blends them with uniform weights
    (``1 − share + share·w``). Measured through the decoder sessions get (a tiny decoder folder), so
    it holds for its convolutions as well as its linear skip. A latent space whose channels differ in
    what they carry (the VAE's teacher was a principal-component code: the first channels carry the
    coarse picture) gets a loss that weighs a channel by what it does to the frames, not 1 each
    (docs/EMBEDDED_MODEL.md, "Weighing the DiT's loss by what each channel does to the picture")."""
    from ..models.tiny_decoder import load_tiny_autoencoder

    decoder = load_tiny_autoencoder(tiny_decoder)
    x = latents.float().movedim(2, 1)  # [N, F, C, h, w]
    base, _ = decoder.decode_frames(x)
    changes = []
    for channel in range(x.shape[2]):
        moved = x.clone()
        moved[:, :, channel] += step
        frames, _ = decoder.decode_frames(moved)
        changes.append(float((frames - base).square().mean()))
    return blend_with_uniform(torch.tensor(changes), share)


def pixel_weights_for(latents_file: Path, tiny_decoder: Path, share: float = 1.0) -> torch.Tensor:
    """:func:`pixel_channel_weights` on the first block of 4 clips of an encoded dataset."""
    sample = torch.load(latents_file, weights_only=False)["latents"][:4, :, :BLOCK]
    weights = pixel_channel_weights(tiny_decoder, sample, share=share)
    logger.info("loss weights per latent channel: %s", [round(w, 3) for w in weights.tolist()])
    return weights


@torch.no_grad()
def camera_gain(model, data: dict[str, Any], sampler_t: torch.Tensor, *, clips: int = 16, seed: int = 1234) -> dict[str, float]:
    """Does the model use the camera? Its x0 estimate from pure noise (the sampler's first step, which
    the later steps refine) for the frames after the first, on a fixed batch, with each clip's own
    poses and with another clip's. ``gain`` = shuffled / own − 1 of the MSE, at full latent
    resolution and 4×4-pooled (where the scene goes); 0 means the camera is ignored."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(data["latents"].shape[0], generator=generator)[:clips]
    clean, _, _, _, condition, plucker = training_batch(data, indices, torch.ones(1), sampler_t[:1], generator)
    noise = torch.randn(clean.shape, generator=generator)
    t = torch.full(clean.shape[:1] + clean.shape[2:3], float(sampler_t[0]))
    text = text_embeds_for(model, len(indices))
    sink, window = model.config.sink_size, model.config.sliding_window_num_frames
    was_training = model.training
    model.eval()
    errors = []
    for cameras in (plucker, plucker.roll(1, dims=0)):
        estimate = noise - teacher_forced_flow(model, clean, noise, t, condition, text, cameras, sink_frames=sink, window_frames=window)
        pooled = [torch.nn.functional.avg_pool3d(x, (1, 4, 4), ceil_mode=True) for x in (estimate, clean)]
        errors.append((float(((estimate - clean) ** 2)[:, :, 1:].mean()), float(((pooled[0] - pooled[1]) ** 2)[:, :, 1:].mean())))
    model.train(was_training)
    (own, own_coarse), (shuffled, shuffled_coarse) = errors
    return {"own": own, "shuffled": shuffled, "gain": shuffled / own - 1, "gain_coarse": shuffled_coarse / own_coarse - 1}


def train(
    latents_file: Path,
    run_dir: Path,
    *,
    steps: int | None = None,
    minutes: float | None = None,
    batch_size: int = 4,
    lr: float = 1e-3,
    warmup: int = 200,
    seed: int = 0,
    checkpoint_every: int = 250,
    camera_lr_scale: float = 1.0,
    coarse_weight: float = 4.0,
    first_step_share: float = 0.5,
    until: int | None = None,
    resume: bool = False,
    progress: bool = True,
    model_overrides: dict[str, Any] | None = None,
    focal_per_width: float = CAMERA_FOCAL_PER_WIDTH,
    init: Path | None = None,
    own_history: float = 0.0,
    channel_weights: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Teacher-forced training; returns a summary (steps, final loss). Checkpoints go to ``run_dir``.

    ``channel_weights``: the loss's weight per latent channel (:func:`x0_loss`, e.g. from
    :func:`pixel_channel_weights`); a resumed run keeps the weights it started with.
    ``init``: start from this checkpoint folder's transformer (a fine-tune) instead of a fresh one.
    ``own_history``: the share of steps whose history is the model's own estimate of each block
    (:func:`own_estimates`) instead of the truth: what a session's KV cache holds, written from the
    blocks the model generated (docs/EMBEDDED_MODEL.md, "Training on its own history").

    ``steps`` is the planned length (it shapes the learning-rate schedule); without it, ``minutes``
    plans it: the speed of the first ``SPEED_PROBE_STEPS`` steps fixes the length that fills the time
    (stored, so a resumed run keeps it). ``until`` or ``minutes`` stop a run earlier, and ``resume``
    continues it exactly (same batches, same noise).
    """
    if steps is None and minutes is None:
        raise ValueError("give steps or minutes (or both)")
    data = torch.load(latents_file, weights_only=False)
    state_path = run_dir / "state.pt"
    state = torch.load(state_path, weights_only=False) if resume and state_path.is_file() else None
    if state is not None:  # the camera input, the loss and the model's shape the run was started with
        focal_per_width = run_focal_per_width(state)
        channel_weights = state.get("channel_weights")
        model_overrides = run_model_config(state)
    precompute_plucker(data, focal_per_width=focal_per_width)
    run_dir.mkdir(parents=True, exist_ok=True)
    channels = data["latents"].shape[1]  # the VAE's latent width: noisy ⊕ 4 mask ⊕ condition channels in
    model = new_world_transformer(seed, **{"in_channels": 2 * channels + 4, "out_channels": channels, **(model_overrides or {})}).train()
    if init is not None:
        from ..models.loading import load_transformer

        model.load_state_dict(load_transformer(init, dtype=torch.float32).state_dict())
    schedule = DMDSampler().schedule()  # the engine's default: indices [0, 179, 358, 679], shift 10
    sampler_t = torch.tensor(schedule.timesteps, dtype=torch.float32)
    sampler_sigmas = torch.tensor(schedule.sigmas, dtype=torch.float32)
    # Half the blocks start from pure noise: the sampler's first step is where the picture is made
    # from the history and the camera alone; the later steps start from the model's own estimate.
    step_weights = torch.tensor([first_step_share] + [(1 - first_step_share) / (len(sampler_t) - 1)] * (len(sampler_t) - 1))
    params = [p for p in model.parameters() if p.requires_grad]
    # The camera path scales the residual stream itself (``x = (1 + scale)·x + shift`` in every
    # block), and the final norm hides its magnitude from the loss, so nothing holds the scales back:
    # a faster learning rate on the camera layers (5×, the previous recipe) let Adam drive them to
    # |1 + scale| ≈ 100-2,000 per block (a residual of ~1e12 in the 4-layer model; an 8-layer one
    # overflowed float32 within 300-800 steps). At the same rate as the rest the residual stays O(1)
    # and the 8-layer model learns faster than the old 4-layer one at every probe.
    camera_ids = {id(p) for name, p in model.named_parameters() if any(part.startswith(CAMERA_PARAMS) for part in name.split("."))}
    groups = [{"params": [p for p in params if id(p) not in camera_ids], "lr_scale": 1.0},
              {"params": [p for p in params if id(p) in camera_ids], "lr_scale": camera_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(seed)
    step, history, probes = 0, [], []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, history, probes = state["step"], state["history"], state.get("probes", [])
        steps = state.get("total", steps)
        logger.info("resumed at step %d from %s", step, state_path)
    silence_text_attention(model)
    sink, window = model.config.sink_size, model.config.sliding_window_num_frames
    count = data["latents"].shape[0]
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    total = steps
    started = (time.monotonic(), step)

    def save() -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                    "step": step, "total": total, "history": history, "probes": probes, "config": dict(model.config),
                    "focal_per_width": focal_per_width, "condition_frames": data["meta"].get("condition_frames"),
                    "fine_tuned": init is not None, "own_history": own_history, "channel_weights": channel_weights},
                   state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    bar = progress_bar(total=total or SPEED_PROBE_STEPS, initial=step, desc="train DiT", enabled=progress)
    running = None
    while (total is None or step < min(total, until or total)) and (deadline is None or time.monotonic() < deadline):
        if total is None and step - started[1] == SPEED_PROBE_STEPS:
            per_step = (time.monotonic() - started[0]) / SPEED_PROBE_STEPS
            total = step + int((deadline - time.monotonic()) / per_step)
            bar.total = total
            logger.info("%.2f s/step: the schedule is %d steps", per_step, total)
        for group in optimizer.param_groups:  # warm-up, then cosine to 5 %
            progress_frac = min(step / max(total or 10**9, 1), 1.0)
            group["lr"] = group["lr_scale"] * lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_frac)))
        indices = torch.randint(count, (batch_size,), generator=generator)
        clean, noisy, t, sigma, condition, plucker = training_batch(data, indices, sampler_sigmas, sampler_t, generator, step_weights=step_weights)
        history_latents = clean
        if own_history and float(torch.rand((), generator=generator)) < own_history:
            history_latents = own_estimates(model, clean, condition, plucker, sampler_t[0], generator, sink_frames=sink, window_frames=window)
        flow = teacher_forced_flow(model, history_latents, noisy, t, condition, text_embeds_for(model, batch_size), plucker,
                                   sink_frames=sink, window_frames=window)
        loss = x0_loss(noisy - sigma * flow, clean, coarse_weight, channel_weights)
        if not torch.isfinite(loss):  # stop before the optimizer or a checkpoint takes it in
            bar.close()
            raise FloatingPointError(f"train DiT: loss {loss.item()} at step {step + 1}: the run diverged; {state_path} "
                                     f"keeps its last checkpoint, if any: resume it with a lower --lr (this run: {lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        history.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        if step % checkpoint_every == 0:
            probe = camera_gain(model, data, sampler_t)
            probes.append({"step": step, **probe})
            save()
            logger.info("step %d: loss %.4f; from noise with own / shuffled cameras %.4f / %.4f: camera gain %+.1f %%, 4x4-pooled %+.1f %% (checkpoint)",
                        step, running, probe["own"], probe["shuffled"], 100 * probe["gain"], 100 * probe["gain_coarse"])
    bar.close()
    save()
    return {"steps": step, "loss": running, "losses": history, "probes": probes}


# ---------------------------------------------------------------------------------------- assemble


def assemble(
    run_dir: Path,
    vae_dir: Path,
    out: Path,
    *,
    width: int,
    height: int,
    served_model_name: str = "lingbot-world-tiny",
    tiny_decoder: Path | None = None,
) -> Path:
    """The serving checkpoint folder from a training run and a trained VAE folder; with
    ``tiny_decoder`` (a tiny decoder folder) that decoder too, as the one sessions get
    (``lingbot_ray.json`` ``"decoder": "tiny"``)."""
    import shutil

    from ..checkpoint import TINY_DECODER_FOLDER

    from ..models import loading
    from ..models.tiny_components import write_shared_components
    state = torch.load(run_dir / "state.pt", weights_only=False)
    model = new_world_transformer(0, **run_model_config(state))
    model.load_state_dict(state["model"])
    out.mkdir(parents=True, exist_ok=True)
    loading.save_transformer(model.eval(), out / "transformer", layout=loading.ORIGINAL)
    for source, target in ((vae_dir, out / "vae"), (tiny_decoder, out / TINY_DECODER_FOLDER)):
        if source is None or target.resolve() == Path(source).resolve():
            continue
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target)
    write_shared_components(
        out,
        text_dim=model.config.text_dim,
        seed=2,
        width=width,
        height=height,
        served_model_name=served_model_name,
        comment=f"lingbot_ray serving defaults of the world model trained on the procedural world ({state['step']} steps"
                f"{', a fine-tune of a trained DiT' if state.get('fine_tuned') else ''})",
        camera_focal=camera_intrinsics(width, height, run_focal_per_width(state)).fx,
        decoder="tiny" if tiny_decoder is not None else None,
        condition_frames=state.get("condition_frames"),  # the condition the DiT was trained with
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_ray.world.train_dit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode")
    enc.add_argument("dataset", type=Path)
    enc.add_argument("vae", type=Path)
    enc.add_argument("out", type=Path)
    enc.add_argument("--limit", type=int, default=None)
    enc.add_argument("--condition-frames", type=int, default=None, help="encoded condition latent frames, the last repeated (default: the encoder's fixed point)")
    tr = sub.add_parser("train")
    tr.add_argument("latents", type=Path)
    tr.add_argument("run", type=Path)
    tr.add_argument("--steps", type=int, default=None, help="schedule length (default: what --minutes allows)")
    tr.add_argument("--minutes", type=float, default=None)
    tr.add_argument("--batch", type=int, default=4)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--init", type=Path, default=None, help="fine-tune this checkpoint folder's transformer")
    tr.add_argument("--own-history", type=float, default=0.0, help="share of batches whose history is the model's own estimates")
    tr.add_argument("--pixel-weights", type=Path, default=None, help="weigh each latent channel's loss by what it does to this tiny decoder's pixels")
    tr.add_argument("--pixel-share", type=float, default=1.0, help="with --pixel-weights: their share against uniform weights")
    tr.add_argument("--until", type=int, default=None, help="stop at this step (the schedule keeps its length)")
    tr.add_argument("--heads", type=int, default=WORLD_TRANSFORMER_CONFIG["num_attention_heads"], help="the DiT's width in heads of 32 channels")
    tr.add_argument("--resume", action="store_true", help="continue the run in RUN (its model's shape, camera input and loss as it started)")
    asm = sub.add_parser("assemble")
    asm.add_argument("run", type=Path)
    asm.add_argument("vae", type=Path)
    asm.add_argument("out", type=Path)
    asm.add_argument("--size", default="160x96")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "encode":
        encode_dataset(args.dataset, args.vae, args.out, limit=args.limit, condition_frames=args.condition_frames)
    elif args.command == "train":
        weights = None if args.pixel_weights is None else pixel_weights_for(args.latents, args.pixel_weights, args.pixel_share)
        summary = train(args.latents, args.run, steps=args.steps, minutes=args.minutes, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                        seed=args.seed, init=args.init, own_history=args.own_history, until=args.until, resume=args.resume,
                        channel_weights=weights, model_overrides=width_overrides(args.heads))
        print(f"trained {summary['steps']} steps, loss {summary['loss']:.4f}")
    else:
        width, height = (int(v) for v in args.size.split("x"))
        print(assemble(args.run, args.vae, args.out, width=width, height=height))
    return 0


if __name__ == "__main__":
    sys.exit(main())
