"""A procedural 3-D world and a dataset of camera-controlled clips rendered in it (numpy only).

``scene`` builds seeded worlds, ``render`` ray-casts them from the poses that
:class:`lingbot_ray.control.camera.CameraTrajectory` integrates from keyboard actions, and ``dataset``
writes and reads sharded clips for training a small world model. Submodules load on first use, so
``python -m lingbot_ray.world.render`` and ``python -m lingbot_ray.world.dataset`` run cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .dataset import ClipDataset, generate_dataset, make_clip, random_actions
    from .render import pixel_poses, render, render_buffers, world_intrinsics
    from .scene import World

_LAZY = {
    "World": "scene",
    "pixel_poses": "render",
    "render": "render",
    "render_buffers": "render",
    "world_intrinsics": "render",
    "ClipDataset": "dataset",
    "generate_dataset": "dataset",
    "make_clip": "dataset",
    "random_actions": "dataset",
}

__all__ = [
    "ClipDataset",
    "World",
    "generate_dataset",
    "make_clip",
    "pixel_poses",
    "random_actions",
    "render",
    "render_buffers",
    "world_intrinsics",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
