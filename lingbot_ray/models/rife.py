"""RIFE v4 frame interpolation (IFNet, Practical-RIFE 4.22.lite and the 5-block 4.25/4.26 layouts).

Architecture (Huang et al., "Real-Time Intermediate Flow Estimation", ECCV 2022; Practical-RIFE v4.2x):

- ``encode``: a 4-conv head turning each RGB frame into a 4-channel feature map at full resolution.
- ``blockN``: coarse-to-fine IFBlocks. Block i works at input / ``divisor_i`` / ``scale`` (divisors
  8,4,2,1 for 4.22.lite; 16,8,4,2,1 for 4.25/4.26). Each block downsamples by 4 more with two strided
  convs (``conv0``), runs 8 residual convs (``convblock``) and predicts 13 channels with a transposed
  conv + pixel shuffle (``lastconv``): 4 flow (t→0 and t→1), 1 blend mask logit, 8 features handed to
  the next block. Block 0 sees both frames, both feature maps and the timestep; later blocks see the
  frames and features backward-warped by the current flow, the timestep, the mask, the passed features
  and the flow itself, and predict a flow residual (the mask and features are replaced, not summed).
- Output: ``sigmoid(mask)·warp(img0) + (1 − sigmoid(mask))·warp(img1)``. There is no refinement net in
  these versions, so zeroing every ``lastconv`` makes the output exactly the mean of the two inputs.

Weights: ``flownet.pkl`` is a pickled state dict whose keys carry a ``module.`` prefix (DataParallel);
the prefix is stripped, keys of training-only modules are dropped, and every other missing or
unexpected key, or a shape mismatch, raises ``ValueError``. 4.25 and 4.26 share one tensor layout, so a
5-block file is reported as "4.25" unless the caller names the version.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .strict_load import assign_strict


logger = logging.getLogger(__name__)

__all__ = [
    "RIFE_CONFIGS",
    "IFBlock",
    "IFNet",
    "RifeConfig",
    "detect_rife_version",
    "load_rife",
    "rife_state_dict_from_file",
]

# Names of modules that only exist in training checkpoints (distillation teacher, time predictor).
# They never feed inference, so their presence must not fail an otherwise complete file.
TRAINING_ONLY_PREFIXES = ("teacher.", "block_tea.", "caltime.")
DATA_PARALLEL_PREFIX = "module."
SUPPORTED_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class RifeConfig:
    """Shape of one IFNet release. ``block_channels[i]`` is the width of ``block{i}``;
    ``divisors[i]`` the resolution divisor block i works at when ``scale`` = 1."""

    version: str
    block_channels: tuple[int, ...]
    divisors: tuple[int, ...]
    head_channels: int = 16
    feature_channels: int = 4  # encode output per frame
    passed_channels: int = 8  # features one block hands to the next
    residual_convs: int = 8

    def __post_init__(self) -> None:
        if len(self.block_channels) != len(self.divisors):
            raise ValueError(
                f"block_channels={self.block_channels} and divisors={self.divisors} must have the same length"
            )

    @property
    def num_blocks(self) -> int:
        return len(self.block_channels)

    @property
    def first_in_channels(self) -> int:
        # img0, img1, f0, f1, timestep
        return 3 + 3 + 2 * self.feature_channels + 1

    @property
    def later_in_channels(self) -> int:
        # warped img0/img1, warped f0/f1, timestep, mask, passed features, flow (4)
        return 3 + 3 + 2 * self.feature_channels + 1 + 1 + self.passed_channels + 4

    @property
    def out_channels(self) -> int:
        return 4 + 1 + self.passed_channels


RIFE_CONFIGS: dict[str, RifeConfig] = {
    "4.22.lite": RifeConfig("4.22.lite", block_channels=(192, 128, 64, 32), divisors=(8, 4, 2, 1)),
    "4.25": RifeConfig("4.25", block_channels=(192, 128, 96, 64, 32), divisors=(16, 8, 4, 2, 1)),
    "4.26": RifeConfig("4.26", block_channels=(192, 128, 96, 64, 32), divisors=(16, 8, 4, 2, 1)),
}


def _conv_lrelu(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    # Sequential(conv, act) rather than two attributes: the published keys are ``conv0.N.0.weight``.
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride, 1), nn.LeakyReLU(0.2, inplace=True))


class ResConv(nn.Module):
    """``lrelu(conv(x)·beta + x)`` with a learnt per-channel ``beta``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class Head(nn.Module):
    """Per-frame feature encoder (``encode.cnn0..cnn3``); output at the input resolution."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.cnn0 = nn.Conv2d(3, hidden, 3, 2, 1)
        self.cnn1 = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.cnn2 = nn.Conv2d(hidden, hidden, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(hidden, out, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


class IFBlock(nn.Module):
    """One coarse-to-fine flow block; returns (flow [B,4], mask logit [B,1], features [B,8]) at the
    resolution of its input."""

    def __init__(self, in_channels: int, channels: int, out_channels: int, residual_convs: int):
        super().__init__()
        self.conv0 = nn.Sequential(
            _conv_lrelu(in_channels, channels // 2, 2),
            _conv_lrelu(channels // 2, channels, 2),
        )
        self.convblock = nn.Sequential(*[ResConv(channels) for _ in range(residual_convs)])
        # 4× the outputs then pixel shuffle: the transposed conv restores /2, the shuffle the other /2.
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(channels, 4 * out_channels, 4, 2, 1), nn.PixelShuffle(2))

    def forward(
        self, x: torch.Tensor, flow: torch.Tensor | None, divisor: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if divisor != 1:
            x = F.interpolate(x, scale_factor=1.0 / divisor, mode="bilinear", align_corners=False)
        if flow is not None:
            if divisor != 1:
                # Flow is in pixels: resampling to a coarser grid shrinks its magnitude too.
                flow = F.interpolate(flow, scale_factor=1.0 / divisor, mode="bilinear", align_corners=False) / divisor
            x = torch.cat((x, flow), 1)
        out = self.lastconv(self.convblock(self.conv0(x)))
        if divisor != 1:
            out = F.interpolate(out, scale_factor=divisor, mode="bilinear", align_corners=False)
        return out[:, :4] * divisor, out[:, 4:5], out[:, 5:]


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: ``out[p] = image[p + flow[p]]`` (bilinear, border-clamped), flow in pixels."""
    _, _, h, w = flow.shape
    ys = torch.linspace(-1.0, 1.0, h, device=flow.device, dtype=flow.dtype).view(1, h, 1).expand(1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=flow.device, dtype=flow.dtype).view(1, 1, w).expand(1, h, w)
    # align_corners=True maps -1/+1 to the centres of the edge pixels, so a pixel is 2/(size-1) wide.
    gx = xs + flow[:, 0] * (2.0 / max(w - 1, 1))
    gy = ys + flow[:, 1] * (2.0 / max(h - 1, 1))
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    """RIFE v4.2x flow network. Modules hold weights only; call :meth:`interpolate`."""

    def __init__(self, config: RifeConfig | str = "4.25"):
        super().__init__()
        if isinstance(config, str):
            if config not in RIFE_CONFIGS:
                raise ValueError(f"version={config!r}: expected one of {sorted(RIFE_CONFIGS)}")
            config = RIFE_CONFIGS[config]
        self.config = config
        for i, channels in enumerate(config.block_channels):
            in_ch = config.first_in_channels if i == 0 else config.later_in_channels
            self.add_module(f"block{i}", IFBlock(in_ch, channels, config.out_channels, config.residual_convs))
        self.encode = Head(config.head_channels, config.feature_channels)

    @property
    def version(self) -> str:
        return self.config.version

    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(self.config.num_blocks)]

    def pad_multiple(self, scale: float) -> int:
        """H and W must divide by this: the coarsest block works at /divisor/scale, then conv0 halves
        twice more, and the pixel shuffle must land back on exactly the same grid."""
        return max(1, math.ceil(4 * self.config.divisors[0] / scale))

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, timestep: torch.Tensor, scale: float) -> torch.Tensor:
        """Padded inputs. img0, img1: [B, 3, H, W] in [0, 1]; timestep: [B, 1, H, W]. Returns [B, 3, H, W]."""
        # Step 1: per-frame features, both frames in one batch.
        feats = self.encode(torch.cat((img0, img1), 0))
        f0, f1 = feats.chunk(2, 0)
        flow = mask = passed = None
        warped0, warped1, wf0, wf1 = img0, img1, f0, f1
        # Step 2: coarse-to-fine flow refinement.
        for block, divisor in zip(self.blocks(), self.config.divisors):
            d = divisor / scale
            if flow is None:
                flow, mask, passed = block(torch.cat((img0, img1, f0, f1, timestep), 1), None, d)
            else:
                x = torch.cat((warped0, warped1, wf0, wf1, timestep, mask, passed), 1)
                delta, mask, passed = block(x, flow, d)
                flow = flow + delta
            # Step 3: warp frames and features together by the current flow (t→0 for 0, t→1 for 1).
            w0 = warp(torch.cat((img0, f0), 1), flow[:, :2])
            w1 = warp(torch.cat((img1, f1), 1), flow[:, 2:4])
            warped0, wf0 = w0[:, :3], w0[:, 3:]
            warped1, wf1 = w1[:, :3], w1[:, 3:]
        # Step 4: occlusion-aware blend.
        m = torch.sigmoid(mask)
        return warped0 * m + warped1 * (1 - m)

    @torch.inference_mode()
    def interpolate(
        self,
        img0: torch.Tensor,
        img1: torch.Tensor,
        timestep: float | torch.Tensor = 0.5,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """Frame at ``timestep`` between ``img0`` (t=0) and ``img1`` (t=1).

        img0, img1: RGB [B, 3, H, W] in [0, 1], any H, W (padded internally, cropped back).
        timestep: a float or a tensor [B] in [0, 1]. scale: resolution of the flow estimate
        (0.25–4; 1 = native, 0.5 for large motion at high resolution). Returns [B, 3, H, W].
        """
        if img0.ndim != 4 or img0.shape[1] != 3 or img0.shape != img1.shape:
            raise ValueError(
                f"img0.shape={tuple(img0.shape)}, img1.shape={tuple(img1.shape)}: expected equal [B, 3, H, W]"
            )
        if float(scale) not in SUPPORTED_SCALES:
            raise ValueError(f"scale={scale!r}: expected one of {SUPPORTED_SCALES}")
        b, _, h, w = img0.shape
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(device=img0.device, dtype=img0.dtype).reshape(-1)
            if t.numel() == 1:
                t = t.expand(b)
            if t.numel() != b:
                raise ValueError(f"timestep.shape={tuple(timestep.shape)}: expected a scalar or [B={b}]")
        else:
            t = torch.full((b,), float(timestep), device=img0.device, dtype=img0.dtype)
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"timestep={timestep!r}: must lie in [0, 1]")
        m = self.pad_multiple(scale)
        ph, pw = -h % m, -w % m
        if ph or pw:
            img0 = F.pad(img0, (0, pw, 0, ph))
            img1 = F.pad(img1, (0, pw, 0, ph))
        t_map = t.view(b, 1, 1, 1).expand(b, 1, h + ph, w + pw)
        out = self.forward(img0, img1, t_map, float(scale))
        return out[:, :, :h, :w]

    # Practical-RIFE's name for the same call.
    inference = interpolate


