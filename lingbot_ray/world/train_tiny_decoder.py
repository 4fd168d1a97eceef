"""Train a checkpoint's tiny temporal decoder (``vae.decoder: tiny``) on the DiT's own latents.

The tiny decoder (lingbot_ray/models/tiny_decoder.py, TAEHV-style: 2-D convolutions per frame, time only
through one-step ``MemBlock`` memories) decodes the DiT's normalised latents straight to frames. It is
not distilled from the Wan decoder: like ``train_decoder`` it is trained on what it decodes when served
(``train_decoder.generate_latents``: the checkpoint run exactly as served on training clips) against
the renderer's frames, the truth. Only the decoder is trained; the folder format also holds an encoder,
here ``ENCODER_WIDTH`` wide and zero: nothing encodes with it (the first frame is still encoded by the
checkpoint's VAE).

Stages in ``RUN_DIR`` (each kept, so ``--resume`` continues where a run stopped):

1. ``data/`` and ``eval_data/``: ``clips`` training clips and ``eval_clips`` held-out ones
   (``split="eval"``: worlds never trained on) at the checkpoint's size (``dataset.generate_dataset``);
2. ``latents.pt`` and ``eval_latents.pt``: the served DiT's latents for them;
3. ``state.pt``: training. Loss per step ``L1 + MSE + chroma_weight × L1 of the Cb/Cr error +
   edge_weight × L1 of the horizontal and vertical differences`` (pixels in [-1, 1]) over all latent
   frames of ``batch`` clips, decoded by ``decode_video``: the causal computation the streaming
   decoder runs, one-shot (tests/models/test_tiny_decoder.py shows the two equal). AdamW, linear
   warm-up then cosine to zero; batch ``s`` depends only on ``(seed, s)``, so ``--resume`` continues
   a run exactly. ``--adversarial-weight`` adds a patch discriminator's hinge loss (trained beside
   the decoder, saved with it); ``--init`` fine-tunes an existing decoder instead of a fresh one;
4. ``tiny_decoder/``: the trained decoder (``save_tiny_autoencoder``; weights stored in float16,
   ``load_tiny_autoencoder`` returns float32: measured, the same held-out PSNR as float32), and ``report.json``: held-out PSNR of it and of the
   checkpoint's Wan decoder against the renderer on the same DiT latents, both decoding chunk by
   chunk through their streaming classes as served, their ms per chunk, and the CPU minutes per stage.

Measured with the defaults on an earlier embedded checkpoint (commit bb24bb7's, one thread, 2-core CPU): 29.1 CPU minutes (30 min
wall: 5.2 for the clips and latents, 23.5 training); on 16 held-out clips (528 frames) the tiny decoder
reaches 18.38 dB against the Wan decoder's 18.37 dB on the same latents, at 52 against 403 ms per
12-frame chunk, and its folder is 370 KB. Widths: a short probe (48 clips, 200 steps of batch 2) gave
(64, 32, 16, 16) 16.36 dB and (32, 16, 16, 16) 17.05 dB at the same speed: the time goes to the
full-resolution stages, 16 wide in both, while the first stage holds most of the weights (623 k
parameters against 183 k). Batch 1 trains about 1.4× more clips per second than batch 2.

    python -m lingbot_ray.world.train_tiny_decoder CHECKPOINT RUN_DIR --clips 200 --steps 1800 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import read_geometry, read_serving_defaults
from ..models.tiny_decoder import TinyAutoencoder, TinyDecoderConfig, load_tiny_autoencoder, save_tiny_autoencoder
from .dataset import ClipDataset, generate_dataset
from .progress import progress_bar
from .train_decoder import optimizer_step, warmup_cosine
from .train_dit import TRAIN_LATENT_FRAMES
from .train_vae import chroma, to_pixels

logger = logging.getLogger(__name__)

WIDTHS = (32, 16, 16, 16)
ENCODER_WIDTH = 1  # the folder format's encoder: never trained, never used, so as small as allowed
EVAL_CLIPS = 16
EVAL_SEED_OFFSET = 1_000  # session seeds of the held-out clips: apart from the training clips'
ADVERSARIAL_LR = 2e-4  # the patch discriminator's (Adam, betas 0.5 / 0.99)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system, all threads)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def new_model(latent_channels: int, widths: tuple[int, int, int, int], seed: int, linear_skip: bool = False) -> TinyAutoencoder:
    """A fresh tiny autoencoder: the decoder initialised from ``seed`` with its output starting at
    mid-grey (the last conv's bias 0.5; the output is clamped to [0, 1], so a start below 0 gets no
    gradient where it is clamped), the encoder zero, and a ``linear_skip`` zero (it adds nothing
    until trained, or set: ``train_vae`` starts it at a linear code)."""
    config = TinyDecoderConfig(latent_channels=latent_channels, encoder_width=ENCODER_WIDTH, decoder_widths=tuple(widths), linear_skip=linear_skip)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyAutoencoder(config)
    with torch.no_grad():
        for p in [*model.encoder.parameters(), *(model.skip.parameters() if linear_skip else ())]:
            p.zero_()
        model.decoder[-1].bias.fill_(0.5)
    return model


def decode(model: TinyAutoencoder, latents: torch.Tensor) -> torch.Tensor:
    """The DiT's latents ``[B, C, F, h, w]`` → frames ``[B, 3, 1 + 4(F−1), H, W]`` in [−1, 1] (the
    project's convention; the model works in TAEHV's NTCHW and [0, 1])."""
    return (model.decode_video(latents.movedim(2, 1)) * 2 - 1).movedim(1, 2)


def loss_terms(pred: torch.Tensor, target: torch.Tensor, *, chroma_weight: float, edge_weight: float) -> dict[str, torch.Tensor]:
    """``loss = l1 + mse + chroma_weight·chroma + edge_weight·edge`` of frames ``[B, 3, T, H, W]`` in [−1, 1]."""
    error = pred - target
    l1, mse = error.abs().mean(), error.square().mean()
    colour = chroma(error).abs().mean()
    edge = (error.diff(dim=-1).abs().mean() + error.diff(dim=-2).abs().mean()) / 2
    return {"loss": l1 + mse + chroma_weight * colour + edge_weight * edge, "l1": l1, "mse": mse, "chroma": colour, "edge": edge}


class PatchDiscriminator(torch.nn.Module):
    """Scores overlapping patches (about 22 px across) of frames ``[N, 3, H, W]`` in [−1, 1]: above 0
    for the renderer's, below 0 for decoded ones. Its hinge loss against the decoder is the term that
    an average of plausible pictures (a blur) cannot satisfy, where L1/MSE reward one."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        act = lambda: torch.nn.LeakyReLU(0.2)  # noqa: E731
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 4, 2, 1), act(),
            torch.nn.Conv2d(width, 2 * width, 4, 2, 1), act(),
            torch.nn.Conv2d(2 * width, 2 * width, 3, 1, 1), act(),
            torch.nn.Conv2d(2 * width, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames)


