"""Finding (or, for the embedded default, building) the checkpoint folder a deployment loads."""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path

import torch

from .config import EMBEDDED_PREFIX, ModelConfig

logger = logging.getLogger("ray.serve")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def apply_threads(model: ModelConfig) -> None:
    if model.torch_threads is not None:
        torch.set_num_threads(model.torch_threads)


EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"


def embedded_checkpoints() -> list[str]:
    """Names of the checkpoints shipped inside the package (``model.path: embedded:NAME``)."""
    if not EMBEDDED_ROOT.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_ROOT.iterdir() if (p / "model_index.json").is_file())


def checkpoint_folder(path: str) -> Path:
    """``model.path`` as a folder: ``embedded:NAME`` is a checkpoint shipped in ``lingbot_ray/checkpoints``
    (found wherever the package is installed), anything else a filesystem path."""
    if not path.startswith(EMBEDDED_PREFIX):
        return Path(path).expanduser().resolve()
    name = path[len(EMBEDDED_PREFIX):]
    if name not in embedded_checkpoints():
        raise FileNotFoundError(f"model.path={path!r}: no embedded checkpoint {name!r}; shipped: {embedded_checkpoints()}")
    return EMBEDDED_ROOT / name


def ensure_checkpoint(model: ModelConfig) -> Path:
    """The checkpoint folder; with ``build_tiny_if_missing`` an absent folder is built first.

    Replicas start concurrently, so the build happens under a file lock and only once.
    """
    folder = checkpoint_folder(model.path)
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
