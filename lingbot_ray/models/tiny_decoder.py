"""A TAEHV-style tiny autoencoder for Wan 2.1 latents, and its streaming decoder.

TAEHV ("Tiny AutoEncoder for Hunyuan Video", and for Wan 2.1 as ``taew2_1``) is a distilled
replacement for a video VAE: plain 2-D convolutions run on every frame, and time enters only through
``MemBlock``s, which see their own input at the previous time step, and through 1x1 convolutions that
merge (``TPool``) or split (``TGrow``) time steps on the channel axis. It decodes the latents the
DiT itself works with (the Wan VAE's normalised latents, so no ``latents_mean/std``) to RGB in [0, 1].
Details and quality: docs/MODEL.md, 'Tiny decoder'.

Layout (the published state-dict keys are ``encoder.<i>.…`` / ``decoder.<i>.…`` by Sequential index;
every conv is 3x3 padding 1 unless said; ``p`` is ``patch_size``):

- encoder: 0 conv(3p² → w), 1 ReLU, then three stages of [TPool(w, s), conv(w → w, stride 2, no
  bias), 3 MemBlock(w, w)] at indices 2-6, 7-11, 12-16 (``s`` = 2 where ``encoder_time_downscale``
  is True, else 1), 17 conv(w → latent_channels).
- decoder (widths n0..n3): 0 Clamp (``tanh(x/3)·3``), 1 conv(latent → n0), 2 ReLU, then three
  stages k = 0, 1, 2 of [3 MemBlock(nk, nk), Upsample (nearest ×2, or ×1), TGrow(nk, sk), conv(nk →
  nk+1, no bias)] at indices 3-8, 9-14, 15-20, 21 ReLU, 22 conv(n3 → 3p²); the output is clamped
  to [0, 1]. A decode of T latent frames yields ``t_upscale``·T frames, and the first
  ``t_upscale - 1`` are dropped, so a video has 1 + 4(T-1) frames: the Wan VAE's count.
- skip (only with ``linear_skip``, the project's addition; absent from published files): a linear
  map of each latent to its pixels (`LinearSkip`, keys ``skip.first.*`` and ``skip.rest.*``), added to
  the decoder's output before the clamp.
- MemBlock(n_in, n_out): ``relu(conv(cat[x, past]) + skip(x))`` with conv = 3x3 → ReLU → 3x3 → ReLU
  → 3x3 and skip a bias-free 1x1 conv (identity when n_in == n_out); ``past`` is the same block's
  input one time step earlier (zeros at the first step).

Streaming rule: a MemBlock's only temporal state is its input at the previous time step, so a chunk of
latent frames is decoded in parallel over time, block by block, with ``past`` = [the session's last
input frame of that block from the previous chunk, then this chunk's inputs shifted by one]. The
session state is one frame per MemBlock (9 frames, a fixed size however long the session runs), and
the streamed output equals the one-shot ``decode_video`` of the whole sequence.

Why it is cheaper than the Wan VAE: no 3-D convolutions (a Wan 3x3x3 causal conv convolves each frame
with its two predecessors, three times the work of a 3x3 conv), far fewer convolutions where the
frames are large (two 3x3 convs, 64 wide, at full resolution, against the Wan 2.1 decoder's six 96-wide
3x3x3 convs plus its upsampling and output convs), and a whole chunk runs as one batch of frames
instead of one latent frame at a time.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .strict_load import assign_strict
from .vae_streaming import DecodeCache, check_decode_input, pixel_frames

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "Clamp",
    "MemBlock",
    "StreamingTinyDecoder",
    "TGrow",
    "TPool",
    "TinyAutoencoder",
    "TinyDecoderConfig",
    "load_tiny_autoencoder",
    "save_tiny_autoencoder",
]

# The project's own folder format: these two files, written by `save_tiny_autoencoder`.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_TORCH_SUFFIXES = (".pth", ".pt")
_SAFETENSORS_SUFFIX = ".safetensors"

# Each StreamingTinyDecoder gets a number that its caches carry; unlike `id()` it is never reused.
_DECODER_NUMBERS = itertools.count(1)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class TinyDecoderConfig:
    """Shape of a tiny autoencoder. The defaults are the published ``taew2_1`` (Wan 2.1) layout;
    narrower ``decoder_widths`` give a cheaper model with the same keys (other shapes)."""

    latent_channels: int = 16
    image_channels: int = 3
    patch_size: int = 1
    encoder_width: int = 64
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
    # The project's addition, off in the published layout: a linear path from each latent straight to
    # its pixels (`LinearSkip`), added to the decoder's output.
    linear_skip: bool = False

    def __post_init__(self) -> None:
        for name in ("latent_channels", "image_channels", "patch_size", "encoder_width"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"{name}={value!r}: must be a positive int")
        widths = self.decoder_widths
        if not (isinstance(widths, tuple) and len(widths) == 4 and all(map(_is_positive_int, widths))):
            raise ValueError(f"decoder_widths={widths!r}: must be 4 positive ints")
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            flags = getattr(self, name)
            if not (isinstance(flags, tuple) and len(flags) == 3 and all(isinstance(f, bool) for f in flags)):
                raise ValueError(f"{name}={flags!r}: must be 3 bools")
        if not isinstance(self.linear_skip, bool):
            raise ValueError(f"linear_skip={self.linear_skip!r}: must be a bool")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TinyDecoderConfig:
        """Config from a JSON object; lists become tuples, unknown keys and bad values are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"tiny decoder config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"tiny decoder config: unknown key(s) {unknown}; known: {sorted(known)}")
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists) that `from_dict` reads back."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @property
    def decoder_time_strides(self) -> tuple[int, ...]:
        """TGrow strides of the three decoder stages (2 where ``decoder_time_upscale`` is True)."""
        return tuple(2 if grow else 1 for grow in self.decoder_time_upscale)

    @property
    def encoder_time_strides(self) -> tuple[int, ...]:
        """TPool strides of the three encoder stages (2 where ``encoder_time_downscale`` is True)."""
        return tuple(2 if pool else 1 for pool in self.encoder_time_downscale)

    @property
    def t_upscale(self) -> int:
        """Frames per latent frame out of the decoder (product of the TGrow strides; 4 for taew2_1)."""
        return math.prod(self.decoder_time_strides)

    @property
    def t_downscale(self) -> int:
        """Frames per latent frame into the encoder (product of the TPool strides; 4 for taew2_1)."""
        return math.prod(self.encoder_time_strides)

    @property
    def spatial_scale(self) -> int:
        """Decoder output pixels per latent pixel along H and W, patch size included (8 for taew2_1)."""
        return 2 ** sum(self.decoder_space_upscale) * self.patch_size

    @property
    def encoder_spatial_scale(self) -> int:
        """Input pixels per latent pixel of the encoder (three stride-2 convs, times the patch size)."""
        return 8 * self.patch_size


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------


