"""The embedded world model from nothing, in one command: world clips → VAE → latents → DiT → checkpoint.

    python -m lingbot_ray.world.train_world runs/world

Stages (each skipped when its output exists, so an interrupted run continues with ``--resume``):

1. ``data/``: training clips rendered from the procedural world (``dataset.generate_dataset``);
2. ``vae_run/vae`` and ``vae_run/tiny_decoder``: the VAE's encoder and the tiny temporal decoder of
   its latents, trained together on crops of those clips (``train_vae``, ``--vae-steps``), the first
   steps from a linear code of the latent grid (the teacher phase);
3. ``latents.pt``: every clip encoded with it, the first frame's condition truncated to
   ``CONDITION_FRAMES`` (``train_dit.encode_dataset``);
4. ``dit_run/``: the causal DiT, teacher-forced for the engine's sampler (``--dit-steps``);
5. ``checkpoint/``: the serving folder (``train_dit.assemble``), decoding with the tiny decoder, then
   ``tiny_decoder_run/`` (that decoder fine-tuned on the DiT's own served latents,
   ``train_tiny_decoder``) and ``decoder_run/`` (the Wan decoder, ``vae.decoder: wan``, trained on
   them, ``train_decoder``) put into it;
6. ``dit_tune_run/``: the DiT fine-tuned with its loss weighed per latent channel by what the
   channel does to the served decoder's frames (``train_dit.pixel_channel_weights``,
   ``--dit-tune-steps``), then ``dit_tune_run_2/`` and on: the same schedule again from the last
   round's weights (``--dit-tune-rounds``); the last round is put into ``checkpoint/``;
7. ``quality.json``: the held-out measurements (``quality.measure``).

``--until STAGE`` stops after a stage (of ``data vae encode dit decoder tune quality``); ``--resume``
continues from there.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# The VAE stage (docs/EMBEDDED_MODEL.md, "The next recipe"): the Wan encoder with a tiny temporal
# decoder of its latents, the decoder sessions get (lingbot_ray.json "decoder": "tiny"); its schedule
# is a step count, so two runs of the command train the same model on any machine.
VAE = {
    "base_dim": 8,  # the encoder; it runs once per session (the first frame), so it may be wide
    "z_dim": 16,  # latent channels (Wan2.1's); the DiT's input and output follow
    "decoder_base_dim": 4,  # the Wan decoder (vae.decoder: wan), trained by the decoder stage
    "tiny_widths": (96, 48, 32, 32),
    "crop": (64, 48),
    "max_context": 3,
    "lr": 2e-3,
    "min_lr_ratio": 0.01,
    "edge_weight": 0.5,
    "teacher_steps": 2000,  # the first steps learn from a linear code (train_vae, "Teacher phase")
    "tiny_skip": True,  # ... which the tiny decoder's linear path starts at
}
VAE_STEPS = 8000
# The DiT's schedule: on the taught VAE's latents 3,000 steps left the camera damped (held-out control
# fidelity 89.1 %, camera probe +57 %); 6,000 reach 91.7 % (+131 %) and +0.8 dB on chunk 0
# (docs/EMBEDDED_MODEL.md, "How it was trained").
DIT_STEPS = 6000
# The DiT's first-frame condition: the first frame's latent alone, repeated on every later latent frame
# (lingbot_ray.json "condition_frames"): one encoder step per session instead of running the encoder
# to its fixed point (30 steps of zero frames with the base-8 encoder, ~3 s per session on 2 cores),
# and every block sees the first frame's latent.
CONDITION_FRAMES = 1
TINY_DECODER_LR = 5e-4  # fine-tuning a trained decoder, not training a fresh one (train_tiny_decoder's 2e-3)
TINY_ADVERSARIAL_WEIGHT = 0.05  # the patch discriminator's term at the end of training (train_tiny_decoder)
# The last stage fine-tunes the DiT with its loss weighed per latent channel by what the channel does
# to the served decoder's frames: channel 0 carries most of the picture, and a uniform loss gives it
# 1/16 of its weight. Over the same 1,500 steps with uniform weights it adds 0.14-0.25 dB to every
# chunk; over the DiT stage's model, 0.25-0.37 dB and 4 of 192 control cases (docs/EMBEDDED_MODEL.md,
# "Weighing the DiT's loss by what each channel does to the picture").
DIT_TUNE_STEPS = 1500
DIT_TUNE_LR = 3e-4  # a trained model: a third of the DiT stage's rate, after a short warm-up
DIT_TUNE_WARMUP = 50
# The tune stage's schedule is run this many times, each round from the last one's weights with the
# next seed (a warm restart: its warm-up, then its cosine again). The second round added 0.01-0.09 dB
# to every chunk and 3 of 192 control cases (docs/EMBEDDED_MODEL.md, "A second round of the tune stage").
DIT_TUNE_ROUNDS = 2
STAGES = ("data", "vae", "encode", "dit", "decoder", "tune", "quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_ray.world.train_world", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--clips", type=int, default=1000, help="training clips (the session's first 3 blocks each)")
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="autoencoder steps (the learning-rate schedule's length)")
    parser.add_argument("--dit-minutes", type=float, default=None, help="wall-clock cap of the DiT run (default: none)")
    parser.add_argument("--dit-steps", type=int, default=DIT_STEPS, help="DiT steps (the learning-rate schedule's length)")
    parser.add_argument("--dit-pixel-share", type=float, default=0.0,
                        help="weigh the DiT loss per latent channel by what it does to the decoded frames (train_dit.pixel_channel_weights), this much against uniform weights")
    parser.add_argument("--dit-tune-steps", type=int, default=DIT_TUNE_STEPS,
                        help="the last stage: DiT fine-tuning steps with the loss weighed by the served decoder's pixels (0: none)")
    parser.add_argument("--dit-tune-rounds", type=int, default=DIT_TUNE_ROUNDS,
                        help="run the last stage's schedule this many times, each from the last one's weights (a warm restart)")
    parser.add_argument("--tiny-decoder-steps", type=int, default=600, help="tiny decoder fine-tuning steps (0: keep the autoencoder's)")
    parser.add_argument("--tiny-decoder-clips", type=int, default=200, help="training clips the DiT generates for the tiny decoder")
    parser.add_argument("--decoder-steps", type=int, default=600, help="Wan decoder training steps (0: keep the VAE's, untrained)")
    parser.add_argument("--decoder-clips", type=int, default=400, help="training clips the DiT generates for the Wan decoder")
    parser.add_argument("--dit-heads", type=int, default=None,
                        help="the DiT's width in heads of 32 channels, its FFN 4x the width (default: train_dit.WORLD_TRANSFORMER_CONFIG's 4)")
    parser.add_argument("--z-dim", type=int, default=VAE["z_dim"], help="the VAE's latent channels (the DiT's width in and out follows)")
    parser.add_argument("--vae-teacher-pixel-share", type=float, default=0.0,
                        help="the VAE's teacher phase: weigh the encoder's regression of each code channel by its pixel cost, this much against uniform weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue the VAE, DiT and decoder runs found in OUT")
    parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage (continue later with --resume)")
    args = parser.parse_args(argv)
    if args.dit_tune_rounds < 1:
        parser.error(f"--dit-tune-rounds {args.dit_tune_rounds}: need at least 1 (--dit-tune-steps 0 turns the stage off)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from ..checkpoint import TINY_DECODER_FOLDER
    from . import quality, train_decoder, train_dit, train_tiny_decoder, train_vae
    from .dataset import generate_dataset

    started = time.monotonic()
    times: dict[str, float] = {}

    def stage(name: str) -> bool:
        """Log the end of stage ``name``; True when the run stops after it (``--until``)."""
        times[name] = round((time.monotonic() - started) / 60, 1)
        logger.info("stage %s done at %.1f min", name, times[name])
        return name == args.until

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    if not (data / "meta.json").is_file():
        generate_dataset(data, num_clips=args.clips, num_latent_frames=train_dit.TRAIN_LATENT_FRAMES, width=160, height=96, seed=args.seed, workers=args.threads)
    if stage("data"):
        return 0

    vae_run = args.out / "vae_run"
    if not (vae_run / "vae" / "config.json").is_file():
        checkpoint = train_vae.latest_checkpoint(vae_run) if args.resume else None
        if checkpoint is not None:
            cfg = train_vae.config_from_checkpoint(checkpoint)
        else:
            cfg = train_vae.TrainConfig(out_dir=str(vae_run), steps=args.vae_steps, seed=args.seed, data_dir=str(data), **{**VAE, "z_dim": args.z_dim},
                                        teacher_pixel_share=args.vae_teacher_pixel_share)
        train_vae.train(cfg, resume=checkpoint is not None)
    if stage("vae"):
        return 0

    latents = args.out / "latents.pt"
    if not latents.is_file():
        train_dit.encode_dataset(data, vae_run / "vae", latents, condition_frames=CONDITION_FRAMES)
    if stage("encode"):
        return 0

    dit_run = args.out / "dit_run"
    width = None if args.dit_heads is None else train_dit.width_overrides(args.dit_heads)
    # with --dit-pixel-share the loss weighs each latent channel by what it does to the frames
    weights = train_dit.pixel_weights_for(latents, vae_run / TINY_DECODER_FOLDER, args.dit_pixel_share) if args.dit_pixel_share else None
    train_dit.train(latents, dit_run, steps=args.dit_steps, minutes=args.dit_minutes, seed=args.seed, resume=args.resume,
                    channel_weights=weights,
                    model_overrides=width)
    if stage("dit"):
        return 0

    # What the sessions decode is the DiT's output, not an encoding: the tiny decoder is fine-tuned on
    # the DiT's own served latents, and the Wan decoder (not trained with the encoder) trained on them.
    tiny, wan = vae_run / TINY_DECODER_FOLDER, vae_run / "vae"
    checkpoint = train_dit.assemble(dit_run, wan, args.out / "checkpoint", width=160, height=96, tiny_decoder=tiny)
    if args.tiny_decoder_steps:
        tiny_run = args.out / "tiny_decoder_run"
        if not (tiny_run / TINY_DECODER_FOLDER / "config.json").is_file():
            train_tiny_decoder.train(checkpoint, tiny_run, clips=args.tiny_decoder_clips, steps=args.tiny_decoder_steps, lr=TINY_DECODER_LR,
                                     init=tiny, edge_weight=VAE["edge_weight"], adversarial_weight=TINY_ADVERSARIAL_WEIGHT, seed=args.seed,
                                     resume=args.resume)
        tiny = tiny_run / TINY_DECODER_FOLDER
    if args.decoder_steps:
        wan = train_decoder.train(checkpoint, data, args.out / "decoder_run", clips=args.decoder_clips, steps=args.decoder_steps, seed=args.seed,
                                  resume=args.resume)
    checkpoint = train_dit.assemble(dit_run, wan, checkpoint, width=160, height=96, tiny_decoder=tiny)
    if stage("decoder"):
        return 0

    tune_rounds = args.dit_tune_rounds if args.dit_tune_steps else 0
    if tune_rounds:  # the checkpoint's DiT, the one the decoders were trained on, is the first round's start
        pixel_weights = train_dit.pixel_weights_for(latents, tiny)
        for round_ in range(tune_rounds):
            tune_run = args.out / ("dit_tune_run" if round_ == 0 else f"dit_tune_run_{round_ + 1}")
            train_dit.train(latents, tune_run, steps=args.dit_tune_steps, lr=DIT_TUNE_LR, warmup=DIT_TUNE_WARMUP, seed=args.seed + round_,
                            resume=args.resume, init=checkpoint, channel_weights=pixel_weights, model_overrides=width)
            checkpoint = train_dit.assemble(tune_run, wan, checkpoint, width=160, height=96, tiny_decoder=tiny)
    if stage("tune"):
        return 0
    report = quality.measure(checkpoint)
    stage("quality")
    (args.out / "quality.json").write_text(json.dumps({**report, "minutes": times}, indent=1) + "\n")
    write_model_card(checkpoint, report, times, " ".join(["python -m lingbot_ray.world.train_world", *(argv or sys.argv[1:])]),
                     tune_rounds=tune_rounds)
    print(quality.format_report(report))
    print(f"stages done at (minutes): {times}; checkpoint {checkpoint}")
    return 0


def write_model_card(checkpoint: Path, report: dict, minutes: dict[str, float], command: str, *, tune_rounds: int) -> Path:
    """``README.md`` of the checkpoint folder: what it is, how it was made, what it measures."""
    from . import quality, train_dit

    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    focal = json.loads((checkpoint / "lingbot_ray.json").read_text()).get("camera_focal")
    rounds = "" if tune_rounds < 2 else f" ({tune_rounds} rounds of the schedule, each from the last one's weights)"
    tune = f", then fine-tuned with its loss weighed per latent channel by what the channel does to the served decoder's frames{rounds}" if tune_rounds else ""
    text = f"""# lingbot-world-tiny