def rife_state_dict_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``flownet.pkl`` (a pickled state dict) without executing arbitrary pickle code."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"path={os.fspath(path)!r}: holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def _normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    dropped = []
    for key, value in state_dict.items():
        name = key.removeprefix(DATA_PARALLEL_PREFIX)
        if name.startswith(TRAINING_ONLY_PREFIXES):
            dropped.append(name)
            continue
        out[name] = value
    if dropped:
        logger.info("RIFE: ignoring %d training-only tensors (%s, ...)", len(dropped), dropped[0])
    return out


def detect_rife_version(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Version from the block count and widths (keys already stripped of ``module.``)."""
    n = 0
    while f"block{n}.conv0.1.0.weight" in state_dict:
        n += 1
    widths = tuple(int(state_dict[f"block{i}.conv0.1.0.weight"].shape[0]) for i in range(n))
    for version, config in RIFE_CONFIGS.items():
        if config.block_channels == widths:
            return version  # 4.25 before 4.26 in the table: identical layouts
    raise ValueError(f"block widths={widths}: no known RIFE layout (known: "
                     f"{ {v: c.block_channels for v, c in RIFE_CONFIGS.items()} })")


def load_rife(
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    version: str | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> IFNet:
    """IFNet in eval mode from a ``flownet.pkl`` path or a state dict (with or without ``module.``).

    ``version`` None detects it from the tensor shapes. Raises ValueError on any missing or unexpected
    key (training-only modules excepted) or shape mismatch, since a partial load leaves random weights.
    """
    raw = source if isinstance(source, Mapping) else rife_state_dict_from_file(source)
    state_dict = _normalise_keys(raw)
    if version is None:
        version = detect_rife_version(state_dict)
    # Built on the meta device and then given the loaded tensors: no time spent on random init.
    with torch.device("meta"):
        model = IFNet(version)
    assign_strict(model, state_dict, what=f"RIFE {version}", copy=isinstance(source, Mapping))
    logger.info("Loaded RIFE %s (%d tensors)", version, len(state_dict))
    return model.to(device=device, dtype=dtype).eval()
