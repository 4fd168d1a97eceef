"""Tiny checkpoints in LingBot World 2.0's published folder layouts (docs/MODEL.md, "LingBot World
2.0"), written from models built here with seeded random weights: what the detection and the loaders
must read. Only the sizes are tiny; the files are where and as the releases have them.

- :func:`build_v2_1p3b`: the 1.3B causal-fast release: ``model-000NN-of-000MM.safetensors`` +
  ``model.safetensors.index.json`` at the root, original Wan names, **no config.json**, nothing else.
  Its tiny DiT keeps the 1.3B's unpublished head count (12) and its streaming geometry (blocks of 4,
  sink 6, window 18), so the config derived from its shapes is the one it was built with.
- :func:`build_v2_14b_native`: the authors' 14B folder: the DiT in ``transformers/`` (the authors'
  WanModelFast ``config.json`` + ``diffusion_pytorch_model`` shards), beside the Wan-format text
  encoder and VAE files, which lingbot_ray does not read (empty stand-ins here).
- :func:`build_v2_14b_diffusers`: ``robbyant/lingbot-world-v2-14b-causal-fast-diffusers``, file for
  file v1's layout, told apart only by ``lingbot_ray.json``'s ``model_version``.

The DiT-only layouts name a ``shared`` diffusers folder (a tiny v1 checkpoint: UMT5 and the Wan 2.1
VAE are v1's) in ``lingbot_ray.json``'s ``shared_components``, by a relative path as a user would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lingbot_ray import checkpoint
from lingbot_ray.models import loading
from lingbot_ray.models.tiny import build_tiny_checkpoint, build_tiny_transformer
from lingbot_ray.models.transformer_lingbot import CAMERA_CHANNELS, CausalLingBotWorldTransformer3DModel

# The 1.3B's structure at a tiny width: 12 heads (the assumed count) of 8 channels, and the
# streaming geometry a config-less folder gets (checkpoint.V2_1P3B_STREAMING)
TINY_V2_1P3B_OVERRIDES: dict[str, Any] = {
    "num_attention_heads": checkpoint.V2_1P3B_ASSUMED_HEADS,
    "attention_head_dim": 8,
    **checkpoint.V2_1P3B_STREAMING,
}
# A few shards per tiny DiT, as the releases have several (1.3B: 6, 14B: 8)
SHARD_BYTES = 512 * 1024
SERVED_NAME = "lingbot-world-v2-tiny-random"
# The Wan-format files beside the authors' native DiT (wan/configs: t5_checkpoint, vae_checkpoint,
# t5_tokenizer); lingbot_ray takes these components from shared_components instead
NATIVE_SIDE_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth", "google/umt5-xxl/tokenizer.json")


def write_settings(folder: Path, **settings: Any) -> None:
    """Write ``lingbot_ray.json`` (replacing one there)."""
    (folder / checkpoint.SERVING_DEFAULTS_FILE).write_text(json.dumps({"_comment": "test", **settings}, indent=2) + "\n")


def _shared_setting(folder: Path, shared: Path | None) -> dict[str, str]:
    return {} if shared is None else {"shared_components": os.path.relpath(shared, folder)}


def build_shared(path: Path, *, seed: int = 0, width: int = 64, height: int = 48) -> Path:
    """A tiny diffusers checkpoint whose text encoder, tokenizer, VAE and scheduler the DiT-only ones use."""
    return build_tiny_checkpoint(path, seed=seed, width=width, height=height)


def build_v2_1p3b(
    path: Path,
    *,
    seed: int = 0,
    shared: Path | None = None,
    naming: str = loading.ORIGINAL,
    **settings: Any,
) -> CausalLingBotWorldTransformer3DModel:
    """The 1.3B release's layout at ``path``; returns the DiT written there. ``settings`` (and
    ``shared_components`` when ``shared`` is given) go to ``lingbot_ray.json``, which the release
    does not have: without them none is written."""
    model = build_tiny_transformer(seed=seed, **TINY_V2_1P3B_OVERRIDES)
    path.mkdir(parents=True, exist_ok=True)
    loading.save_transformer(
        model, path, layout=naming, max_shard_bytes=SHARD_BYTES, weights_prefix=loading.PLAIN_WEIGHTS_PREFIX, config_format=None
    )
    (path / "README.md").write_text("tiny stand-in of robbyant/lingbot-world-v2-1.3b-causal-fast\n")
    settings = {**_shared_setting(path, shared), **settings}
    if settings:
        write_settings(path, **settings)
    return model


def build_v2_14b_native(
    path: Path, *, seed: int = 0, shared: Path | None = None, **settings: Any
) -> CausalLingBotWorldTransformer3DModel:
    """The authors' v2 14B folder at ``path``; returns the DiT in its ``transformers/``."""
    model = build_tiny_transformer(seed=seed)
    loading.save_transformer(model, path / checkpoint.NATIVE_DIT_FOLDER, max_shard_bytes=SHARD_BYTES // 4, config_format="native")
    for name in NATIVE_SIDE_FILES:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"")
    settings = {**_shared_setting(path, shared), **settings}
    if settings:
        write_settings(path, **settings)
    return model


def build_v2_14b_diffusers(
    path: Path, *, seed: int = 0, naming: str = loading.ORIGINAL, width: int = 64, height: int = 48, **settings: Any
) -> CausalLingBotWorldTransformer3DModel:
    """``lingbot-world-v2-14b-causal-fast-diffusers`` at ``path`` (v1's layout), with
    ``model_version: v2-14b``; returns its DiT."""
    build_tiny_checkpoint(path, seed=seed, width=width, height=height)
    model = loading.load_transformer(path / "transformer", dtype=torch.float32)
    if naming != loading.ORIGINAL:
        loading.save_transformer(model, path / "transformer", layout=naming, max_shard_bytes=SHARD_BYTES)
    write_settings(
        path, **{"model_version": checkpoint.V2_14B, "width": width, "height": height, "served_model_name": SERVED_NAME, **settings}
    )
    return model


def model_inputs(model: CausalLingBotWorldTransformer3DModel, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Full-sequence inputs of one block on a 4x4 latent grid: latents, timestep, text, camera."""
    frames = model.config.num_frames_per_block
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, model.config.in_channels, frames, 4, 4, generator=gen),
        torch.tensor([700.0]),
        torch.randn(1, 8, model.config.text_dim, generator=gen),
        torch.randn(1, CAMERA_CHANNELS, frames, 4, 4, generator=gen),
    )


def flow(model: CausalLingBotWorldTransformer3DModel, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).sample
