"""A tiny, randomly initialised LingBot World checkpoint in the published folder layout.

Tests, the benchmark and CPU demos load it through exactly the code path of the real checkpoint
(``model_index.json`` → :mod:`lingbot_ray.models.loading` → each component's loader): the real
classes, the original Wan tensor names on disk, sharded safetensors with an index, a UniPC scheduler
config, plus ``lingbot_ray.json`` with the serving defaults of the tiny model (a small frame size).
Only the sizes are tiny; every structural hyper-parameter that the engine derives shapes from
(36 input channels, 16 latent channels, patch (1, 2, 2), blocks of 3 latent frames, 8x/4x VAE) is
the real one. Nothing is downloaded; the weights are a pure function of ``seed``.

Command line: ``lingbot-ray build-tiny PATH [--seed N] [--force]`` (see :func:`build_tiny_main`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from . import loading
from .tiny_components import TINY_TRANSFORMER_CONFIG, build_tiny_vae, write_shared_components
from .transformer_lingbot import CausalLingBotWorldTransformer3DModel

logger = logging.getLogger(__name__)

DEFAULT_TINY_WIDTH = 160
DEFAULT_TINY_HEIGHT = 96
# The VAE decodes at full frame size, so on CPU it dominates a tiny chunk; half the channels and
# one residual block per stage keep a 12-frame decode at the default size a few hundred ms.
TINY_VAE_BASE_DIM = 4
TINY_VAE_NUM_RES_BLOCKS = 1
# Not the trained embedded model's name (lingbot_ray/checkpoints/lingbot-world-tiny): these weights are random.
TINY_SERVED_MODEL_NAME = "lingbot-world-tiny-random"
# Small enough that the tiny transformer (~0.4 MB fp32) is written as several shards with an
# index, like the 16-shard real checkpoint.
TINY_MAX_SHARD_BYTES = 128 * 1024


def build_tiny_transformer(*, seed: int = 0, **overrides: Any) -> CausalLingBotWorldTransformer3DModel:
    """The tiny causal DiT with seeded random weights (all non-zero, so every path matters)."""
    config = {**TINY_TRANSFORMER_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CausalLingBotWorldTransformer3DModel(**config)
        # diffusers' default init leaves the norms' affine weights at 1 and biases at 0; small random
        # values there make a bias-handling or norm-naming bug in loading visible in the outputs.
        for param in model.parameters():
            if param.ndim == 1:
                with torch.no_grad():
                    param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def build_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    width: int = DEFAULT_TINY_WIDTH,
    height: int = DEFAULT_TINY_HEIGHT,
    force: bool = False,
    transformer_overrides: dict[str, Any] | None = None,
    condition_frames: int | None = None,
) -> Path:
    """Write a complete tiny checkpoint folder at ``path`` and return it.

    Args:
        path: Target folder. It must not exist or be empty, unless ``force`` (then a previous
            checkpoint there, recognised by its ``model_index.json``, is replaced).
        seed: Seed of every random weight (transformer, VAE, text encoder).
        width, height: Serving default size written to ``lingbot_ray.json`` (multiples of 16).
        transformer_overrides: Config keys to change on the tiny transformer (tests use this, e.g. a
            small ``rope_max_seq_len``).
        condition_frames: ``lingbot_ray.json``'s ``condition_frames`` (None: the first frame's
            condition runs the encoder to its fixed point, as the published checkpoints do; 1: one
            encoder step, as the embedded world model does).
    """
    target = Path(path)
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 16 or value % 16:
            raise ValueError(f"{name}={value!r}: must be a positive multiple of 16")
    _check_target(target, force=force)

    # Build next to the target and move it into place, so an interrupted build never leaves a
    # half-written folder that looks like a checkpoint.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would make the checkpoint private
    try:
        _write_components(staging, seed=seed, width=width, height=height, overrides=transformer_overrides or {},
                          condition_frames=condition_frames)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("tiny checkpoint (seed %d, default %dx%d) written to %s", seed, width, height, target)
    return target


def _check_target(target: Path, *, force: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{str(target)!r} exists and is not a folder")
    if not any(target.iterdir()):
        target.rmdir()
        return
    if not force:
        raise FileExistsError(f"{str(target)!r} is not empty; pass force=True (--force) to replace it")
    if not (target / checkpoint.MODEL_INDEX_FILE).is_file():
        # never delete a folder we did not write
        raise FileExistsError(
            f"{str(target)!r} is not empty and holds no {checkpoint.MODEL_INDEX_FILE}; refusing to replace it"
        )


def _write_components(
    root: Path, *, seed: int, width: int, height: int, overrides: dict[str, Any], condition_frames: int | None = None
) -> None:
    # 1. Transformer: original (Wan) tensor names, sharded with an index, like the published folder
    transformer = build_tiny_transformer(seed=seed, **overrides)
    loading.save_transformer(
        transformer, root / "transformer", layout=loading.ORIGINAL, max_shard_bytes=TINY_MAX_SHARD_BYTES
    )

    # 2. VAE: the real library class with tiny sizes
    build_tiny_vae(
        root / "vae", base_dim=TINY_VAE_BASE_DIM, num_res_blocks=TINY_VAE_NUM_RES_BLOCKS, seed=seed + 1
    )
    # 3-5. Text encoder, tokenizer, scheduler, model_index.json and serving defaults
    write_shared_components(
        root,
        text_dim=transformer.config.text_dim,
        seed=seed + 2,
        width=width,
        height=height,
        served_model_name=TINY_SERVED_MODEL_NAME,
        comment="lingbot_ray serving defaults of this tiny random checkpoint",
        condition_frames=condition_frames,
    )


def build_tiny_main(argv: Sequence[str] | None = None) -> int:
    """``lingbot-ray build-tiny PATH [--seed N] [--force] [--size WxH]``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="lingbot-ray build-tiny",
        description="Write a tiny random LingBot World checkpoint (diffusers-style folder) for tests and demos.",
    )
    parser.add_argument("path", help="folder to create")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing tiny checkpoint at PATH")
    parser.add_argument(
        "--size",
        default=f"{DEFAULT_TINY_WIDTH}x{DEFAULT_TINY_HEIGHT}",
        help=f"default serving size WxH, multiples of 16 (default {DEFAULT_TINY_WIDTH}x{DEFAULT_TINY_HEIGHT})",
    )
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size={args.size!r}: expected WxH, e.g. 160x96")
    try:
        folder = build_tiny_checkpoint(args.path, seed=args.seed, width=width, height=height, force=args.force)
    except (FileExistsError, ValueError) as exc:
        parser.error(str(exc))
    # the folder is the command's output (scripts capture it), not a log line
    sys.stdout.write(f"{folder}\n")
    return 0


if __name__ == "__main__":
    sys.exit(build_tiny_main())