A tiny LingBot World fast — the real classes (`CausalLingBotWorldTransformer3DModel`, the
`AutoencoderKLWan` encoder, a tiny temporal decoder, the tiny UMT5 prompt encoder) at {report["size"]} — trained by
`lingbot_ray.world` on the project's procedural world, conditioned on the camera (w/s/a/d move,
i/j/k/l look); how well it follows it on worlds it never saw is measured below. The prompt plays no
part (cross-attention outputs are zero).

- DiT: {config["num_layers"]} layers, {config["num_attention_heads"]} heads × {config["attention_head_dim"]}, \
sink {config["sink_size"]}, window {config["sliding_window_num_frames"]} latent frames; \
trained teacher-forced for the engine's DMD sampler on {train_dit.TRAIN_LATENT_FRAMES}-latent-frame clips{tune}.
- VAE: the `AutoencoderKLWan` encoder trained with a tiny temporal decoder (`tiny_decoder/`, the decoder sessions get: `"decoder": "tiny"` in `lingbot_ray.json`) on the rendered clips; the tiny decoder is then fine-tuned, and the Wan decoder (`vae.decoder: wan`) trained, on the DiT's own served latents (the encoder, hence the latent space, is unchanged).
- Camera input: the Plücker map at focal length {focal:g} px (`camera_focal` in `lingbot_ray.json`), not the renderer's: rays far enough apart to say where a token is (walking forward is a radial flow), close enough that a turn does not look like a move across the picture (see `lingbot_ray/world/train_dit.py`, `CAMERA_FOCAL_PER_WIDTH`).
- Made by: `{command}` (stages done at, minutes: {minutes}).

## Held-out quality (`python -m lingbot_ray.world.quality`)

```
{quality.format_report(report)}
```

The full model card (architecture, data, recipe and its variants, limits): [docs/EMBEDDED_MODEL.md](../../../docs/EMBEDDED_MODEL.md).
"""
    out = checkpoint / "README.md"
    out.write_text(text)
    return out


if __name__ == "__main__":
    sys.exit(main())
