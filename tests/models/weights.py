"""Weight files in the published layouts of the post-processing models, written from a model built
in the test (random weights): what the loaders in lingbot_ray.models.rife / realesrgan must read."""

from __future__ import annotations

import os

import torch

from lingbot_ray.models.realesrgan import WEIGHT_KEYS, SuperResolutionModel
from lingbot_ray.models.rife import DATA_PARALLEL_PREFIX, IFNet


def _cpu_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def save_rife(model: IFNet, path: str | os.PathLike, *, data_parallel_prefix: bool = True) -> None:
    """``flownet.pkl`` as Practical-RIFE ships it: a pickled state dict, names prefixed ``module.``
    (``data_parallel_prefix=False``: bare names, as some re-exports have them)."""
    torch.save(_cpu_tensors(model, DATA_PARALLEL_PREFIX if data_parallel_prefix else ""), os.fspath(path))


def save_realesrgan(model: SuperResolutionModel, path: str | os.PathLike, *, key: str | None = "params_ema") -> None:
    """A Real-ESRGAN ``.pth``: the state dict under ``key`` (``params_ema`` or ``params``), or bare
    when ``key`` is None."""
    if key is not None and key not in WEIGHT_KEYS:
        raise ValueError(f"key={key!r}: expected one of {WEIGHT_KEYS} or None")
    tensors = _cpu_tensors(model)
    torch.save(tensors if key is None else {key: tensors}, os.fspath(path))