def _frames_of(video: torch.Tensor, every: int) -> torch.Tensor:
    """Every ``every``-th frame of ``[B, 3, T, H, W]`` as ``[B·T', 3, H, W]``."""
    return video[:, :, ::every].transpose(1, 2).flatten(0, 1)


def _record_cpu(run_dir: Path, stage: str, seconds: float) -> dict[str, float]:
    """Add ``seconds`` to ``stage`` in ``run_dir/cpu.json`` (CPU minutes per stage, summed over resumes)."""
    path = run_dir / "cpu.json"
    minutes = json.loads(path.read_text()) if path.is_file() else {}
    minutes[stage] = round(minutes.get(stage, 0.0) + seconds / 60, 2)
    path.write_text(json.dumps(minutes, indent=1) + "\n")
    return minutes


def prepare(checkpoint: Path, run_dir: Path, *, clips: int, eval_clips: int, latent_frames: int, seed: int, progress: bool = True) -> None:
    """Stages 1-2: the training and held-out clips at the checkpoint's size and the served DiT's
    latents for them (each skipped when its output exists)."""
    from .train_decoder import generate_latents

    defaults = read_serving_defaults(checkpoint)
    for name, count, split, session_seed in (("", clips, "train", seed), ("eval_", eval_clips, "eval", seed + EVAL_SEED_OFFSET)):
        data, latents = run_dir / f"{name}data", run_dir / f"{name}latents.pt"
        if not (data / "meta.json").is_file():
            started = cpu_seconds()
            generate_dataset(data, num_clips=count, num_latent_frames=latent_frames, width=defaults.width, height=defaults.height,
                             seed=seed, split=split, progress=progress)
            _record_cpu(run_dir, f"{name}data", cpu_seconds() - started)
        if not latents.is_file():
            started = cpu_seconds()
            torch.save(generate_latents(checkpoint, data, count, seed=session_seed, progress=progress), latents.with_suffix(".tmp"))
            latents.with_suffix(".tmp").replace(latents)
            _record_cpu(run_dir, f"{name}latents", cpu_seconds() - started)


