"""FP8 linear layers for the DiT: weights stored as float8 (e4m3) with a scale, activations scaled
and cast on the fly, one ``torch._scaled_mm`` per matmul (docs/MODEL.md, "FP8 DiT").

What is converted: the big matmuls of every transformer block — self-attention q/k/v/out,
cross-attention q/k/v/out and the FFN's two projections — about three quarters of a block's
matmul FLOPs. What is kept in the model's dtype: the patch and camera embeddings, the time and text
embedders, the per-block camera modulation layers (their output scales the residual stream), the
modulation tables, the norms and the output projection. Small errors in those reach every token
unattenuated; in the converted matmuls they average out over the reduction dimension.

Scaling (``dit.fp8``):

* ``rowwise``: one scale per weight row (output channel) and one per activation row (token): the
  finer, more accurate choice, and what Hopper's FP8 GEMMs are fastest at in recent PyTorch;
* ``tensorwise``: one scale for the whole weight and one for the whole activation.

Scales are ``amax / 448`` (448: e4m3's largest finite value), so every value fits. The matmul is
``torch._scaled_mm``, the kernel torchao's float8 inference path dispatches to on CUDA; calling it
directly keeps one code path on every device (PyTorch's CPU build implements it too, which is how
the tests run this module) and adds no dependency. On CUDA it needs compute capability 8.9 or newer
(Ada, Hopper, Blackwell); :func:`check_fp8_device` says so by name before anything is converted.
"""

from __future__ import annotations

import torch
from torch import nn

SCALINGS = ("rowwise", "tensorwise")  # dit.fp8's values other than "none" (lingbot_ray/engine/fastpath.py)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0

# The block matmuls that are converted, by their path inside a LingBotWorldTransformerBlock.
CONVERTED_IN_BLOCK = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)  # fmt: skip


def _scale(amax: torch.Tensor) -> torch.Tensor:
    # an all-zero row gets scale 1 (anything positive works: its values quantise to 0)
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def quantize(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` → (float8 ``[M, K]``, fp32 scale ``[M, 1]`` rowwise or ``[]`` tensorwise) with
    ``x ≈ q.float() * scale``."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True) if rowwise else x.abs().amax()
    scale = _scale(amax)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


class Float8Linear(nn.Module):
    """A frozen ``nn.Linear`` with an e4m3 weight and dynamic e4m3 activations.

    ``weight`` [out, in] float8 with ``weight_scale`` ([out, 1] rowwise, [] tensorwise); the bias
    stays in the original dtype, as does the output (``out_dtype``)."""

    def __init__(self, linear: nn.Linear, scaling: str):
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r}: must be one of {list(SCALINGS)}")
        self.scaling = scaling
        self.rowwise = scaling == "rowwise"
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = linear.weight.dtype
        weight, scale = quantize(linear.weight.detach(), rowwise=self.rowwise)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q, x_scale = quantize(x.reshape(-1, self.in_features), self.rowwise)
        # rowwise: per-token scale [M, 1] times per-channel scale [1, N]; tensorwise: two scalars
        w_scale = self.weight_scale.t() if self.rowwise else self.weight_scale
        out = torch._scaled_mm(q, self.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scaling={self.scaling}"


def check_fp8_device(device: torch.device | str, mode: str) -> None:
    """Raise a ValueError naming ``dit.fp8`` when ``device`` cannot run FP8 matmuls."""
    device = torch.device(device)
    if device.type != "cuda":
        return  # PyTorch's CPU build runs _scaled_mm (slowly: it is for tests and small models)
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(
            f"dit.fp8={mode!r}: needs a GPU with FP8 matmuls (compute capability 8.9 or newer: Ada, Hopper, "
            f"Blackwell); {device} is {name}, {major}.{minor}. Use dit.fp8: none"
        )


def convert_to_fp8(model: nn.Module, mode: str) -> int:
    """Swap the converted matmuls (:data:`CONVERTED_IN_BLOCK`) of every block of ``model`` (a
    ``CausalLingBotWorldTransformer3DModel``) for :class:`Float8Linear`, in place; returns how many.
    ``none`` converts nothing. Inference only: the model cannot be trained afterwards."""
    if mode == "none":
        return 0
    if mode not in SCALINGS:
        raise ValueError(f"dit.fp8={mode!r}: must be none or one of {list(SCALINGS)}")
    count = 0
    for block in model.blocks:
        for path in CONVERTED_IN_BLOCK:
            parent_path, _, name = path.rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = getattr(parent, name) if not name.isdigit() else parent[int(name)]
            if isinstance(linear, Float8Linear):
                continue
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"dit.fp8={mode!r}: {path} is a {type(linear).__name__}, not an nn.Linear")
            converted = Float8Linear(linear, mode)
            if name.isdigit():
                parent[int(name)] = converted
            else:
                setattr(parent, name, converted)
            count += 1
    return count


__all__ = ["CONVERTED_IN_BLOCK", "SCALINGS", "Float8Linear", "check_fp8_device", "convert_to_fp8", "quantize"]
