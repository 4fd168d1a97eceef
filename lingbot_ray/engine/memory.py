"""The memory plan: what an engine's weights, each session and one chunk's work take on its device,
computed from the checkpoint's files before anything is loaded, and the admission check that refuses
a session which would not fit instead of running out of memory in the middle of a stream.

Every figure is bytes (GB = 10⁹ B in messages). Where each comes from, with LingBot World fast v1's
values at 832x480, bf16 DiT, window 18 latent frames, one branch:

- **Weights** (:func:`weight_bytes`): every tensor of a component's safetensors headers (shape and
  dtype; no data read), at the dtype its loader casts it to. DiT: floating tensors at the DiT dtype,
  ``_keep_in_fp32_modules`` in fp32 (:func:`lingbot_ray.models.loading.keeps_fp32`): 37.46 GB. Text
  encoder: its dtype (transformers keeps its ``_keep_in_fp32_modules`` in fp32 only in fp16): 11.36
  GB. VAE: fp32, plus the bf16 copy that ``quality="high"`` sessions decode with: 0.76 GB.
- **Per session**, held as long as the session lives (:meth:`ModelMemory.session`):
    - KV cache: layers x 2 (K, V) x branches x window_frames x tokens per latent frame x heads / SP
      degree x head_dim x DiT dtype (``models/kv_cache.py``; the window counts the sink frames and the
      current block): 40 x 2 x 18 x 1,560 x 40 x 128 x 2 B = 23.00 GB.
    - text K/V: layers x 2 x branches x text tokens x heads x head_dim x DiT dtype, all heads on
      every rank: 40 x 2 x 512 x 5,120 x 2 B = 0.42 GB.
    - VAE decode cache: :data:`CACHE_T` frames of the input of every causal conv of the Wan2.1 decoder
      (:func:`vae_decode_cache_elements`), fp32 or bf16 by quality: 3.78 GB (fp32).
- **While a chunk runs**, once per stage (a stage runs one chunk at a time):
    - camera modulation of one block: layers x 2 x branches x block tokens / SP x dim x DiT dtype:
      40 x 2 x 4,680 x 5,120 x 2 B = 3.83 GB.
    - DiT activations: branches x block tokens / SP x (:data:`DIT_FP32_STREAM_COPIES` x dim x 4 B
      + :data:`DIT_FFN_COPIES` x ffn_dim x DiT dtype): 1.03 GB.
    - VAE decode: the chunk's new decode cache, built beside the session's until the chunk commits
      (``StreamingWanVAE.decode_chunk``), plus activations of height x width x frames per latent
      frame x the decoder's last-stage channels x (:data:`VAE_DECODE_COPIES` x decode dtype +
      :data:`VAE_NORM_FP32_COPIES` x 4 B): 3.78 + 4.05 GB (fp32).
- **Headroom** on CUDA, :data:`CUDA_HEADROOM`: cuBLAS/cuDNN workspaces and allocator fragmentation.

The activation constants are upper bounds of the peak live tensor bytes measured by tracing the real
v1 configs on the meta device (no weights, no compute; attention as a fused kernel that keeps no score
matrix): 215.6 kB per DiT token (the formula: 219.1 kB), and 4.03 GB (fp32) / 2.78 GB (bf16) of VAE
decode activations at 832x480, linear in the pixel count. ``tests/engine/test_memory.py`` re-traces them.
The first-frame encoding peaks lower (6.6 GB traced at 832x480, fp32, its feature cache included) than
the decode work, so that bounds it as well.

Where the budget comes from: on CUDA what ``torch.cuda.mem_get_info`` reports free (and, at admission,
what this process's allocator holds unused), capped by an optional budget; on the CPU only a budget
limits anything.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T
from safetensors import safe_open

from ..checkpoint import (
    ModelGeometry,
    geometry_from_configs,
    read_component_config,
    read_model_index,
    read_serving_defaults,
)
from ..models import loading
from ..models.text_encoder import PromptEncoder
from ..models.transformer_lingbot import CausalLingBotWorldTransformer3DModel
from ..protocol import CapacityError
from .errors import EngineError
from .session import ResolvedSpec

GB = 10**9
# Peak live bytes of one ``forward_block`` per token and branch: this many fp32 copies of the residual
# stream [S, dim] (residual, norm output, modulation and RoPE temporaries) plus this many of the FFN's
# inner [S, ffn_dim] in the DiT dtype. Traced on the meta device: 215.6 kB per token for v1, 219.1 kB here.
DIT_FP32_STREAM_COPIES = 8
DIT_FFN_COPIES = 2
# Peak live bytes of a streaming decode besides the caches, per element of the decoder's last stage
# [C, frames per latent frame, H, W]: copies in the decode dtype, plus the RMS norms' fp32 temporaries.
# Traced on the meta device at 416x240, 832x480 and 1280x720: 4.03 GB (fp32) and 2.78 GB (bf16) at
# 832x480; this formula gives 4.05 and 2.82.
VAE_DECODE_COPIES = 4
VAE_NORM_FP32_COPIES = 2.6
# What the driver needs beside the tensors: cuBLAS/cuDNN workspaces, the caching allocator's
# fragmentation. mem_get_info's free figure is taken after the CUDA context exists, so it is not here.
CUDA_HEADROOM = 2 * GB
# How many text tokens the DiT's cross-attention caches: the prompt encoder's padded length.
TEXT_TOKENS = inspect.signature(PromptEncoder.from_pretrained).parameters["max_length"].default

# safetensors dtype names → bytes per element, and which of them a loader casts
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# transformers' file names of a model folder (UMT5's): one file, or shards listed by an index
_TEXT_WEIGHTS, _TEXT_INDEX = "model.safetensors", "model.safetensors.index.json"

TensorInfo = tuple[tuple[int, ...], str]  # (shape, safetensors dtype)


class InsufficientMemory(EngineError, CapacityError):
    """The weights or a session would not fit in the device memory the plan allows; raised before
    anything is allocated. A :class:`~lingbot_ray.protocol.CapacityError`: a server refuses the
    session with close 1013 (try again later) and this message."""


def gb(nbytes: float) -> str:
    """Bytes for a message: GB (10⁹ B) with one decimal, or MB / kB for small (test) models."""
    if abs(nbytes) >= GB / 10:
        return f"{nbytes / GB:.1f} GB"
    if abs(nbytes) >= 10**5:
        return f"{nbytes / 1e6:.1f} MB"
    return f"{nbytes / 1e3:.1f} kB"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Weights, from the safetensors headers


def read_tensor_headers(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """Name → (shape, dtype) of every tensor in ``files``, from their headers (no tensor data read)."""
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(set(files)):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                tensors[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return tensors


def _text_encoder_files(folder: Path) -> list[Path]:
    index = folder / _TEXT_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        return [folder / shard for shard in set(weight_map.values())]
    if not (folder / _TEXT_WEIGHTS).is_file():
        raise ValueError(f"neither {_TEXT_INDEX} nor {_TEXT_WEIGHTS} in {str(folder)!r}")
    return [folder / _TEXT_WEIGHTS]


def cast_bytes(tensors: Mapping[str, TensorInfo], dtype: torch.dtype, keep_fp32=lambda name: False) -> int:
    """Bytes of ``tensors`` once loaded: floating ones in ``dtype`` (fp32 where ``keep_fp32(name)``),
    the others as stored."""
    total = 0
    for name, (shape, stored) in tensors.items():
        if stored not in _DTYPE_BYTES:
            raise ValueError(f"tensor {name!r} dtype={stored!r}: not a safetensors dtype this plan knows")
        size = _DTYPE_BYTES[stored]
        if stored in _FLOATING:
            size = 4 if keep_fp32(name) else _itemsize(dtype)
        total += math.prod(shape) * size
    return total


def transformer_bytes(tensors: Mapping[str, TensorInfo], dtype: torch.dtype) -> int:
    """The DiT's bytes as ``loading.load_transformer`` casts it (either tensor-name layout)."""
    layout = loading.detect_layout(tensors)
    patterns = CausalLingBotWorldTransformer3DModel._keep_in_fp32_modules
    return cast_bytes(tensors, dtype, lambda name: loading.keeps_fp32(loading.to_model_name(name, layout), patterns))


