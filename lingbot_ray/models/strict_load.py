"""Strict loading of a state dict into a model built on the meta device (post-processing models).

A partial load would silently leave random weights, so every missing, unexpected or mis-shaped
tensor is an error that names it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def assign_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, copy: bool) -> nn.Module:
    """Check ``state_dict`` against ``model`` and assign its tensors. ``copy``: the caller keeps the
    dict, so the model must not alias (and later mutate) its tensors."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} {list(v.shape)} vs model {list(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{label} {len(names)}: {', '.join(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if names
    ]
    if problems:
        raise ValueError(f"{what}: weights do not match the model: " + "; ".join(problems))
    if copy:
        state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model
