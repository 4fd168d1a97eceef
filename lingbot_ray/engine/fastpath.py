"""Opt-in speed settings, applied by explicit calls after loading (never at import): the DiT's
attention kernel, FP8 matmuls, and ``torch.compile`` of its transformer blocks with a warm-up
session (apply them in that order: compile last, so it traces the converted layers); and the VAE
stage's decoder (:data:`DECODERS`). The names of every setting live here, importable without torch,
so a serve config is checked without loading the model stack.

``use_attention_backend`` picks the attention kernel through diffusers' dispatcher
(``ModelMixin.set_attention_backend``): ``native`` (torch SDPA, the default), ``flash``, ``_flash_3``,
``sage``, ``xformers``, … Every self- and cross-attention processor of the model reads the choice.
diffusers checks that the kernel's package is installed; a missing one is a clear error naming the
setting, raised when the stage starts, before any session.
"""

from __future__ import annotations

from typing import Any


def use_attention_backend(stage: Any, name: str) -> None:
    """Run ``stage``'s DiT (a :class:`~lingbot_ray.engine.stages.DiTStage`) on the attention kernel ``name``."""
    try:
        stage.model.set_attention_backend(name)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise ValueError(f"model.attention_backend={name!r}: {exc}") from None


# dit.fp8: the scaling of the FP8 block matmuls ("none": the model's dtype; lingbot_ray/models/fp8.py)
FP8_MODES = ("none", "rowwise", "tensorwise")
# vae.decoder: what turns a session's latents into frames (docs/MODEL.md, "Tiny decoder")
DECODERS = ("wan", "tiny")


def use_fp8(stage: Any, mode: str) -> int:
    """Convert ``stage``'s DiT block matmuls to FP8 (``dit.fp8``: none | rowwise | tensorwise;
    lingbot_ray/models/fp8.py); a device without FP8 matmuls is an error naming the setting.
    Returns the layers converted."""
    from lingbot_ray.models.fp8 import check_fp8_device, convert_to_fp8

    if mode not in FP8_MODES:
        raise ValueError(f"dit.fp8={mode!r}: must be one of {list(FP8_MODES)}")
    if mode == "none":
        return 0
    check_fp8_device(stage.device, mode)
    return convert_to_fp8(stage.model, mode)


# dit.compile: what torch.compile does with the DiT's transformer blocks ("none": eager)
COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")


def compile_dit(stage: Any, mode: str) -> None:
    """Compile every transformer block of ``stage``'s DiT with ``torch.compile`` (docs/MODEL.md,
    "Compiled DiT"). Each block is handed its layer's KV view and the block's plan, so one graph
    serves every layer; the plan's offsets grow until the window is full and then stay, so a
    session's steady state reuses one graph per frame size, eviction included. ``reduce-overhead``
    adds CUDA graphs (GPU only)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"dit.compile={mode!r}: must be one of {list(COMPILE_MODES)}")
    if mode == "none":
        return
    for block in stage.model.blocks:
        block.compile(mode=None if mode == "default" else mode)


def warm_up(
    stage: Any,
    width: int,
    height: int,
    *,
    window_frames: int | None = None,
    sink_size: int | None = None,
    num_chunks: int | None = None,
    text_tokens: int = 512,
) -> int:
    """Run a throwaway session of ``num_chunks`` chunks at ``width`` x ``height`` through ``stage``
    (a :class:`~lingbot_ray.engine.stages.DiTStage`): compiles happen here, before the first client.
    Enough chunks by default to fill the KV window and evict from it. ``text_tokens``: the prompt
    encoder's output length (its ``max_length``). Returns the chunks run."""
    import numpy as np
    import torch

    from lingbot_ray.control.conditions import ChunkConditions
    from lingbot_ray.models.vae_streaming import ConditionLatents

    from .session import SessionSpec

    geometry = stage.geometry
    spec = SessionSpec(
        prompt="warm-up", image=np.zeros((height, width, 3), np.uint8), width=width, height=height, seed=0,
        window_frames=window_frames, sink_size=sink_size,
    )
    resolved = spec.resolve(geometry)
    latents = torch.zeros(
        1, geometry.latent_channels, 1, height // geometry.vae_scale_spatial, width // geometry.vae_scale_spatial
    )
    condition = ConditionLatents(latents=latents, mask_channels=geometry.vae_scale_temporal)
    prompt = torch.zeros(1, text_tokens, stage.model.config.text_dim)
    per_chunk = resolved.latent_frames_per_chunk
    if num_chunks is None:
        num_chunks = -(-resolved.window_frames // per_chunk) + 2
    state = stage.new_session(resolved, condition, prompt)
    try:
        for _ in range(num_chunks):
            stage.step(state, ChunkConditions(prompt=None, camera_actions=((),) * per_chunk, event_id=None))
    finally:
        state.release()
    return num_chunks