def weight_bytes(folder: str | Path, component: str, dtype: torch.dtype) -> int:
    """Bytes of one component of the checkpoint at ``folder`` once its loader casts it to ``dtype``."""
    sub = read_model_index(folder).component_folder(component)
    if component == "transformer":
        return transformer_bytes(read_tensor_headers(loading.checkpoint_files(sub).values()), dtype)
    if component == "vae":
        return cast_bytes(read_tensor_headers(loading.checkpoint_files(sub).values()), dtype)
    if component == "text_encoder":
        from transformers import UMT5EncoderModel

        tensors = read_tensor_headers(_text_encoder_files(sub))
        # the encoder's embedding is the shared one (one module, whatever tie_word_embeddings says):
        # one buffer once loaded, whether or not the file holds both names
        for tied, source in (UMT5EncoderModel._tied_weights_keys or {}).items():
            if source in tensors:
                tensors.pop(tied, None)
        keep = (UMT5EncoderModel._keep_in_fp32_modules or ()) if dtype == torch.float16 else ()
        return cast_bytes(tensors, dtype, lambda name: any(pattern in name for pattern in keep))
    raise ValueError(f"component={component!r}: one of 'transformer', 'vae', 'text_encoder'")


# ---------------------------------------------------------------------------------------------
# Per session and per chunk, from the configs