def _conv(n_in: int, n_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latents to (-3, 3): ``tanh(x/3)·3`` (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """Residual block that also sees its own input one time step earlier (``past``).

    Works on frames [N, C, H, W]; the caller pairs every frame with its predecessor.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(2 * n_in, n_out),
            nn.ReLU(inplace=True),
            _conv(n_out, n_out),
            nn.ReLU(inplace=True),
            _conv(n_out, n_out),
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """Merge ``stride`` consecutive time steps into one: their channels concatenated in time order,
    then a bias-free 1x1 conv back to ``channels``. Works on [N, T, C, H, W], T a multiple of stride."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels * stride, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, channels, height, width = x.shape
        if steps % self.stride:
            raise ValueError(f"TPool: time steps {steps} are not a multiple of stride {self.stride}")
        merged = x.reshape(batch * steps // self.stride, self.stride * channels, height, width)
        return self.conv(merged).unflatten(0, (batch, steps // self.stride))


class TGrow(nn.Module):
    """Split every time step into ``stride`` steps: a bias-free 1x1 conv to ``channels·stride``
    channels, read as ``stride`` groups of ``channels`` in time order. Works on [N, T, C, H, W]."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(channels, channels * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, channels, height, width = x.shape
        grown = self.conv(x.reshape(batch * steps, channels, height, width))
        return grown.reshape(batch, steps * self.stride, channels, height, width)


class LinearSkip(nn.Module):
    """A linear map from each latent to the pixels it stands for: ``rest`` (a 1x1 conv to
    ``t_upscale`` frames of ``scale``x``scale`` pixels, pixel-shuffled) for every latent frame, and
    ``first`` (one frame) for the first latent frame of a video, which stands for one frame only. The
    decoder's convolutions then learn what this linear decode misses. Training starts it at the
    principal components of the pixel blocks (lingbot_ray/world/linear_code.py), so the decoder is a
    working linear decoder from its first step. No temporal state: streaming needs nothing more."""

    def __init__(self, latent_channels: int, t_upscale: int, scale: int) -> None:
        super().__init__()
        self.t_upscale, self.scale = t_upscale, scale
        self.first = nn.Conv2d(latent_channels, 3 * scale * scale, 1)
        self.rest = nn.Conv2d(latent_channels, t_upscale * 3 * scale * scale, 1)

    def forward(self, latents: torch.Tensor, fresh: bool) -> torch.Tensor:
        """[N, T, C, h, w] latents → [N, t_upscale·T, 3, H, W] (``fresh``: the first latent frame's
        ``t_upscale`` frames all come from ``first``; the decoder keeps only the last of them)."""
        batch, steps = latents.shape[:2]
        pixels = self.rest(latents.flatten(0, 1)).unflatten(1, (self.t_upscale, -1)).unflatten(0, (batch, steps))
        if fresh:  # [N, T, t, 3s², h, w]: frame 0's row from `first`
            first = self.first(latents[:, 0]).unsqueeze(1).expand(-1, self.t_upscale, -1, -1, -1)
            pixels = torch.cat([first.unsqueeze(1), pixels[:, 1:]], dim=1)
        frames = F.pixel_shuffle(pixels.flatten(0, 2), self.scale)
        return frames.unflatten(0, (batch, steps * self.t_upscale))


def _run_blocks(
    blocks: nn.Sequential, x: torch.Tensor, memory: Sequence[torch.Tensor] | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``blocks`` on a whole [N, T, C, H, W] sequence at once (parallel over time).

    ``memory`` holds, per MemBlock in order, its input at the time step before ``x`` starts
    ([N, 1, C, H, W]); None means the start of a video (zeros). Returns the output and the new memory:
    each MemBlock's input at the last time step, copied so it does not keep the chunk's activations.
    """
    new_memory: list[torch.Tensor] = []
    for block in blocks:
        batch, steps = x.shape[:2]
        if isinstance(block, MemBlock):
            before = x.new_zeros(x[:, :1].shape) if memory is None else memory[len(new_memory)]
            past = torch.cat([before, x[:, :-1]], dim=1)
            new_memory.append(x[:, -1:].clone())
            x = block(x.flatten(0, 1), past.flatten(0, 1)).unflatten(0, (batch, steps))
        elif isinstance(block, (TPool, TGrow)):
            x = block(x)
        else:
            x = block(x.flatten(0, 1)).unflatten(0, (batch, steps))
    return x, new_memory


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class TinyAutoencoder(nn.Module):
    """The tiny autoencoder: ``encoder`` and ``decoder`` Sequentials in the published index layout.

    Videos are [N, T, C, H, W] (TAEHV's order) in [0, 1]; latents are the DiT's normalised latents.
    """

    def __init__(self, config: TinyDecoderConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TinyDecoderConfig()
        pixels = config.image_channels * config.patch_size**2
        width = config.encoder_width
        encoder: list[nn.Module] = [_conv(pixels, width), nn.ReLU(inplace=True)]
        for stride in config.encoder_time_strides:
            encoder += [TPool(width, stride), _conv(width, width, stride=2, bias=False)]
            encoder += [MemBlock(width, width) for _ in range(3)]
        encoder.append(_conv(width, config.latent_channels))
        self.encoder = nn.Sequential(*encoder)

        n = config.decoder_widths
        decoder: list[nn.Module] = [Clamp(), _conv(config.latent_channels, n[0]), nn.ReLU(inplace=True)]
        stages = zip(config.decoder_time_strides, config.decoder_space_upscale, strict=True)
        for k, (t_stride, space_up) in enumerate(stages):
            decoder += [MemBlock(n[k], n[k]) for _ in range(3)]
            decoder += [nn.Upsample(scale_factor=2 if space_up else 1), TGrow(n[k], t_stride)]
            decoder.append(_conv(n[k], n[k + 1], bias=False))
        decoder += [nn.ReLU(inplace=True), _conv(n[3], pixels)]
        self.decoder = nn.Sequential(*decoder)
        if config.linear_skip:
            self.skip = LinearSkip(config.latent_channels, config.t_upscale, config.spatial_scale)

    @property
    def frames_to_trim(self) -> int:
        """Leading decoded frames dropped from a video: TGrow makes ``t_upscale`` frames of the first
        latent frame, which stands for one video frame only."""
        return self.config.t_upscale - 1

    def decode_frames(
        self, latents: torch.Tensor, memory: Sequence[torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[N, T, C, h, w] latents → ([N, t_upscale·T, 3, H, W] in [0, 1], untrimmed; new memory).

        ``memory`` continues a video (see `_run_blocks`); None starts one.
        """
        fresh = memory is None
        frames, memory = _run_blocks(self.decoder, latents, memory)
        if self.config.patch_size > 1:
            frames = F.pixel_shuffle(frames, self.config.patch_size)
        if self.config.linear_skip:
            frames = frames + self.skip(latents, fresh)
        return frames.clamp(0.0, 1.0), memory

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, T, C, h, w] latents → [N, 1 + t_upscale·(T-1), 3, H, W] in [0, 1], parallel over time."""
        self._check_5d(latents, self.config.latent_channels, "latents")
        frames, _ = self.decode_frames(latents)
        return frames[:, self.frames_to_trim :]

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, T, 3, H, W] in [0, 1] → [N, ceil(T / t_downscale), C, H/8p, W/8p] latents.

        T is padded up to a multiple of the time downscale by repeating the last frame, so a video of
        1 + 4(T-1) frames gives T latent frames.
        """
        self._check_5d(frames, self.config.image_channels, "frames")
        scale = self.config.encoder_spatial_scale
        height, width = frames.shape[-2:]
        if height % scale or width % scale:
            raise ValueError(f"frames size {height}x{width}: must be a multiple of {scale} (8 · patch_size)")
        if self.config.patch_size > 1:
            frames = F.pixel_unshuffle(frames, self.config.patch_size)
        missing = -frames.shape[1] % self.config.t_downscale
        if missing:
            frames = torch.cat([frames, frames[:, -1:].expand(-1, missing, -1, -1, -1)], dim=1)
        latents, _ = _run_blocks(self.encoder, frames, None)
        return latents

    @staticmethod
    def _check_5d(x: torch.Tensor, channels: int, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[2] != channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a [N, T, {channels}, H, W] tensor, got {shape}")
        if 0 in x.shape:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix in _TORCH_SUFFIXES:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    elif suffix == _SAFETENSORS_SUFFIX:
        obj = load_file(path, device="cpu")
    else:
        raise ValueError(
            f"path={str(path)!r}: unknown suffix {path.suffix!r}; expected one of "
            f"{list(_TORCH_SUFFIXES) + [_SAFETENSORS_SUFFIX]} or a folder with {CONFIG_NAME} + {WEIGHTS_NAME}"
        )
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"path={str(path)!r}: holds a {type(obj).__name__}, expected a state dict of tensors")
    return dict(obj)


def _read_folder_config(folder: Path) -> TinyDecoderConfig:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"path={str(folder)!r}: a tiny decoder folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        return TinyDecoderConfig.from_dict(json.loads(config_path.read_text()))
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_path}: {err}") from err


def _keep_last_tgrow_rows(model: TinyAutoencoder, state_dict: dict[str, torch.Tensor]) -> None:
    """Published-loader rule for older files: a TGrow weight with more output rows than the model's
    (a larger multiple of its channels, e.g. decoder.7 [512, 256] for a stride-1 TGrow [256, 256])
    keeps its LAST rows, i.e. the outputs of the last time step it used to make."""
    for index, block in enumerate(model.decoder):
        if not isinstance(block, TGrow):
            continue
        key = f"decoder.{index}.conv.weight"
        weight = state_dict.get(key)
        want = tuple(block.conv.weight.shape)
        channels = want[1]
        if weight is None or weight.ndim != 4 or tuple(weight.shape[1:]) != want[1:]:
            continue
        rows = weight.shape[0]
        if rows > want[0] and rows % channels == 0:
            logger.info("%s: keeping the last %d of %d rows (older TGrow stride)", key, want[0], rows)
            state_dict[key] = weight[-want[0] :].clone()


def load_tiny_autoencoder(
    path: str | os.PathLike,
    *,
    config: TinyDecoderConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TinyAutoencoder:
    """Model in eval mode from a published file or the project's folder.

    Args:
        path: a ``.pth``/``.pt`` (read with ``weights_only``) or ``.safetensors`` state dict in the
            published layout, or a folder with ``config.json`` + ``model.safetensors``
            (`save_tiny_autoencoder`).
        config: the layout of a file (default: taew2_1). For a folder its ``config.json`` rules, and
            a different ``config`` is an error.

    Raises:
        ValueError: for a path that does not exist or has an unknown suffix, a bad ``config.json``,
            or weights that do not match: one error naming the file and every missing, unexpected
            and mis-shaped tensor.
    """
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        folder_config = _read_folder_config(path)
        if config is not None and config != folder_config:
            raise ValueError(f"config={config!r} differs from {path / CONFIG_NAME}'s {folder_config!r}")
        config, weights_path = folder_config, path / WEIGHTS_NAME
        if not weights_path.is_file():
            raise ValueError(f"path={str(path)!r}: a tiny decoder folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    elif path.is_file():
        config, weights_path = config or TinyDecoderConfig(), path
    else:
        raise ValueError(f"path={str(path)!r}: no such file or folder")
    state_dict = _read_state_dict(weights_path)
    # Built on the meta device and then given the loaded tensors: no time spent on random init.
    with torch.device("meta"):
        model = TinyAutoencoder(config)
    _keep_last_tgrow_rows(model, state_dict)
    assign_strict(model, state_dict, what=f"tiny autoencoder file {str(weights_path)!r}", copy=False)
    logger.info(
        "Loaded tiny autoencoder %s (%d tensors, widths %s)", weights_path, len(state_dict), config.decoder_widths
    )
    return model.to(device=device, dtype=dtype).eval()


def save_tiny_autoencoder(model: TinyAutoencoder, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``folder`` (created if needed).

    Each file is written under a temporary name and then renamed, so a reader never sees half a file.
    """
    if not isinstance(model, TinyAutoencoder):
        raise ValueError(f"model must be a TinyAutoencoder, got {type(model).__name__}")
    folder = Path(os.fspath(folder)).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    weights_tmp = folder / f".{WEIGHTS_NAME}.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    os.replace(weights_tmp, folder / WEIGHTS_NAME)
    config_tmp = folder / f".{CONFIG_NAME}.tmp"
    config_tmp.write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    os.replace(config_tmp, folder / CONFIG_NAME)
    return folder


# --------------------------------------------------------------------------------------------------
# Streaming decode
# --------------------------------------------------------------------------------------------------


class StreamingTinyDecoder:
    """A `TinyAutoencoder`'s decoder with session-owned state, interchangeable with `StreamingWanVAE`'s
    decode side (lingbot_ray/models/vae_streaming.py): NCTHW latents in the DiT's normalised space in,
    NCTHW frames in [-1, 1] out, with the Wan VAE's frame counts.

    Holds only the (shared, read-only) model; every session keeps its own `DecodeCache`. Decoding
    runs in the model's parameter dtype.
    """

    def __init__(self, model: TinyAutoencoder) -> None:
        if not isinstance(model, TinyAutoencoder):
            raise ValueError(f"model must be a TinyAutoencoder, got {type(model).__name__}")
        self.model = model.eval()
        self.config = model.config
        self.z_dim: int = model.config.latent_channels
        self.temporal_ratio: int = model.config.t_upscale
        self.spatial_ratio: int = model.config.spatial_scale
        self._slots = sum(isinstance(block, MemBlock) for block in model.decoder)
        self._number = next(_DECODER_NUMBERS)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        config: TinyDecoderConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> StreamingTinyDecoder:
        """`load_tiny_autoencoder(path, ...)` wrapped for streaming."""
        return cls(load_tiny_autoencoder(path, config=config, device=device, dtype=dtype))

    def with_dtype(self, dtype: torch.dtype) -> StreamingTinyDecoder:
        """A copy of this decoder in ``dtype`` (the weights copied, this one unchanged)."""
        return type(self)(copy.deepcopy(self.model).to(dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def num_pixel_frames(self, num_latent_frames: int, *, first_chunk: bool) -> int:
        """Pixel frames that `decode_chunk` returns for a chunk of `num_latent_frames`."""
        return pixel_frames(num_latent_frames, self.temporal_ratio, first_chunk=first_chunk)

    def new_decode_cache(self) -> DecodeCache:
        """A new session's state: one slot per memory block, holding that block's last input frame."""
        return DecodeCache(feat_map=[None] * self._slots, temporal_ratio=self.temporal_ratio, owner_id=self._number)

    # no_grad rather than inference_mode: callers may post-process the frames in place.
    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, cache: DecodeCache) -> tuple[torch.Tensor, DecodeCache]:
        """Decode the session's next latent frames.

        Args:
            latents: [B, z_dim, F, h, w], normalised as the DiT produces them.
            cache: the session's `DecodeCache`; updated only if the whole chunk decodes.

        Returns:
            frames [B, 3, T, H, W] in [-1, 1] (model dtype), with T = 1 + 4(F-1) on the session's
            first chunk and 4F afterwards; and the same `cache`, advanced by F latent frames.
        """
        self._check_decode_input(latents, cache)
        first_chunk = cache.num_latent_frames == 0

        x = latents.to(device=self.device, dtype=self.dtype).movedim(2, 1)  # NCTHW -> NTCHW
        memory = None if first_chunk else cache.feat_map
        frames, new_memory = self.model.decode_frames(x, memory)  # type: ignore[arg-type]
        if first_chunk:
            frames = frames[:, self.model.frames_to_trim :]
        frames = (frames * 2.0 - 1.0).movedim(1, 2).contiguous()  # [0, 1] NTCHW -> [-1, 1] NCTHW

        # Commit only now: a failure above leaves the session's state as it was.
        cache.commit(list(new_memory), latents, self.dtype, self.device)
        return frames, cache

    def _check_decode_input(self, latents: torch.Tensor, cache: DecodeCache) -> None:
        check_decode_input(latents, cache, owner_id=self._number, slots=self._slots, z_dim=self.z_dim,
                           dtype=self.dtype, device=self.device, decoder="StreamingTinyDecoder")  # fmt: skip
