"""A faster forward for the RMS norms of diffusers' Wan VAE, same maths and same weights.

diffusers' ``WanRMS_norm`` normalises over the channel axis of ``[B, C, T, H, W]`` with
``F.normalize(x, dim=1)``. On CPU that reduction over a strided axis is slow: measured on 2 cores,
``[4, 8, 4, 96, 160]`` takes 48 ms with ``F.normalize`` and 0.9 ms as ``x · rsqrt(Σ x²)``, and the
norms were 80 % of the whole VAE's encode time (``torch.profiler``: ``aten::linalg_vector_norm``).
The VAE's convolutions have few channels at full resolution, so nothing else comes close.

:func:`use_fast_norms` swaps the class of every ``WanRMS_norm`` inside a module for
:class:`ChannelRMSNorm`, a subclass with only ``forward`` replaced: parameters, state-dict keys,
``save_pretrained`` and the config are unchanged, and outputs equal the original's to float rounding
(``F.normalize`` is ``x / max(‖x‖, 1e-12)``; this is ``x · rsqrt(max(‖x‖², 1e-24))``).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

_EPS = 1e-12  # F.normalize's default


class ChannelRMSNorm(WanRMS_norm):
    """``WanRMS_norm`` with the normalisation written as a sum of squares and an ``rsqrt``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.channel_first else -1
        low_precision = x.dtype in (torch.float16, torch.bfloat16) or "float8_" in str(x.dtype) or "float4_" in str(x.dtype)
        work = x.float() if low_precision else x  # as diffusers: fp32 maths for half and smaller types
        normalized = work * work.square().sum(dim, keepdim=True).clamp_min(_EPS * _EPS).rsqrt()
        return normalized.to(x.dtype) * self.scale * self.gamma + self.bias


def use_fast_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Give every ``WanRMS_norm`` in ``module`` the :class:`ChannelRMSNorm` forward (in place); returns ``module``."""
    for child in module.modules():
        if type(child) is WanRMS_norm:
            child.__class__ = ChannelRMSNorm
    return module