def vae_decode_cache_elements(vae: Mapping[str, Any], latent_height: int, latent_width: int) -> int:
    """Elements one session's streaming decode cache holds (batch 1) once it has decoded two latent
    frames: :data:`CACHE_T` frames of the input of every causal 3D conv of diffusers'
    ``WanDecoder3d`` (Wan2.1 layout, diffusers 0.42), at that conv's resolution.

    The walk: ``conv_in`` (z_dim channels), the middle block's two residual blocks (two convs each),
    then per up stage ``num_res_blocks + 1`` residual blocks (the first from in to out channels; Wan2.1
    halves the input of every stage after the first, as its upsamplers' 2D conv halves channels) and,
    on a temporal up stage, the upsampler's ``time_conv``; each up stage but the last doubles height
    and width; finally ``conv_out``. 1x1 shortcut convs cache nothing.
    """
    if vae.get("is_residual"):
        raise ValueError("vae/config.json is_residual=True: the memory plan knows the Wan2.1 decoder only")
    base = int(vae.get("decoder_base_dim") or vae["base_dim"])
    mult = [int(m) for m in vae["dim_mult"]]
    res_blocks = int(vae["num_res_blocks"])
    temporal_up = [bool(t) for t in vae["temperal_downsample"]][::-1]
    dims = [base * m for m in [mult[-1], *mult[::-1]]]
    pixels = latent_height * latent_width
    channels = int(vae["z_dim"]) + 4 * dims[0]  # conv_in, then the middle block
    total = channels * pixels
    for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if stage > 0:
            in_dim //= 2
        channels = in_dim + out_dim + 2 * res_blocks * out_dim
        if stage != len(mult) - 1:
            if temporal_up[stage]:
                channels += out_dim
            total += channels * pixels
            pixels *= 4
        else:
            total += channels * pixels
    total += dims[-1] * pixels  # conv_out
    return CACHE_T * total


