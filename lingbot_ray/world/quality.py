"""Does the embedded world model look like its world and follow the camera? Measured against the
renderer on unseen worlds.

On held-out world seeds (``dataset.EVAL_SEED_START`` and up, never trained on), each session started
from the renderer's first frame and run through ``RealtimeEngine`` exactly as served (same sampler,
same camera path, same decoder):

* **PSNR per chunk** of a 4-chunk session (9 + 12 + 12 + 12 frames; the first frame, the given
  image, is left out) driven by a random held-key script that keeps the camera moving (an idle
  camera would make "repeat the first frame" perfect), against the renderer's frames for the same
  script, next to the baseline "repeat the first frame": chunk 0's PSNR, and the mean gain over
  the baseline over chunks 0–3.
* **Sharpness kept**: how much of the renderer's gradient those generated frames reproduce
  (:func:`gradient_kept`: the least-squares gain of their pixel differences on the renderer's),
  away from the lines of the latent grid (8 px: the step edges a decoder draws between latent
  cells are not detail). A blur scores PSNR but not this; nor do blocks, nor grain.
* **Control fidelity**: a session holds nothing for chunk 0, then one action of the table
  (:data:`lingbot_ray.protocol.actions.ACTIONS`) for chunk 1.
  The generated chunk 1 must be closer (MSE) to the renderer's chunk 1 for its own action than to
  that of every other action.
* **VAE round trip** (of a checkpoint): the renderer's frames of the same scripts encoded and decoded
  by the checkpoint's VAE; its PSNR and how much of the colour it keeps (``train_vae.colour_kept``).
  What a perfect DiT would reach with this VAE.

Every measure has a target (:data:`TARGETS`); the report is one table of measure, value, target.

    python -m lingbot_ray.world.quality checkpoints/lingbot-world --worlds 24 --json quality.json

``--truth-history`` also scores the model with its KV cache written from the truth's latents instead
of its own blocks: what the model loses to its own history. ``--strip PNG`` also writes a picture of
the first session: the renderer's frames over the generated ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol.actions import ACTIONS as ACTION_TABLE
from .dataset import EVAL_SEED_START, make_clip, random_actions
from .progress import progress_bar

ACTIONS = ACTION_TABLE.tokens
CHUNKS = 4
LATENT_PER_CHUNK = 3
PSNR_GAIN_TARGET_DB = 5.0
FIDELITY_TARGET = 0.95
CHUNK0_PSNR_TARGET_DB = 25.0
SHARPNESS_TARGET = 0.7
VAE_PSNR_TARGET_DB = 28.0
VAE_COLOUR_TARGET = 0.85
DEFAULT_WORLDS = 24
LATENT_GRID = 8  # pixels per latent cell (the Wan VAE's spatial scale)
# report key → (what, target, unit): every measure is at least its target
TARGETS: dict[str, tuple[str, float, str]] = {
    "vae_psnr_db": ("VAE round trip PSNR", VAE_PSNR_TARGET_DB, "dB"),
    "vae_colour_kept": ("VAE round trip colour kept", VAE_COLOUR_TARGET, "%"),
    "psnr_chunk0_db": ("chunk 0 PSNR vs renderer", CHUNK0_PSNR_TARGET_DB, "dB"),
    "psnr_gain_db": ('gain over "repeat the first frame", chunks 0-3', PSNR_GAIN_TARGET_DB, "dB"),
    "sharpness_kept": ("sharpness kept (truth's gradient reproduced)", SHARPNESS_TARGET, "x"),
    "control_fidelity": ("control fidelity", FIDELITY_TARGET, "%"),
}


def frame_psnr(a: np.ndarray, b: np.ndarray, cap_db: float = 99.0) -> np.ndarray:
    """PSNR in dB of uint8 frames ``[..., H, W, 3]`` pair by pair (broadcast), at most ``cap_db``
    (identical frames would be infinite)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(255.0**2 / mse), cap_db)


