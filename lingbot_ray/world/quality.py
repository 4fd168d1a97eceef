"""Does the embedded world model follow the camera? Measured against the renderer on unseen worlds.

Two measurements on held-out world seeds (``dataset.EVAL_SEED_START`` and up, never trained on),
each session started from the renderer's first frame and run through ``RealtimeEngine`` exactly as
served (same sampler, same camera path):

* **PSNR per chunk** of a 4-chunk session (9 + 12 + 12 + 12 frames; the first frame, the given
  image, is left out) driven by a random held-key script that keeps the camera moving (an idle
  camera would make "repeat the first frame" perfect), against the renderer's frames for the same
  script, next to the baseline "repeat the first frame". The model must beat the baseline by
  ≥ 3 dB on average over chunks and worlds.
* **Control fidelity**: a session holds nothing for chunk 0, then one action of the table
  (:data:`lingbot_ray.protocol.actions.ACTIONS`) for chunk 1.
  The generated chunk 1 must be closer (MSE) to the renderer's chunk 1 for its own action than to
  that of every other action in ≥ 90 % of (world, action) cases.

    python -m lingbot_ray.world.quality checkpoints/lingbot-world --worlds 8 --json quality.json

``--vae-ceiling`` also scores the renderer's frames encoded and decoded by the checkpoint's VAE: what
a perfect DiT would reach with this VAE. ``--truth-history`` also scores the model with its KV cache
written from the truth's latents instead of its own blocks: what the model loses to its own history.
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
PSNR_GAIN_TARGET_DB = 3.0
FIDELITY_TARGET = 0.90


def frame_psnr(a: np.ndarray, b: np.ndarray, cap_db: float = 99.0) -> np.ndarray:
    """PSNR in dB of uint8 frames ``[..., H, W, 3]`` pair by pair (broadcast), at most ``cap_db``
    (identical frames would be infinite)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(-3, -2, -1))
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(255.0**2 / mse), cap_db)


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


def vae_round_trip(vae_dir: str | Path, width: int, height: int) -> Generator:
    """The VAE's ceiling: the renderer's own frames for the script, encoded and decoded by the
    checkpoint's VAE (the causal loops training and serving use). A DiT that predicted the latents
    perfectly would score this; the gap between it and the model is the DiT's."""
    import torch

    from ..models.vae_streaming import StreamingWanVAE
    from .train_vae import decode_frames, encode_moments, to_pixels

    vae = StreamingWanVAE.from_pretrained(vae_dir, subfolder=None).vae  # the serving load path (fast norms)

    @torch.no_grad()
    def generate_fn(world: int, first: np.ndarray, actions: list[list[str]], num_chunks: int, seed: int) -> np.ndarray:
        truth = make_clip(world, actions[: num_chunks * LATENT_PER_CHUNK], width, height).frames
        mean, _, _ = encode_moments(vae, to_pixels(truth)[None])
        pixels = decode_frames(vae, mean)[0][0].clamp(-1, 1)
        return pixels.add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

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


def measure(checkpoint: str | Path, *, worlds: int = 8, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Both measurements of a checkpoint, its sessions run through ``RealtimeEngine``."""
    from ..engine import RealtimeEngine

    engine = RealtimeEngine.from_pretrained(checkpoint)

    def model(world: int, first: np.ndarray, actions: list[list[str]], num_chunks: int, session_seed: int) -> np.ndarray:
        return generate(engine, first, actions, num_chunks, session_seed)

    report = measure_generator(model, engine.defaults.width, engine.defaults.height, worlds=worlds, seed=seed, progress=progress)
    return {"checkpoint": str(checkpoint), **report}


def measure_generator(
    generate_fn: Generator, width: int, height: int, *, worlds: int = 8, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
    """Both measurements of any video generator (the model, or a baseline in the tests)."""
    rng = np.random.default_rng(seed)
    world_seeds = [EVAL_SEED_START + 7919 * i + seed for i in range(worlds)]
    slices = chunk_slices(CHUNKS)

    psnr_model, psnr_repeat = np.zeros((worlds, CHUNKS)), np.zeros((worlds, CHUNKS))
    bar = progress_bar(total=worlds * (1 + len(ACTIONS)), desc="quality", enabled=progress)
    for n, world in enumerate(world_seeds):
        actions = random_actions(rng, CHUNKS * LATENT_PER_CHUNK, idle=False)
        truth = make_clip(world, actions, width, height).frames
        generated = generate_fn(world, truth[0], actions, CHUNKS, n)
        for c, part in enumerate(slices):
            frames = list(generated_frames(part))
            psnr_model[n, c] = frame_psnr(generated[frames], truth[frames]).mean()
            psnr_repeat[n, c] = frame_psnr(truth[0], truth[frames]).mean()
        bar.update(1)

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

    gain = float(np.mean(psnr_model - psnr_repeat))
    fidelity = float(np.mean(hits))
    return {
        "size": f"{width}x{height}",
        "world_seeds": world_seeds,
        "psnr_model_db_per_chunk": psnr_model.mean(axis=0).round(2).tolist(),
        "psnr_repeat_first_frame_db_per_chunk": psnr_repeat.mean(axis=0).round(2).tolist(),
        "psnr_gain_db": round(gain, 2),
        "control_fidelity": round(fidelity, 3),
        "control_confusion": confusion,
        "passed": gain >= PSNR_GAIN_TARGET_DB and fidelity >= FIDELITY_TARGET,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report.get('checkpoint', 'generator')} at {report['size']}, held-out worlds {report['world_seeds'][0]}…"]
    lines.append("chunk                    " + "".join(f"{c:>8d}" for c in range(CHUNKS)))
    lines.append("PSNR model (dB)          " + "".join(f"{v:8.2f}" for v in report["psnr_model_db_per_chunk"]))
    lines.append("PSNR repeat first frame  " + "".join(f"{v:8.2f}" for v in report["psnr_repeat_first_frame_db_per_chunk"]))
    lines.append(f"mean gain {report['psnr_gain_db']:+.2f} dB (target ≥ +{PSNR_GAIN_TARGET_DB})")
    lines.append(f"control fidelity {100 * report['control_fidelity']:.1f} % (target ≥ {100 * FIDELITY_TARGET:.0f} %)")
    lines.append("confusion (rows: held action, columns: nearest truth): " + " ".join(ACTIONS))
    for action, row in report["control_confusion"].items():
        lines.append(f"  {action}: " + " ".join(f"{row[b]:d}" for b in ACTIONS))
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingbot_ray.world.quality", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--worlds", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--vae-ceiling", action="store_true", help="also measure the VAE round trip of the renderer's frames")
    parser.add_argument("--truth-history", action="store_true", help="also measure the model with its KV cache written from the truth")
    args = parser.parse_args(argv)
    report = measure(args.checkpoint, worlds=args.worlds, seed=args.seed)
    print(format_report(report))
    if args.vae_ceiling:
        size = [int(v) for v in report["size"].split("x")]
        ceiling = measure_generator(vae_round_trip(args.checkpoint / "vae", *size), *size, worlds=args.worlds, seed=args.seed)
        print("\nVAE ceiling (the renderer's frames through the VAE):\n" + format_report(ceiling))
        report["vae_ceiling"] = {k: v for k, v in ceiling.items() if k not in ("size", "world_seeds")}
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