@torch.no_grad()
def evaluate(checkpoint: Path, tiny_dir: Path, dataset_dir: Path, latents: torch.Tensor) -> dict[str, float]:
    """Held-out PSNR (dB, per frame as ``quality.frame_psnr``, mean over every frame of every clip) of
    the tiny decoder in ``tiny_dir`` and of the checkpoint's Wan decoder against the renderer's frames,
    both decoding the same DiT latents chunk by chunk as served, to the uint8 frames a client gets;
    and the median ms of a steady-state chunk (one that continues a session) of each."""
    from ..engine.stages import frames_to_uint8
    from ..models.tiny_decoder import StreamingTinyDecoder
    from ..models.vae_streaming import StreamingWanVAE
    from .quality import frame_psnr

    per_chunk = read_geometry(checkpoint).num_frames_per_block
    decoders = {"tiny": StreamingTinyDecoder.from_pretrained(tiny_dir), "wan": StreamingWanVAE.from_pretrained(checkpoint)}
    data = ClipDataset(dataset_dir)
    psnr: dict[str, list[float]] = {name: [] for name in decoders}
    ms: dict[str, list[float]] = {name: [] for name in decoders}
    for index in range(len(latents)):
        truth = np.array(data[index][0])
        for name, decoder in decoders.items():
            cache, pieces = decoder.new_decode_cache(), []
            for start in range(0, latents.shape[2], per_chunk):
                began = time.perf_counter()
                frames, cache = decoder.decode_chunk(latents[index : index + 1, :, start : start + per_chunk].float(), cache)
                if start:
                    ms[name].append((time.perf_counter() - began) * 1e3)
                pieces.append(frames_to_uint8(frames))
            decoded = np.concatenate(pieces)
            psnr[name].extend(frame_psnr(decoded, truth[: len(decoded)]).tolist())
    report = {f"psnr_{name}_db": round(float(np.mean(values)), 2) for name, values in psnr.items()}
    report.update({f"ms_per_chunk_{name}": round(statistics.median(values), 1) for name, values in ms.items() if values})
    report.update(clips=len(latents), frames=len(psnr["tiny"]), frames_per_chunk=decoders["tiny"].num_pixel_frames(per_chunk, first_chunk=False))
    return report


