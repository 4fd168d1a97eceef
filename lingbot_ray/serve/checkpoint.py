"""Finding (or, for the embedded default, building) the checkpoint folder a deployment loads."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import torch

from .config import ModelConfig

logger = logging.getLogger("ray.serve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def apply_threads(model: ModelConfig) -> None:
    if model.torch_threads is not None:
        torch.set_num_threads(model.torch_threads)


def ensure_checkpoint(model: ModelConfig) -> Path:
    """The checkpoint folder; with ``build_tiny_if_missing`` an absent folder is built first.

    Replicas start concurrently, so the build happens under a file lock and only once.
    """
    folder = Path(model.path).expanduser().resolve()
    if (folder / "model_index.json").is_file():
        return folder
    if not model.build_tiny_if_missing:
        raise FileNotFoundError(
            f"model.path={model.path!r}: no model_index.json at {folder} "
            "(set model.build_tiny_if_missing: true for the embedded tiny model)"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "model_index.json").is_file():
            from lingbot_ray.models.tiny import build_tiny_checkpoint

            logger.info("model.path %s is absent: building the embedded tiny checkpoint there (first start)", folder)
            build_tiny_checkpoint(folder, force=folder.exists())
    return folder
