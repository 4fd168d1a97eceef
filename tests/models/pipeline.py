"""Loading several components of a checkpoint at once (tests only: each stage loads its own)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lingbot_ray.checkpoint import ALL_MODEL_COMPONENTS, ModelIndex, ServingDefaults, read_model_index, read_serving_defaults
from lingbot_ray.models.loading import default_dtype, load_dit, load_prompt_encoder, load_scheduler_config, load_vae


@dataclass
class LingBotWorldPipeline:
    """Loaded components of one checkpoint; a component not asked for is ``None``."""

    index: ModelIndex
    defaults: ServingDefaults
    scheduler_config: dict[str, Any]
    transformer: Any = None
    vae: Any = None
    prompt_encoder: Any = None


def load_pipeline(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    text_dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    components: tuple[str, ...] = ALL_MODEL_COMPONENTS,
) -> LingBotWorldPipeline:
    """Load the named model components (``transformer``, ``vae``, ``text_encoder``).

    ``dtype`` (transformer) and ``text_dtype`` default to bf16 on CUDA and fp32 elsewhere.
    """
    unknown = sorted(set(components) - set(ALL_MODEL_COMPONENTS))
    if unknown:
        raise ValueError(f"components={components!r}: unknown {unknown}; known {ALL_MODEL_COMPONENTS}")
    index = read_model_index(folder)
    index.check_folders()
    dtype = dtype or default_dtype(device)
    text_dtype = text_dtype or default_dtype(device)
    return LingBotWorldPipeline(
        index=index,
        defaults=read_serving_defaults(folder),
        scheduler_config=load_scheduler_config(folder),
        transformer=load_dit(folder, device=device, dtype=dtype) if "transformer" in components else None,
        vae=load_vae(folder, device=device, dtype=vae_dtype) if "vae" in components else None,
        prompt_encoder=(
            load_prompt_encoder(folder, device=device, dtype=text_dtype)
            if "text_encoder" in components
            else None
        ),
    )