@dataclass(frozen=True)
class SessionMemory:
    """One session's device memory: what it keeps while it lives, and what one of its chunks needs
    while it runs (freed after)."""

    width: int
    height: int
    window_frames: int
    branches: int
    kv: int
    text_kv: int
    vae_cache: int
    camera: int
    dit_activations: int
    vae_decode: int

    @property
    def persistent(self) -> int:
        return self.kv + self.text_kv + self.vae_cache

    @property
    def work(self) -> int:
        return self.camera + self.dit_activations + self.vae_decode

    def describe(self) -> str:
        """``session needs 23.0 GB KV + 0.4 GB text K/V + 3.8 GB VAE cache at 832x480, window 18
        frames, and 12.7 GB while a chunk runs``."""
        parts = [f"{gb(self.kv)} KV", f"{gb(self.text_kv)} text K/V"]
        if self.vae_cache:
            parts.append(f"{gb(self.vae_cache)} VAE cache")
        branches = ", guidance (2 branches)" if self.branches > 1 else ""
        return (
            f"session needs {' + '.join(parts)} at {self.width}x{self.height}, window {self.window_frames} "
            f"frames{branches}, and {gb(self.work)} while a chunk runs"
        )


@dataclass(frozen=True)
class ModelMemory:
    """The byte arithmetic of one model: a session's and a chunk's memory from the transformer and
    VAE configs (nothing loaded)."""

    geometry: ModelGeometry
    transformer: Mapping[str, Any]
    vae: Mapping[str, Any]
    dit_dtype: torch.dtype
    text_tokens: int = TEXT_TOKENS

    @classmethod
    def from_configs(
        cls, transformer: Mapping[str, Any], vae: Mapping[str, Any], dit_dtype: torch.dtype
    ) -> ModelMemory:
        return cls(geometry_from_configs(dict(transformer), dict(vae)), transformer, vae, dit_dtype)

    @classmethod
    def read(cls, folder: str | Path, dit_dtype: torch.dtype) -> ModelMemory:
        return cls.from_configs(
            read_component_config(folder, "transformer"), read_component_config(folder, "vae"), dit_dtype
        )

    @classmethod
    def of_dit(cls, stage) -> ModelMemory:
        """The DiT's part, from a loaded :class:`~.stages.DiTStage` (sessions then count no VAE: pass
        ``vae=False``)."""
        return cls(stage.geometry, dict(stage.model.config), {}, stage.dtype)

    def session(
        self,
        width: int,
        height: int,
        *,
        window_frames: int | None = None,
        guidance: bool = False,
        quality: str = "lossless",
        sequence_parallel: int = 1,
        vae: bool = True,
    ) -> SessionMemory:
        """A session of ``width`` x ``height`` (its VAE part only with ``vae``: the VAE on this device)."""
        if vae and not self.vae:
            raise ValueError("vae=True: this ModelMemory has no VAE config (a DiT's part only); pass vae=False")
        t = self.transformer
        heads, head_dim = int(t["num_attention_heads"]), int(t["attention_head_dim"])
        layers, ffn = int(t["num_layers"]), int(t["ffn_dim"])
        if heads % sequence_parallel:
            raise ValueError(f"sequence_parallel={sequence_parallel!r}: must divide num_attention_heads={heads}")
        geometry = self.geometry
        window = geometry.default_window_frames if window_frames is None else window_frames
        branches = 2 if guidance else 1
        itemsize = _itemsize(self.dit_dtype)
        tokens = geometry.tokens_per_frame(width, height)
        block_tokens = math.ceil(geometry.num_frames_per_block * tokens / sequence_parallel)
        dim = heads * head_dim
        kv = layers * 2 * branches * window * tokens * (heads // sequence_parallel) * head_dim * itemsize
        text_kv = layers * 2 * branches * self.text_tokens * dim * itemsize
        camera = layers * 2 * branches * block_tokens * dim * itemsize
        activations = branches * block_tokens * (DIT_FP32_STREAM_COPIES * dim * 4 + DIT_FFN_COPIES * ffn * itemsize)
        vae_cache = vae_decode = 0
        if vae:
            decode = _itemsize(torch.float32 if quality == "lossless" else torch.bfloat16)  # as VAESessionState
            scale = geometry.vae_scale_spatial
            vae_cache = vae_decode_cache_elements(self.vae, height // scale, width // scale) * decode
            mult = self.vae["dim_mult"]
            last_stage = int(self.vae.get("decoder_base_dim") or self.vae["base_dim"]) * int(mult[0])
            elements = width * height * geometry.vae_scale_temporal * last_stage
            vae_decode = vae_cache + math.ceil(elements * (VAE_DECODE_COPIES * decode + VAE_NORM_FP32_COPIES * 4))
        return SessionMemory(
            width, height, window, branches, kv, text_kv, vae_cache, camera, activations, vae_decode
        )

    def for_spec(self, resolved: ResolvedSpec, *, sequence_parallel: int = 1, vae: bool = True) -> SessionMemory:
        spec = resolved.spec
        return self.session(
            spec.width,
            spec.height,
            window_frames=resolved.window_frames,
            guidance=spec.use_cfg,
            quality=spec.quality,
            sequence_parallel=sequence_parallel,
            vae=vae,
        )


# ---------------------------------------------------------------------------------------------
# The device


def device_memory(device: str | torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device; None elsewhere (no limit known)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def _free_now(device: torch.device) -> tuple[int, int] | None:
    """What a new allocation can get on ``device`` now: free memory plus what this process's caching
    allocator holds unused; and the device's total."""
    memory = device_memory(device)
    if memory is None:
        return None
    free, total = memory
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached, total


def default_headroom(device: str | torch.device) -> int:
    return CUDA_HEADROOM if torch.device(device).type == "cuda" else 0


# ---------------------------------------------------------------------------------------------
# The plan and the admission check


@dataclass(frozen=True)
class MemoryPlan:
    """An engine's memory on its device, planned before anything is loaded.

    ``weights``: bytes per component whose weights sit on the device (the text encoder only when
    placed there; ``text_encoder`` is its size wherever it runs). ``session``: one session at the
    checkpoint's default size. ``available``: what the engine may use on the device (free memory when
    planned, capped by ``budget``); None is no limit.
    """

    device: str
    model: ModelMemory
    weights: Mapping[str, int]
    text_encoder: int
    text_device: str
    session: SessionMemory
    headroom: int
    available: int | None
    total: int | None
    budget: int | None = None

    @property
    def weights_on_device(self) -> int:
        return sum(self.weights.values())

    @property
    def fixed(self) -> int:
        """Bytes taken before any session: weights, one chunk's work, headroom."""
        return self.weights_on_device + self.session.work + self.headroom

    def needed(self, sessions: int) -> int:
        return self.fixed + sessions * self.session.persistent

    def check_weights(self) -> None:
        """Raise :class:`InsufficientMemory` when the weights alone (with the headroom) cannot fit."""
        if self.available is not None and self.weights_on_device + self.headroom > self.available:
            raise InsufficientMemory(
                f"weights need {gb(self.weights_on_device)} (+ {gb(self.headroom)} headroom) on {self.device}; "
                f"{self.limit()}"
            )

    def sessions_that_fit(self) -> int | None:
        """How many default-size sessions fit beside the weights; None without a limit."""
        if self.available is None:
            return None
        return max(0, (self.available - self.fixed) // self.session.persistent)

    def limit(self) -> str:
        if self.available is None:
            return "no limit"
        budget = f" (budget {gb(self.budget)})" if self.budget is not None else ""
        total = f" of {gb(self.total)}" if self.total is not None else ""
        return f"{gb(self.available)} available{total}{budget}"

    def summary(self) -> str:
        s = self.session
        fit = self.sessions_that_fit()
        fits = "" if fit is None else f": {fit} session fits" if fit == 1 else f": {fit} sessions fit"
        return (
            f"memory plan on {self.device}: weights {gb(self.weights_on_device)} (text encoder "
            f"{gb(self.text_encoder)} on {self.text_device}), {gb(s.persistent)} per session at "
            f"{s.width}x{s.height} (KV {gb(s.kv)}, text K/V {gb(s.text_kv)}, VAE cache {gb(s.vae_cache)}), "
            f"{gb(s.work)} while a chunk runs, {gb(self.headroom)} headroom; {self.limit()}{fits}"
        )

    def text_placement(self) -> str:
        """The text encoder's place and the figures that decided it."""
        with_text = self.needed(1) + (0 if "text_encoder" in self.weights else self.text_encoder)
        return (
            f"text encoder ({gb(self.text_encoder)}) on {self.text_device}: with it on {self.device}, the "
            f"weights, one session, one chunk's work and the headroom need {gb(with_text)} there; {self.limit()}"
        )

    def table(self) -> str:
        s = self.session
        rows = [(f"weights: {name}", nbytes) for name, nbytes in self.weights.items()]
        if "text_encoder" not in self.weights:
            rows.append((f"(text encoder on {self.text_device}: {gb(self.text_encoder)})", None))
        rows += [
            (f"per session at {s.width}x{s.height}, window {s.window_frames}: KV cache", s.kv),
            ("per session: text K/V", s.text_kv),
            ("per session: VAE decode cache", s.vae_cache),
            ("while a chunk runs: camera modulation", s.camera),
            ("while a chunk runs: DiT activations", s.dit_activations),
            ("while a chunk runs: VAE decode", s.vae_decode),
            ("headroom", self.headroom),
            ("total with one session", self.needed(1)),
        ]
        width = max(len(label) for label, _ in rows)
        unit, scale, exponent = ("GB", GB, 9) if self.needed(1) >= GB else ("MB", 10**6, 6)
        lines = [f"memory plan on {self.device} ({unit} = 1e{exponent} B)"]
        lines += [f"  {label:<{width}}" + ("" if n is None else f"  {n / scale:8.2f}") for label, n in rows]
        fit = self.sessions_that_fit()
        lines.append(f"  available: {self.limit()}" + ("" if fit is None else f"; sessions that fit: {fit}"))
        return "\n".join(lines)

    def admission(self) -> MemoryGuard:
        """The check :meth:`RealtimeEngine.new_session` runs: every stage is on this device."""
        return MemoryGuard(
            self.model, self.device, budget=self.budget, weights=self.weights_on_device, headroom=self.headroom
        )


def plan_memory(
    folder: str | Path,
    *,
    device: str | torch.device,
    dit_dtype: torch.dtype,
    text_dtype: torch.dtype,
    text_device: str | torch.device | None = None,
    budget: int | None = None,
    headroom: int | None = None,
) -> MemoryPlan:
    """Plan an engine on ``device`` from the checkpoint's headers and configs, before loading: the
    weights at these dtypes, a session at the checkpoint's default size; see :func:`place`."""
    model = ModelMemory.read(folder, dit_dtype)
    defaults = read_serving_defaults(folder)
    weights = {
        "transformer": weight_bytes(folder, "transformer", dit_dtype),
        # VAEStage: fp32, plus the bf16 copy made for the first quality="high" session
        "vae": weight_bytes(folder, "vae", torch.float32) + weight_bytes(folder, "vae", torch.bfloat16),
    }
    text = weight_bytes(folder, "text_encoder", text_dtype)
    return place(
        model,
        weights,
        text,
        device=device,
        width=defaults.width,
        height=defaults.height,
        text_device=text_device,
        budget=budget,
        headroom=headroom,
    )


def place(
    model: ModelMemory,
    weights: Mapping[str, int],
    text_encoder: int,
    *,
    device: str | torch.device,
    width: int,
    height: int,
    text_device: str | torch.device | None = None,
    budget: int | None = None,
    headroom: int | None = None,
) -> MemoryPlan:
    """The plan of an engine whose DiT and VAE (``weights``) are on ``device``.

    ``text_device`` None places the text encoder (``text_encoder`` bytes): on ``device`` when the
    weights with it, one chunk's work, the headroom and one ``width`` x ``height`` session fit in what
    is available there; on the CPU otherwise. ``budget``: bytes the engine may use on ``device`` (on
    CUDA, capped by what is free).
    """
    device = torch.device(device)
    if budget is not None and budget <= 0:
        raise ValueError(f"memory_budget={budget!r}: must be a positive number of bytes or None")
    session = model.session(width, height)
    memory = device_memory(device)
    total = memory[1] if memory else None
    available = memory[0] if memory else None
    if budget is not None:
        available = budget if available is None else min(available, budget)
    headroom = default_headroom(device) if headroom is None else headroom

    def plan(text_on: torch.device) -> MemoryPlan:
        on_device = {**weights, "text_encoder": text_encoder} if text_on == device else dict(weights)
        return MemoryPlan(
            str(device), model, on_device, text_encoder, str(text_on), session, headroom, available, total, budget
        )

    if text_device is not None:
        return plan(torch.device(text_device))
    together = plan(device)
    if device.type == "cpu" or available is None or together.needed(1) <= available:
        return together
    return plan(torch.device("cpu"))


class MemoryGuard:
    """Admits a session only if it fits, before anything of it is allocated.

    A session needs what it keeps (KV cache, text K/V, and its VAE cache when the VAE is on this
    device) plus, once per device, the largest chunk's work of the sessions held and the headroom.
    Against: what is free on a CUDA device now (plus this process's cached, unused memory) and, with
    a ``budget``, the budget less ``weights`` and what the sessions held keep. On the CPU without a
    budget nothing is refused.
    """

    def __init__(
        self,
        model: ModelMemory,
        device: str | torch.device,
        *,
        budget: int | None = None,
        weights: int = 0,
        headroom: int | None = None,
        sequence_parallel: int = 1,
        vae: bool = True,
    ):
        self.model = model
        self.device = torch.device(device)
        self.budget = budget
        self.weights = weights
        self.headroom = default_headroom(device) if headroom is None else headroom
        self.sequence_parallel = sequence_parallel
        self.vae = vae

    def _session(self, resolved: ResolvedSpec) -> SessionMemory:
        return self.model.for_spec(resolved, sequence_parallel=self.sequence_parallel, vae=self.vae)

    def admit(self, resolved: ResolvedSpec, held: Iterable[ResolvedSpec] = (), unallocated: int = 0) -> SessionMemory:
        """Check ``resolved`` beside the sessions ``held``; raises :class:`InsufficientMemory` naming the
        figures when it does not fit. ``unallocated``: bytes the sessions held are still to allocate
        (a VAE cache fills on its first decode), which the device's free figure cannot show yet."""
        new = self._session(resolved)
        others = [self._session(r) for r in held]
        need = new.persistent + max(s.work for s in [new, *others]) + self.headroom
        limits: list[tuple[int, str]] = []  # (free for this session, what it is out of)
        if self.budget is not None:
            free = self.budget - self.weights - sum(s.persistent for s in others)
            limits.append((free, f"a {gb(self.budget)} budget"))
        now = _free_now(self.device)
        if now is not None:
            limits.append((now[0] - unallocated, gb(now[1])))
        if not limits:
            return new
        free, out_of = min(limits, key=lambda limit: limit[0])
        if need > free:
            held_text = f"{len(others)} session{'s' if len(others) != 1 else ''} held"
            raise InsufficientMemory(
                f"{new.describe()}, {gb(self.headroom)} headroom; {gb(max(free, 0))} free of {out_of} "
                f"on {self.device} ({held_text})"
            )
        return new


__all__ = [
    "GB",
    "InsufficientMemory",
    "MemoryGuard",
    "MemoryPlan",
    "ModelMemory",
    "SessionMemory",
    "device_memory",
    "place",
    "plan_memory",
    "vae_decode_cache_elements",
    "weight_bytes",
]
