"""Strict loading: the one check of tensor names and shapes against a model, and strict assignment.

A partial load would silently leave random (or meta) weights, so every missing, unexpected or
mis-shaped tensor is an error that names it. :func:`check_names_and_shapes` is the check;
:func:`assign_strict` applies it to an in-memory state dict (post-processing models), and
`lingbot_ray.models.loading` applies it to safetensors headers before reading any data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn


def check_names_and_shapes(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    *,
    what: str,
    show: Callable[[str], str] = str,
) -> None:
    """Raise a ValueError naming every missing, unexpected and mis-shaped tensor of ``found``.

    ``expected`` and ``found`` map names to shapes; ``what`` opens the message and ``show`` renders a
    name in it (e.g. with its on-disk spelling).
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(found) if tuple(expected[name]) != tuple(found[name]))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not match the model:"]
    if missing:
        lines.append(f"missing {len(missing)}: " + ", ".join(map(show, missing)))
    if unexpected:
        lines.append(f"unexpected {len(unexpected)}: " + ", ".join(map(show, unexpected)))
    if mismatched:
        lines.append(
            f"shape mismatch {len(mismatched)}: "
            + ", ".join(f"{show(n)} checkpoint {list(found[n])} vs model {list(expected[n])}" for n in mismatched)
        )
    raise ValueError("\n".join(lines))


def assign_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str, copy: bool) -> nn.Module:
    """Check ``state_dict`` against ``model`` and assign its tensors. ``copy``: the caller keeps the
    dict, so the model must not alias (and later mutate) its tensors."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_names_and_shapes(expected, {name: tuple(t.shape) for name, t in state_dict.items()}, what=what)
    if copy:
        state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model