def gradient_kept(generated: np.ndarray, truth: np.ndarray, grid: int | None = None) -> float:
    """How much of the truth's detail uint8 frames ``[..., H, W, 3]`` reproduce: the least-squares
    gain of their horizontal and vertical forward differences on the truth's, ``Σ ∇g·∇t / Σ ∇t·∇t``
    over pixel pairs, channels and frames. The truth scores 1; a blur scores less, and so does detail
    in the wrong place. Grain scores nothing: noise is uncorrelated with the truth's gradient, so it
    adds to neither sum on average, where a ratio of gradient magnitudes counts it as detail. With
    ``grid`` (the decoder's latent cell, 8 px), the pairs that straddle a grid line are left out: a
    decoder that works cell by cell draws step edges there, which are artefacts, not detail."""
    g, t = generated.astype(np.float64), truth.astype(np.float64)
    products, energy = 0.0, 0.0
    for axis in (-2, -3):  # horizontal, vertical pairs
        dg, dt = np.diff(g, axis=axis), np.diff(t, axis=axis)
        if grid:
            keep = np.arange(1, dt.shape[axis] + 1) % grid != 0  # pair (i, i + 1) crosses a line when i + 1 is a multiple
            dg, dt = np.compress(keep, dg, axis=axis), np.compress(keep, dt, axis=axis)
        products += float(np.sum(dg * dt))
        energy += float(np.sum(dt * dt))
    return products / max(energy, 1e-8)


def chunk_slices(num_chunks: int) -> list[slice]:
    """Pixel-frame ranges of each chunk: 9 frames for the first, 12 after."""
    return [slice(0, 9)] + [slice(9 + 12 * (c - 1), 9 + 12 * c) for c in range(1, num_chunks)]


def generated_frames(part: slice) -> range:
    """The frames of a chunk that the model generated: all but the session's first (the given image)."""
    return range(max(part.start, 1), part.stop)


def generate(engine, first_frame: np.ndarray, actions: list[list[str]], num_chunks: int, seed: int) -> np.ndarray:
    """The engine's frames ``[T, H, W, 3]`` for a session steered by ``actions`` (one per latent frame)."""
    from ..control import ConditionQueue
    from ..engine import SessionSpec

    height, width = first_frame.shape[:2]
    state = engine.new_session(SessionSpec(prompt="a procedural world", image=first_frame, width=width, height=height, seed=seed))
    queue = ConditionQueue([list(a) for a in actions])
    try:
        return np.concatenate([engine.step(state, queue.sample(LATENT_PER_CHUNK, c)).frames for c in range(num_chunks)])
    finally:
        engine.close(state)


# generate(world_seed, first_frame, actions per latent frame, num_chunks, seed) -> frames [T, H, W, 3]
Generator = Callable[[int, np.ndarray, list[list[str]], int, int], np.ndarray]


def vae_round_trip(vae_dir: str | Path, width: int, height: int, tiny_decoder: str | Path | None = None) -> Generator:
    """The VAE's ceiling: the renderer's own frames for the script, encoded by the checkpoint's VAE
    (the causal loop training and serving use) and decoded chunk by chunk by the decoder sessions get:
    the VAE's own, or the tiny decoder in the folder ``tiny_decoder``. A DiT that predicted the latents
    perfectly would score this; the gap between it and the model is the DiT's."""
    import torch

    from ..engine.stages import frames_to_uint8
    from ..models.tiny_decoder import StreamingTinyDecoder
    from ..models.vae_streaming import StreamingWanVAE
    from .train_vae import encode_moments, to_pixels

    streaming = StreamingWanVAE.from_pretrained(vae_dir, subfolder=None)  # the serving load path (fast norms)
    vae = streaming.vae
    decoder = streaming if tiny_decoder is None else StreamingTinyDecoder.from_pretrained(tiny_decoder)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))

    @torch.no_grad()
    def generate_fn(world: int, first: np.ndarray, actions: list[list[str]], num_chunks: int, seed: int) -> np.ndarray:
        truth = make_clip(world, actions[: num_chunks * LATENT_PER_CHUNK], width, height).frames
        latents = (encode_moments(vae, to_pixels(truth)[None])[0] - mean) / std
        cache, pieces = decoder.new_decode_cache(), []
        for start in range(0, latents.shape[2], LATENT_PER_CHUNK):
            frames, cache = decoder.decode_chunk(latents[:, :, start : start + LATENT_PER_CHUNK], cache)
            pieces.append(frames_to_uint8(frames))
        return np.concatenate(pieces)

    return generate_fn


