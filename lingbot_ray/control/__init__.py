"""Per-session controls: the condition queue and the camera trajectory (torch-free; the Plücker
map the DiT takes is computed in :mod:`lingbot_ray.engine.plucker`).

``conditions`` (events → per-chunk conditions) imports neither torch nor numpy, so the ingress can
import this package cheaply; ``camera`` (numpy) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..protocol import StateTransition
from .conditions import ChunkConditions, ConditionQueue, clean_actions

if TYPE_CHECKING:
    from .camera import CameraTrajectory, Intrinsics

_LAZY = {"CameraTrajectory": "camera", "Intrinsics": "camera"}

__all__ = [
    "CameraTrajectory",
    "ChunkConditions",
    "ConditionQueue",
    "Intrinsics",
    "StateTransition",
    "clean_actions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
