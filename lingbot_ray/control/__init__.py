"""Per-session controls: the condition queue, the camera trajectory and its Plücker map.

``conditions`` (events → per-chunk conditions) imports neither torch nor numpy, so the ingress can
import this package cheaply; ``camera`` (numpy) and ``plucker`` (torch) load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .conditions import ACTION_TOKENS, ChunkConditions, ConditionQueue, StateTransition, clean_actions

if TYPE_CHECKING:
    from .camera import CameraTrajectory, Intrinsics
    from .plucker import plucker_map

_LAZY = {"CameraTrajectory": "camera", "Intrinsics": "camera", "plucker_map": "plucker"}

__all__ = [
    "ACTION_TOKENS",
    "CameraTrajectory",
    "ChunkConditions",
    "ConditionQueue",
    "Intrinsics",
    "StateTransition",
    "clean_actions",
    "plucker_map",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
