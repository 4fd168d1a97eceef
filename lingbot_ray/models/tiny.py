"""A tiny, randomly initialised LingBot World checkpoint in the published folder layout.

Tests, the benchmark and CPU demos load it through exactly the code path of the real checkpoint
(``model_index.json`` → :mod:`lingbot_ray.models.pipeline` → each component's loader): the real
classes, the original Wan tensor names on disk, sharded safetensors with an index, a UniPC scheduler
config, plus ``lingbot_ray.json`` with the serving defaults of the tiny model (a small frame size).
Only the sizes are tiny; every structural hyper-parameter that the engine derives shapes from
(36 input channels, 16 latent channels, patch (1, 2, 2), blocks of 3 latent frames, 8x/4x VAE) is
the real one. Nothing is downloaded; the weights are a pure function of ``seed``.

Command line: ``lingbot-ray build-tiny PATH [--seed N] [--force]`` (see :func:`build_tiny_main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import UniPCMultistepScheduler

from . import loading, pipeline
from .tiny_components import build_tiny_text_encoder, build_tiny_tokenizer, build_tiny_vae
from .transformer_lingbot import CausalLingBotWorldTransformer3DModel

logger = logging.getLogger(__name__)

# Text width shared by the tiny UMT5 encoder (d_model) and the transformer (text_dim).
TINY_TEXT_DIM = 32

# Small enough that one 3-latent-frame block at the default size runs in a fraction of a second on
# one CPU core; the real values are 40 heads x 128, 40 layers, ffn 13824, freq 256, text 4096.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
    "local_attn_size": -1,
    "sink_size": 3,
    "num_frames_per_block": 3,
    "sliding_window_num_frames": 9,
}

# The published scheduler is a flow-matching UniPC config; the DMD sampler reads only
# num_train_timesteps from it, the rest documents what the checkpoint ships.
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 10.0,
    "solver_order": 2,
}

DEFAULT_TINY_WIDTH = 160
DEFAULT_TINY_HEIGHT = 96
# The VAE decodes at full frame size, so on CPU it dominates a tiny chunk; half the channels and
# one residual block per stage keep a 12-frame decode at the default size a few hundred ms.
TINY_VAE_BASE_DIM = 4
TINY_VAE_NUM_RES_BLOCKS = 1
TINY_SERVED_MODEL_NAME = "lingbot-world-tiny"
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
) -> Path:
    """Write a complete tiny checkpoint folder at ``path`` and return it.

    Args:
        path: Target folder. It must not exist or be empty, unless ``force`` (then a previous
            checkpoint there, recognised by its ``model_index.json``, is replaced).
        seed: Seed of every random weight (transformer, VAE, text encoder).
        width, height: Serving default size written to ``lingbot_ray.json`` (multiples of 16).
        transformer_overrides: Config keys to change on the tiny transformer (tests use this, e.g. a
            small ``rope_max_seq_len``).
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
        _write_components(staging, seed=seed, width=width, height=height, overrides=transformer_overrides or {})
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
    if not (target / pipeline.MODEL_INDEX_FILE).is_file():
        # never delete a folder we did not write
        raise FileExistsError(
            f"{str(target)!r} is not empty and holds no {pipeline.MODEL_INDEX_FILE}; refusing to replace it"
        )


def _write_components(root: Path, *, seed: int, width: int, height: int, overrides: dict[str, Any]) -> None:
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
    )


def write_shared_components(
    root: Path,
    *,
    text_dim: int,
    seed: int,
    width: int,
    height: int,
    served_model_name: str,
    comment: str,
    camera_focal: float | None = None,
) -> None:
    """Everything of a tiny-class checkpoint folder but the transformer and the VAE: the tiny text
    encoder and tokenizer, the scheduler config, ``model_index.json`` naming the real classes, and
    ``lingbot_ray.json`` (serving defaults; ``camera_focal`` only when given)."""
    build_tiny_text_encoder(root / "text_encoder", d_model=text_dim, seed=seed)
    build_tiny_tokenizer(root / "tokenizer")

    # Scheduler config (through diffusers, so it is a loadable UniPC config)
    UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")

    # model_index.json naming the real classes; unused components null as in the published one
    index: dict[str, Any] = {
        "_class_name": pipeline.PIPELINE_CLASS_NAME,
        "_diffusers_version": diffusers.__version__,
    }
    for name, (library, class_name) in pipeline.EXPECTED_COMPONENTS.items():
        index[name] = [library, class_name]
    for name in pipeline.NULL_COMPONENTS:
        index[name] = [None, None]
    _write_json(root / pipeline.MODEL_INDEX_FILE, index)

    # This project's serving defaults
    defaults = pipeline.ServingDefaults(width=width, height=height, served_model_name=served_model_name)
    settings = {
        "_comment": comment,
        "width": defaults.width,
        "height": defaults.height,
        "fps": defaults.fps,
        "num_frames": defaults.num_frames,
        "timestep_indices": list(defaults.timestep_indices),
        "shift": defaults.shift,
        "served_model_name": defaults.served_model_name,
    }
    if camera_focal is not None:
        settings["camera_focal"] = camera_focal
    _write_json(root / pipeline.SERVING_DEFAULTS_FILE, settings)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


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
