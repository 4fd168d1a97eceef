"""Real-ESRGAN super-resolution: RRDBNet (x4plus, x2plus) and SRVGGNetCompact (general-x4v3, animevideov3).

Architectures (Wang et al., "Real-ESRGAN", ICCVW 2021; BasicSR's ``RRDBNet_arch`` / ``SRVGG_arch``):

- ``RRDBNet``: ``conv_first`` → ``num_block`` residual-in-residual dense blocks (``body.N.rdb{1,2,3}``,
  each five 3×3 convs ``conv1..conv5`` with dense growth ``num_grow_ch``, residuals scaled by 0.2)
  → ``conv_body`` (+ long skip) → two nearest ×2 upsamplings each followed by ``conv_up{1,2}`` →
  ``conv_hr`` → ``conv_last``. The net always upsamples ×4 internally; the ×2 (×1) models first
  pixel-unshuffle the input by 2 (4), so ``conv_first`` takes 12 (48) channels.
- ``SRVGGNetCompact``: ``body`` = conv, PReLU, ``num_conv`` × (conv, PReLU), conv to
  ``3·upscale²`` channels; pixel shuffle; plus the nearest-upscaled input. Zeroing the last conv
  therefore makes the model exactly nearest-neighbour upscaling.

Weight files hold the state dict under ``params_ema`` (preferred, as in the reference inference code),
``params``, or bare. Loading is strict; the architecture, scale and widths are read from the keys.
Outputs are not bounded by the network, so :meth:`upscale` clamps to [0, 1].
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .strict_load import assign_strict


logger = logging.getLogger(__name__)

__all__ = [
    "RRDBNet",
    "SRVGGNetCompact",
    "SuperResolutionModel",
    "load_realesrgan",
    "realesrgan_state_dict_from_file",
]

WEIGHT_KEYS = ("params_ema", "params")
_RRDB_BLOCK = re.compile(r"^body\.(\d+)\.rdb1\.conv1\.weight$")
_VGG_CONV = re.compile(r"^body\.(\d+)\.weight$")


class SuperResolutionModel(nn.Module):
    """Shared inference entry point. Subclasses set ``native_scale`` and ``input_multiple`` (the size
    the input H, W must divide by) and implement ``forward`` on [B, 3, H, W] in [0, 1]."""

    native_scale: int
    input_multiple: int = 1

    @torch.inference_mode()
    def upscale(
        self,
        frames: torch.Tensor,
        scale: float | None = None,
        tile: int | None = None,
        tile_pad: int = 10,
    ) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → [B, 3, round(H·scale), round(W·scale)] clamped to [0, 1].

        scale: output scale; None means the model's native one. Any other value is reached by
        resizing the model's output (bicubic, antialiased when shrinking).
        tile: process the input in ``tile``×``tile`` pieces, each with ``tile_pad`` pixels of context
        on every side, for frames whose activations do not fit in memory. Pieces are stitched with no
        seam: the result equals the untiled one whenever ``tile_pad`` covers the receptive field.
        """
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames.shape={tuple(frames.shape)}: expected [B, 3, H, W]")
        if scale is not None and not (float(scale) > 0):
            raise ValueError(f"scale={scale!r}: must be > 0")
        if tile is not None and tile < 1:
            raise ValueError(f"tile={tile!r}: must be a positive int or None")
        if tile_pad < 0:
            raise ValueError(f"tile_pad={tile_pad!r}: must be >= 0")
        _, _, h, w = frames.shape
        # Pixel-unshuffling models need H, W divisible by their factor; edge-pad (valid for any size), crop after.
        m = self.input_multiple
        ph, pw = -h % m, -w % m
        x = F.pad(frames, (0, pw, 0, ph), mode="replicate") if (ph or pw) else frames
        out = self._run(x, tile, tile_pad)
        s = self.native_scale
        out = out[:, :, : h * s, : w * s]
        if scale is not None and float(scale) != s:
            size = (round(h * float(scale)), round(w * float(scale)))
            out = F.interpolate(out, size=size, mode="bicubic", align_corners=False, antialias=float(scale) < s)
        return out.clamp_(0.0, 1.0)

    def _run(self, x: torch.Tensor, tile: int | None, tile_pad: int) -> torch.Tensor:
        b, c, h, w = x.shape
        if tile is None or (tile >= h and tile >= w):
            return self(x)
        m, s = self.input_multiple, self.native_scale
        # Tile origins and context must stay on the unshuffle grid, or pieces would see shifted pixels.
        tile = math.ceil(tile / m) * m
        pad = math.ceil(tile_pad / m) * m
        out = x.new_empty(b, c, h * s, w * s)
        for y0 in range(0, h, tile):
            y1 = min(y0 + tile, h)
            cy0, cy1 = max(y0 - pad, 0), min(y1 + pad, h)
            for x0 in range(0, w, tile):
                x1 = min(x0 + tile, w)
                cx0, cx1 = max(x0 - pad, 0), min(x1 + pad, w)
                piece = self(x[:, :, cy0:cy1, cx0:cx1])
                oy, ox = (y0 - cy0) * s, (x0 - cx0) * s
                out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = piece[
                    :, :, oy : oy + (y1 - y0) * s, ox : ox + (x1 - x0) * s
                ]
        return out


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convs; ``x + 0.2·conv5(...)``."""

    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x + 0.2 * x5


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(SuperResolutionModel):
    """ESRGAN generator. scale 4 (x4plus), 2 (x2plus) or 1; published: 64 features, 23 blocks, growth 32."""

    def __init__(self, scale: int = 4, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32,
                 num_in_ch: int = 3, num_out_ch: int = 3):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"scale={scale!r}: RRDBNet supports 1, 2 or 4")
        self.native_scale = scale
        self.input_multiple = 4 // scale
        self.conv_first = nn.Conv2d(num_in_ch * self.input_multiple**2, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_multiple > 1:
            # Trade resolution for channels so the fixed ×4 trunk yields ×2 (×1) overall.
            x = F.pixel_unshuffle(x, self.input_multiple)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(SuperResolutionModel):
    """Compact VGG-style SR net with PReLU. general-x4v3: num_conv 32; animevideov3: num_conv 16."""

    def __init__(self, upscale: int = 4, num_feat: int = 64, num_conv: int = 16,
                 num_in_ch: int = 3, num_out_ch: int = 3):
        super().__init__()
        if upscale < 1:
            raise ValueError(f"upscale={upscale!r}: must be >= 1")
        self.native_scale = upscale
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), nn.PReLU(num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        # The net learns a residual over nearest upscaling.
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.native_scale, mode="nearest")


def realesrgan_state_dict_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` weight file (tensors only; no arbitrary pickle code)."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"path={os.fspath(path)!r}: holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def _unwrap(obj: Mapping) -> dict[str, torch.Tensor]:
    for key in WEIGHT_KEYS:
        if key in obj:
            return dict(obj[key])
    return dict(obj)


def _build_from_keys(sd: Mapping[str, torch.Tensor]) -> SuperResolutionModel:
    if "conv_first.weight" in sd:
        in_ch = int(sd["conv_first.weight"].shape[1])
        per_scale = {3: 4, 12: 2, 48: 1}  # 3 input channels, pixel-unshuffled by 4/scale
        if in_ch not in per_scale:
            raise ValueError(f"conv_first.weight.shape={tuple(sd['conv_first.weight'].shape)}: "
                             f"input channels {in_ch} match no scale (expected 3, 12 or 48)")
        blocks = [int(mt.group(1)) for k in sd if (mt := _RRDB_BLOCK.match(k))]
        if not blocks or "body.0.rdb1.conv1.weight" not in sd:
            raise ValueError("RRDBNet weights: missing body.0.rdb1.conv1.weight")
        return RRDBNet(
            scale=per_scale[in_ch],
            num_feat=int(sd["conv_first.weight"].shape[0]),
            num_block=max(blocks) + 1,
            num_grow_ch=int(sd["body.0.rdb1.conv1.weight"].shape[0]),
            num_out_ch=int(sd["conv_last.weight"].shape[0]) if "conv_last.weight" in sd else 3,
        )
    convs = sorted(int(mt.group(1)) for k, v in sd.items() if (mt := _VGG_CONV.match(k)) and v.ndim == 4)
    if convs and convs[0] == 0:
        last = sd[f"body.{convs[-1]}.weight"]
        upscale = math.isqrt(int(last.shape[0]) // 3)
        if upscale**2 * 3 != last.shape[0]:
            raise ValueError(f"body.{convs[-1]}.weight.shape={tuple(last.shape)}: output channels "
                             f"are not 3·upscale²")
        return SRVGGNetCompact(upscale=upscale, num_feat=int(sd["body.0.weight"].shape[0]), num_conv=len(convs) - 2)
    raise ValueError(f"keys={sorted(sd)[:6]}...: neither RRDBNet (conv_first.*) nor SRVGGNetCompact (body.0.weight)")


def load_realesrgan(
    source: str | os.PathLike | Mapping,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SuperResolutionModel:
    """Model in eval mode from a ``.pth`` path or a (wrapped) state dict; architecture from the keys.

    Raises ValueError naming every missing or unexpected key, or shape mismatch.
    """
    raw = source if isinstance(source, Mapping) else realesrgan_state_dict_from_file(source)
    sd = _unwrap(raw)
    # Built on the meta device and then given the loaded tensors: no time spent on random init.
    with torch.device("meta"):
        model = _build_from_keys(sd)
    assign_strict(model, sd, what=type(model).__name__, copy=isinstance(source, Mapping))
    logger.info("Loaded %s x%d (%d tensors)", type(model).__name__, model.native_scale, len(sd))
    return model.to(device=device, dtype=dtype).eval()
