"""Opt-in speed settings of the DiT stage, applied by explicit calls after loading (never at import).

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