def truth_history(checkpoint: str | Path) -> Generator:
    """The model, each block's KV cache written from the renderer's frames (VAE-encoded, normalised
    as training's latents) instead of the block it generated — the history that teacher-forced
    training shows. The gap to the plain model is what its own history costs it (exposure bias)."""
    import torch

    from ..engine import RealtimeEngine
    from ..engine.stages import DiTStage
    from .train_vae import encode_moments, to_pixels

    class TruthHistoryDiT(DiTStage):
        truth: torch.Tensor | None = None

        def _flow(self, state, x_t, t, *, update_cache, start, **kwargs):
            if update_cache:  # the engine's step 5: the clean block that writes the cache
                x_t = self.truth[:, :, start : start + x_t.shape[2]].to(x_t)
            return super()._flow(state, x_t, t, update_cache=update_cache, start=start, **kwargs)

    served = RealtimeEngine.from_pretrained(checkpoint)
    dit = TruthHistoryDiT(served.dit.model, served.dit.geometry, served.dit.sampler, camera_focal=served.dit.camera_focal)
    engine = RealtimeEngine(served.text, dit, served.vae, defaults=served.defaults)
    vae = served.vae.vae.vae  # VAEStage → StreamingWanVAE → AutoencoderKLWan
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (vae.config.latents_mean, vae.config.latents_std))
    width, height = engine.defaults.width, engine.defaults.height

    @torch.no_grad()
    def generate_fn(world: int, first: np.ndarray, actions: list[list[str]], num_chunks: int, seed: int) -> np.ndarray:
        truth = make_clip(world, actions[: num_chunks * LATENT_PER_CHUNK], width, height).frames
        dit.truth = (encode_moments(vae, to_pixels(truth)[None])[0] - mean) / std
        return generate(engine, first, actions, num_chunks, seed)

    return generate_fn


def held_out_worlds(worlds: int, seed: int) -> list[int]:
    """The world seeds measured: ``worlds`` of them, all held out from training."""
    return [EVAL_SEED_START + 7919 * i + seed for i in range(worlds)]


def session_script(rng: np.random.Generator) -> list[list[str]]:
    """A session's held keys, one per latent frame: a random script that keeps the camera moving."""
    return random_actions(rng, CHUNKS * LATENT_PER_CHUNK, idle=False)


def session_strip(generate_fn: Generator, width: int, height: int, *, seed: int = 0, frames: tuple[int, ...] = (0, 11, 22, 33, 44)) -> np.ndarray:
    """A picture ``[2·H, len(frames)·W, 3]`` of the first measured session (its world and script):
    the renderer's frames in the top row, the generated ones below, at ``frames`` (frame 0 is the
    given image and what the session made of it)."""
    world, actions = held_out_worlds(1, seed)[0], session_script(np.random.default_rng(seed))
    truth = make_clip(world, actions, width, height).frames
    generated = generate_fn(world, truth[0], actions, CHUNKS, 0)
    return np.concatenate([np.concatenate([rows[f] for f in frames], axis=1) for rows in (truth, generated)], axis=0)


def served_generator(checkpoint: str | Path, decoder: str | None = None) -> tuple[Generator, int, int]:
    """The checkpoint's sessions run through ``RealtimeEngine`` with ``decoder`` (``vae.decoder``;
    None: the checkpoint's own, as ``serve_config.yaml`` leaves it), and their width and height."""
    from ..engine import RealtimeEngine
    from ..engine.stages import served_decoder

    engine = RealtimeEngine.from_pretrained(checkpoint, decoder=served_decoder(checkpoint, decoder))

    def model(world: int, first: np.ndarray, actions: list[list[str]], num_chunks: int, session_seed: int) -> np.ndarray:
        return generate(engine, first, actions, num_chunks, session_seed)

    return model, engine.defaults.width, engine.defaults.height