def train(
    checkpoint: Path,
    run_dir: Path,
    *,
    clips: int = 200,
    steps: int = 1800,
    lr: float = 2e-3,
    batch: int = 1,
    widths: tuple[int, int, int, int] = WIDTHS,
    init: Path | None = None,
    adversarial_weight: float = 0.0,
    train_skip: bool = False,
    chroma_weight: float = 0.5,
    edge_weight: float = 0.0,
    warmup: int = 50,
    seed: int = 0,
    eval_clips: int = EVAL_CLIPS,
    latent_frames: int = TRAIN_LATENT_FRAMES,
    checkpoint_every: int = 100,
    until: int | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Make the clips and the DiT's latents (stages 1-2), train the tiny decoder ``steps`` steps
    (``until`` stops earlier, as if interrupted), then write ``run_dir/tiny_decoder`` and
    ``run_dir/report.json``; returns ``run_dir/tiny_decoder``. ``init``: fine-tune this tiny decoder
    folder (its widths) instead of training a fresh one. ``adversarial_weight`` > 0 adds that weight ×
    a :class:`PatchDiscriminator`'s hinge loss on every other decoded frame (the discriminator trained
    beside it, at ``ADVERSARIAL_LR``). ``train_skip``: the linear skip (``linear_skip`` decoders) trains
    too; otherwise it stays as the VAE stage left it (the linear code's decode, refined end to end)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    state_file = run_dir / "state.pt"
    if not resume and state_file.is_file():
        raise FileExistsError(f"{state_file} exists: pass resume=True (--resume) to continue it, or use a fresh run folder")
    prepare(checkpoint, run_dir, clips=clips, eval_clips=eval_clips, latent_frames=latent_frames, seed=seed, progress=progress)
    generated = torch.load(run_dir / "latents.pt")
    if init is not None:
        model = load_tiny_autoencoder(init).train()
        widths = model.config.decoder_widths
    else:
        model = new_model(read_geometry(checkpoint).latent_channels, widths, seed).train()
    params = list(model.decoder.parameters())
    if train_skip and model.config.linear_skip:
        params += list(model.skip.parameters())
    elif model.config.linear_skip:
        model.skip.requires_grad_(False)
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=1e-4)
    critic = critic_optimizer = None
    if adversarial_weight > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            critic = PatchDiscriminator()
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=ADVERSARIAL_LR, betas=(0.5, 0.99))
    step, losses = 0, []
    if resume and state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        if tuple(state["widths"]) != tuple(widths):
            raise ValueError(f"{state_file}: a run of widths {tuple(state['widths'])}, asked to continue with {tuple(widths)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if critic is not None:
            critic.load_state_dict(state["critic"])
            critic_optimizer.load_state_dict(state["critic_optimizer"])
        step, losses = state["step"], state["losses"]
        logger.info("resumed the tiny decoder at step %d from %s", step, state_file)

    def save() -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "losses": losses, "widths": list(widths)}
        if critic is not None:
            state.update(critic=critic.state_dict(), critic_optimizer=critic_optimizer.state_dict())
        torch.save(state, state_file.with_suffix(".tmp"))
        state_file.with_suffix(".tmp").replace(state_file)

    data = ClipDataset(run_dir / "data")
    pixel_frames = 1 + model.config.t_upscale * (generated.shape[2] - 1)
    bar = progress_bar(total=steps, initial=step, desc="tiny decoder", enabled=progress)
    started, started_cpu = time.monotonic(), cpu_seconds()
    while step < min(steps, until or steps):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(lr, step, warmup, steps)
        indices = torch.randint(len(generated), (batch,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        target = torch.stack([to_pixels(np.array(data[i][0][:pixel_frames])) for i in indices.tolist()])
        decoded = decode(model, generated[indices].float())
        loss = loss_terms(decoded, target, chroma_weight=chroma_weight, edge_weight=edge_weight)["loss"]
        if critic is not None:
            fake, real = _frames_of(decoded, 2), _frames_of(target, 2)
            critic.requires_grad_(False)
            loss = loss - adversarial_weight * critic(fake).mean()
            critic.requires_grad_(True)
        losses.append(optimizer_step(loss, optimizer, params, what="train tiny decoder", step=step, state_file=state_file, lr=lr))
        if critic is not None:
            hinge = F.relu(1 - critic(real)).mean() + F.relu(1 + critic(fake.detach())).mean()
            critic_optimizer.zero_grad(set_to_none=True)
            hinge.backward()
            critic_optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if step % checkpoint_every == 0:
            save()
    bar.close()
    save()
    cpu = _record_cpu(run_dir, "train", cpu_seconds() - started_cpu)
    logger.info("tiny decoder: %d steps (%.1f min this run), loss %.4f → %.4f", step, (time.monotonic() - started) / 60,
                np.mean(losses[:20]), np.mean(losses[-20:]))
    out = run_dir / "tiny_decoder"
    if step >= steps:
        save_tiny_autoencoder(copy.deepcopy(model).eval().half(), out)
        started_cpu = cpu_seconds()
        report = evaluate(checkpoint, out, run_dir / "eval_data", torch.load(run_dir / "eval_latents.pt"))
        cpu = _record_cpu(run_dir, "eval", cpu_seconds() - started_cpu)
        report.update(widths=list(widths), clips=clips, steps=steps, eval_clips=report.pop("clips"), cpu_minutes=cpu,
                      cpu_minutes_total=round(sum(cpu.values()), 1), threads=torch.get_num_threads())
        (run_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        logger.info("held-out PSNR (%d clips): tiny %.2f dB, wan %.2f dB; ms per %d-frame chunk: tiny %.1f, wan %.1f; CPU minutes %s (total %.1f)",
                    report["eval_clips"], report["psnr_tiny_db"], report["psnr_wan_db"], report["frames_per_chunk"],
                    report.get("ms_per_chunk_tiny", float("nan")), report.get("ms_per_chunk_wan", float("nan")), cpu, report["cpu_minutes_total"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_ray.world.train_tiny_decoder", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="the world-model checkpoint folder")
    parser.add_argument("run", type=Path)
    parser.add_argument("--clips", type=int, default=200, help="training clips the DiT generates latents for")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--edge-weight", type=float, default=0.0, help="weight of the L1 error of horizontal and vertical differences")
    parser.add_argument("--adversarial-weight", type=float, default=0.0, help="weight of a patch discriminator's hinge loss (0: none)")
    parser.add_argument("--init", type=Path, default=None, help="fine-tune this tiny decoder folder instead of a fresh one")
    parser.add_argument("--train-skip", action="store_true", help="train the linear skip too (decoders with one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(train(args.checkpoint, args.run, clips=args.clips, steps=args.steps, lr=args.lr, edge_weight=args.edge_weight, init=args.init,
                adversarial_weight=args.adversarial_weight, train_skip=args.train_skip, seed=args.seed, resume=args.resume))
    return 0


if __name__ == "__main__":
    sys.exit(main())