def measure(
    checkpoint: str | Path, *, worlds: int = DEFAULT_WORLDS, seed: int = 0, decoder: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Every measure of a checkpoint, its sessions run through ``RealtimeEngine`` with ``decoder``
    (``vae.decoder``; None: the checkpoint's own, as ``serve_config.yaml`` leaves it), and its VAE's
    round trip of the same held-out frames through the same decoder."""
    from ..checkpoint import TINY_DECODER_FOLDER, read_geometry, read_model_index
    from ..engine.stages import served_decoder

    decoder = served_decoder(checkpoint, decoder)
    grid = read_geometry(checkpoint).vae_scale_spatial
    model, width, height = served_generator(checkpoint, decoder)
    report = measure_generator(model, width, height, worlds=worlds, seed=seed, progress=progress, grid=grid)
    vae_dir = read_model_index(checkpoint).component_folder("vae")
    tiny = Path(checkpoint) / TINY_DECODER_FOLDER if decoder == "tiny" else None
    ceiling = measure_generator(vae_round_trip(vae_dir, width, height, tiny), width, height, worlds=worlds, seed=seed, progress=progress, fidelity=False, grid=grid)
    report = {
        "checkpoint": str(checkpoint),
        "decoder": decoder,
        **report,
        "vae_psnr_db": round(float(np.mean(ceiling["psnr_model_db_per_chunk"])), 2),
        "vae_colour_kept": ceiling["colour_kept"],
    }
    report["passed"] = all(report[key] >= target for key, (_, target, _) in TARGETS.items())
    return report


def measure_generator(
    generate_fn: Generator,
    width: int,
    height: int,
    *,
    worlds: int = DEFAULT_WORLDS,
    seed: int = 0,
    progress: bool = True,
    fidelity: bool = True,
    grid: int = LATENT_GRID,
) -> dict[str, Any]:
    """The session measures of any video generator (the model, or a baseline in the tests);
    ``fidelity`` False leaves out control fidelity (and its 8 sessions a world); ``grid``: the
    latent cell in pixels, whose lines the sharpness measure leaves out."""
    import torch

    from .train_vae import colour_kept, to_pixels

    rng = np.random.default_rng(seed)
    world_seeds = held_out_worlds(worlds, seed)
    slices = chunk_slices(CHUNKS)

    psnr_model, psnr_repeat = np.zeros((worlds, CHUNKS)), np.zeros((worlds, CHUNKS))
    sharpness, colour = np.zeros(worlds), np.zeros(worlds)
    bar = progress_bar(total=worlds * (1 + len(ACTIONS) * fidelity), desc="quality", enabled=progress)
    for n, world in enumerate(world_seeds):
        actions = session_script(rng)
        truth = make_clip(world, actions, width, height).frames
        generated = generate_fn(world, truth[0], actions, CHUNKS, n)
        for c, part in enumerate(slices):
            frames = list(generated_frames(part))
            psnr_model[n, c] = frame_psnr(generated[frames], truth[frames]).mean()
            psnr_repeat[n, c] = frame_psnr(truth[0], truth[frames]).mean()
        made = list(generated_frames(slice(0, slices[-1].stop)))
        sharpness[n] = gradient_kept(generated[made], truth[made], grid)
        with torch.no_grad():
            colour[n] = colour_kept(to_pixels(generated[made])[None], to_pixels(truth[made])[None])
        bar.update(1)
    session = {
        "size": f"{width}x{height}",
        "world_seeds": world_seeds,
        "psnr_model_db_per_chunk": psnr_model.mean(axis=0).round(2).tolist(),
        "psnr_repeat_first_frame_db_per_chunk": psnr_repeat.mean(axis=0).round(2).tolist(),
        "psnr_chunk0_db": round(float(psnr_model[:, 0].mean()), 2),
        "psnr_gain_db": round(float(np.mean(psnr_model - psnr_repeat)), 2),
        "sharpness_kept": round(float(sharpness.mean()), 3),
        "colour_kept": round(float(colour.mean()), 3),
    }
    if not fidelity:
        bar.close()
        return session

    hits, confusion = [], {a: {b: 0 for b in ACTIONS} for a in ACTIONS}
    chunk1 = slices[1]
    for n, world in enumerate(world_seeds):
        scripts = {a: [[]] * LATENT_PER_CHUNK + [[a]] * LATENT_PER_CHUNK for a in ACTIONS}
        truths = {a: make_clip(world, scripts[a], width, height).frames[chunk1].astype(np.float32) for a in ACTIONS}
        first = make_clip(world, [[]], width, height).frames[0]
        for action in ACTIONS:
            generated = generate_fn(world, first, scripts[action], 2, n)[chunk1].astype(np.float32)
            distances = {b: float(np.mean((generated - truths[b]) ** 2)) for b in ACTIONS}
            nearest = min(distances, key=distances.get)
            confusion[action][nearest] += 1
            hits.append(nearest == action)
            bar.update(1 / len(ACTIONS))
    bar.close()

    report = {**session, "control_fidelity": round(float(np.mean(hits)), 3), "control_confusion": confusion}
    report["passed"] = all(report[key] >= target for key, (_, target, _) in TARGETS.items() if key in report)
    return report


def write_strip(checkpoint: str | Path, out: Path, *, seed: int = 0, decoder: str | None = None, scale: int = 2) -> Path:
    """:func:`session_strip` of a checkpoint served as :func:`measure` serves it, as a PNG, ``scale``× up."""
    from PIL import Image

    image = Image.fromarray(session_strip(*served_generator(checkpoint, decoder), seed=seed))
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(out)
    return out


def _value(key: str, value: float) -> str:
    unit = TARGETS[key][2]
    if unit == "%":
        return f"{100 * value:.1f} %"
    return f"{value:+.2f} dB" if key == "psnr_gain_db" else f"{value:.2f} {unit}".replace(" x", "")


def format_report(report: dict[str, Any]) -> str:
    decoder = f", vae.decoder {report['decoder']}" if "decoder" in report else ""
    lines = [f"{report.get('checkpoint', 'generator')} at {report['size']}{decoder}, {len(report['world_seeds'])} held-out worlds {report['world_seeds'][0]}…"]
    lines.append(f"{'measure':<48} {'value':>10} {'target':>10}  ")
    for key, (what, target, _) in TARGETS.items():
        if key in report:
            mark = "ok" if report[key] >= target else "MISSED"
            lines.append(f"{what:<48} {_value(key, report[key]):>10} {'≥ ' + _value(key, target):>10}  {mark}")
    lines.append("chunk                    " + "".join(f"{c:>8d}" for c in range(CHUNKS)))
    lines.append("PSNR model (dB)          " + "".join(f"{v:8.2f}" for v in report["psnr_model_db_per_chunk"]))
    lines.append("PSNR repeat first frame  " + "".join(f"{v:8.2f}" for v in report["psnr_repeat_first_frame_db_per_chunk"]))
    lines.append("confusion (rows: held action, columns: nearest truth): " + " ".join(ACTIONS))
    for action, row in report["control_confusion"].items():
        lines.append(f"  {action}: " + " ".join(f"{row[b]:d}" for b in ACTIONS))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_ray.world.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--worlds", type=int, default=DEFAULT_WORLDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--decoder", choices=("wan", "tiny"), default=None, help="vae.decoder (default: the checkpoint's own)")
    parser.add_argument("--truth-history", action="store_true", help="also measure the model with its KV cache written from the truth")
    parser.add_argument("--strip", type=Path, default=None, help="also write a PNG of the first session: the renderer's frames over the generated ones")
    args = parser.parse_args(argv)
    report = measure(args.checkpoint, worlds=args.worlds, seed=args.seed, decoder=args.decoder)
    print(format_report(report))
    if args.strip:
        write_strip(args.checkpoint, args.strip, seed=args.seed, decoder=args.decoder)
    if args.truth_history:
        size = [int(v) for v in report["size"].split("x")]
        oracle = measure_generator(truth_history(args.checkpoint), *size, worlds=args.worlds, seed=args.seed)
        print("\nTruth history (the KV cache written from the renderer's frames):\n" + format_report(oracle))
        report["truth_history"] = {k: v for k, v in oracle.items() if k not in ("size", "world_seeds")}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
