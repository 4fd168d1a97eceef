"""Loading a checkpoint's model components — the one loader module.

Each serving stage loads only its own components (the text stage never touches the transformer):
:func:`load_dit`, :func:`load_vae`, :func:`load_prompt_encoder` and :func:`load_scheduler_config`
take the checkpoint folder (``model_index.json`` is checked first, :mod:`lingbot_ray.checkpoint`).

The transformer's weights: load and save `CausalLingBotWorldTransformer3DModel` component folders in
either tensor-name layout (:func:`load_transformer`, :func:`save_transformer`). The model's
`from_pretrained` is :func:`load_pretrained`, which maps diffusers' arguments onto the same load path.

Published checkpoints carry the original Wan names (`blocks.N.self_attn.q.weight`, ...); the model
uses diffusers' names (`blocks.N.attn1.to_q.weight`, ...). Camera tensors have the same name in both.
Transformer folders hold `config.json` plus either `diffusion_pytorch_model.safetensors` or shards
`diffusion_pytorch_model-000NN-of-000MM.safetensors` listed by `diffusion_pytorch_model.safetensors.index.json`.
LingBot World 2.0's releases differ only in where the DiT is and what config comes with it (the
authors' `transformers/config.json`; none at all beside the 1.3B's `model.safetensors.index.json`):
:func:`lingbot_ray.checkpoint.transformer_files` finds the files and the config for every layout.

Loading builds the model on the meta device, checks every name and shape against the safetensors
headers before reading any data, then streams the shards one at a time and assigns the tensors.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import (
    DIFFUSERS_WEIGHTS_PREFIX,
    PLAIN_WEIGHTS_PREFIX,
    TENSOR_NAME_PROBES,
    TransformerFiles,
    native_config,
    read_checkpoint_layout,
    read_model_index,
    tensor_naming,
    transformer_files,
)
from .strict_load import check_names_and_shapes
from .transformer_lingbot import CausalLingBotWorldTransformer3DModel


logger = logging.getLogger(__name__)

__all__ = [
    "DIFFUSERS",
    "default_dtype",
    "load_dit",
    "load_prompt_encoder",
    "load_scheduler_config",
    "load_vae",
    "ORIGINAL",
    "check_state_dict_shapes",
    "detect_layout",
    "diffusers_to_original_name",
    "keeps_fp32",
    "load_pretrained",
    "load_transformer",
    "original_to_diffusers_name",
    "read_checkpoint_shapes",
    "save_transformer",
]

ORIGINAL = "original"
DIFFUSERS = "diffusers"
LAYOUTS = (ORIGINAL, DIFFUSERS)
PROBE_KEYS = dict(TENSOR_NAME_PROBES)
assert tuple(PROBE_KEYS) == LAYOUTS

CONFIG_NAME = "config.json"
WEIGHTS_NAME = f"{DIFFUSERS_WEIGHTS_PREFIX}.safetensors"
INDEX_NAME = f"{DIFFUSERS_WEIGHTS_PREFIX}.safetensors.index.json"
WEIGHTS_PREFIXES = (DIFFUSERS_WEIGHTS_PREFIX, PLAIN_WEIGHTS_PREFIX)
# `config.json` formats `save_transformer` writes: diffusers' (this model's keys), the authors'
# WanModelFast keys (v2 14B's native `transformers/`), or none (the v2 1.3B release)
CONFIG_FORMATS = ("diffusers", "native", None)
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# (original module path, diffusers module path); a name maps when it equals a path or continues it with ".".
_TOP_LEVEL_NAMES = (
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
)
_BLOCK_NAMES = (
    ("modulation", "scale_shift_table"),
    *(
        (f"{orig}.{src}", f"{new}.{dst}")
        for orig, new in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for src, dst in (
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("o", "to_out.0"),
            ("norm_q", "norm_q"),
            ("norm_k", "norm_k"),
        )
    ),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    # The trap: the original's norm3 (affine, before cross-attention) is diffusers' norm2, and back.
    ("norm3", "norm2"),
    ("norm2", "norm3"),
)
_BLOCK_PREFIX = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _rename(name: str, table: Sequence[tuple[str, str]], reverse: bool) -> str | None:
    for orig, new in table:
        src, dst = (new, orig) if reverse else (orig, new)
        if name == src:
            return dst
        if name.startswith(src + "."):
            return dst + name[len(src) :]
    return None


def _convert_name(name: str, reverse: bool) -> str:
    match = _BLOCK_PREFIX.match(name)
    if match is not None:
        renamed = _rename(match.group(2), _BLOCK_NAMES, reverse)
        return name if renamed is None else match.group(1) + renamed
    renamed = _rename(name, _TOP_LEVEL_NAMES, reverse)
    # Camera tensors, patch_embedding and unknown names keep their name; unknown ones then fail the strict check.
    return name if renamed is None else renamed


def original_to_diffusers_name(name: str) -> str:
    """`blocks.3.self_attn.o.weight` → `blocks.3.attn1.to_out.0.weight`; camera names unchanged."""
    return _convert_name(name, reverse=False)


def diffusers_to_original_name(name: str) -> str:
    """Inverse of `original_to_diffusers_name`."""
    return _convert_name(name, reverse=True)


def to_model_name(name: str, layout: str) -> str:
    """A name in `layout` → the model's (diffusers) name."""
    _check_layout(layout)
    return original_to_diffusers_name(name) if layout == ORIGINAL else name


def from_model_name(name: str, layout: str) -> str:
    """The model's (diffusers) name → its name in `layout`."""
    _check_layout(layout)
    return diffusers_to_original_name(name) if layout == ORIGINAL else name


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def detect_layout(names: Iterable[str]) -> str:
    """`"original"` or `"diffusers"`, from the probe key present among `names`."""
    return tensor_naming(names)


def keeps_fp32(model_name: str, patterns: Sequence[str] | None) -> bool:
    """diffusers' rule: a tensor stays fp32 when any `_keep_in_fp32_modules` entry is a substring of its name."""
    return bool(patterns) and any(pattern in model_name for pattern in patterns)


def check_state_dict_shapes(
    expected: Mapping[str, Sequence[int]],
    found: Mapping[str, Sequence[int]],
    *,
    layout: str = DIFFUSERS,
) -> None:
    """Strict check of model-named shapes; the ValueError names every missing, unexpected and mismatched tensor.

    Names in the message are given in `layout` (the checkpoint's), with the model's name where it differs.
    """

    def show(model_name: str) -> str:
        disk_name = from_model_name(model_name, layout)
        return disk_name if disk_name == model_name else f"{disk_name} (model: {model_name})"

    check_names_and_shapes(expected, found, what=f"checkpoint ({layout} layout)", show=show)


def check_checkpoint_against_model(model: torch.nn.Module, shapes: Mapping[str, Sequence[int]]) -> str:
    """Detect the layout of on-disk `shapes` (name → shape), convert, check strictly; returns the layout."""
    layout = detect_layout(shapes)
    converted: dict[str, Sequence[int]] = {}
    for name, shape in shapes.items():
        model_name = to_model_name(name, layout)
        if model_name in converted:
            raise ValueError(f"two checkpoint tensors map to {model_name!r} (one of them is {name!r})")
        converted[model_name] = shape
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_state_dict_shapes(expected, converted, layout=layout)
    return layout


# ---------------------------------------------------------------------------------------- files


def _files(source: str | os.PathLike | TransformerFiles) -> TransformerFiles:
    return source if isinstance(source, TransformerFiles) else transformer_files(source)


def checkpoint_files(source: str | os.PathLike | TransformerFiles) -> dict[str, Path]:
    """Tensor name → safetensors file of a transformer (a folder of any layout, or its `TransformerFiles`)."""
    return _files(source).tensor_files()


def read_checkpoint_shapes(source: str | os.PathLike | TransformerFiles) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors headers only (no tensor data is read)."""
    return _files(source).shapes()


def load_transformer(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
) -> CausalLingBotWorldTransformer3DModel:
    r"""
    Build the transformer from `folder/config.json` on the meta device and materialise it from the
    safetensors in `folder` (either layout, sharded or single file).

    `CausalLingBotWorldTransformer3DModel.from_pretrained` loads through the same code (:func:`load_pretrained`).

    Args:
        folder: The transformer folder, a pipeline folder with a `transformer` subfolder, or a
            checkpoint folder of any layout `lingbot_ray.checkpoint.read_checkpoint_layout` knows
            (LingBot World 2.0's native `transformers/`, the 1.3B's config-less release).
        dtype: Target dtype of floating tensors; `_keep_in_fp32_modules` stay float32.
        device: Where the tensors end up.

    Raises:
        ValueError: naming every missing / unexpected tensor and every shape mismatch, before any data is read.
    """
    return _load_files(CausalLingBotWorldTransformer3DModel, transformer_files(folder), dtype=dtype, device=device)


def _load_files(
    model_class: type[CausalLingBotWorldTransformer3DModel],
    source: TransformerFiles,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> CausalLingBotWorldTransformer3DModel:
    """The one load path: meta skeleton, strict header check, shard-by-shard assignment, no meta tensor left."""
    folder = source.folder
    # 1. Model skeleton without memory, from the config the files come with (or were given)
    with torch.device("meta"):
        model = model_class.from_config(dict(source.config))

    # 2. Strict name/shape check from the headers
    files = source.tensor_files()
    layout = check_checkpoint_against_model(model, source.shapes())
    logger.info("loading %d tensors (%s layout) from %s; config: %s", len(files), layout, folder, source.config_source)

    # 3. Stream shard by shard, assigning as we go so at most one shard is in flight
    fp32_patterns = model._keep_in_fp32_modules
    for shard in sorted(set(files.values())):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(shard, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                model_name = to_model_name(name, layout)
                # copy=True: owned, freshly allocated memory. A tensor read from the file can sit at an
                # address that sends some CPUs' kernels down another SIMD path (measured on an AMD EPYC:
                # the same weights gave outputs 4e-7 apart), so a loaded model would not reproduce the
                # saved one bit for bit.
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point():
                    target = torch.float32 if keeps_fp32(model_name, fp32_patterns) else dtype
                    tensor = tensor.to(device=device, dtype=target, copy=True)
                else:
                    tensor = tensor.to(device=device, copy=True)
                tensors[model_name] = tensor
        model.load_state_dict(tensors, strict=False, assign=True)
        logger.debug("assigned %d tensors from %s", len(tensors), shard.name)
        del tensors

    # 4. Parameters and buffers, persistent or not: none may stay on the meta device
    still_meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ValueError(f"{str(folder)!r} left {len(still_meta)} tensors on the meta device: {', '.join(still_meta)}")
    return model.eval()


# diffusers' `from_pretrained` keywords this loader has no use for: accepted at these values (what a
# caller passing everything along sends), refused otherwise rather than silently ignored.
_PRETRAINED_DEFAULTS: dict[str, object] = {
    "cache_dir": None,
    "force_download": False,
    "proxies": None,
    "token": None,
    "revision": None,
    "variant": None,
    "device_map": None,
    "max_memory": None,
    "offload_folder": None,
    "quantization_config": None,
    "output_loading_info": False,
    "ignore_mismatched_sizes": False,
    "parallel_config": None,
    "use_flashpack": False,
}
# Keywords that cannot change what a local, meta-built, strict load returns: accepted with any value.
_PRETRAINED_IGNORED = frozenset({"local_files_only", "low_cpu_mem_usage", "disable_mmap", "offload_state_dict"})


def load_pretrained(
    model_class: type[CausalLingBotWorldTransformer3DModel],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    **kwargs: object,
) -> CausalLingBotWorldTransformer3DModel:
    r"""
    `CausalLingBotWorldTransformer3DModel.from_pretrained`: diffusers' arguments onto :func:`load_transformer`'s path.

    Args:
        pretrained_model_name_or_path: A local folder: the transformer folder, or a checkpoint folder together
            with `subfolder="transformer"` (a checkpoint folder alone also resolves to its DiT, in every
            layout `lingbot_ray.checkpoint.read_checkpoint_layout` knows).
        subfolder: Folder inside `pretrained_model_name_or_path` that holds `config.json`.
        torch_dtype: Floating dtype of the weights (default float32, as diffusers); `_keep_in_fp32_modules`
            stay float32 either way. `dtype` is its newer diffusers spelling.
        device: Where the tensors end up (instead of `device_map`).
        kwargs: diffusers' other keywords, accepted only where they change nothing (e.g. `revision=None`).

    Raises:
        ValueError: for a path that is not a local folder (no Hub downloads here), an unsupported keyword or
            value, and a checkpoint that does not match the config (naming the tensors).
    """
    if kwargs.pop("use_safetensors", None) is False:
        raise ValueError("use_safetensors=False is not supported: this loader reads safetensors only")
    unknown = sorted(set(kwargs) - set(_PRETRAINED_DEFAULTS) - _PRETRAINED_IGNORED)
    if unknown:
        raise ValueError(f"from_pretrained got unsupported keyword arguments: {', '.join(unknown)}")
    for key, value in kwargs.items():
        if key in _PRETRAINED_DEFAULTS and value is not _PRETRAINED_DEFAULTS[key]:
            hint = "; pass device= instead" if key == "device_map" else ""
            raise ValueError(f"from_pretrained does not support {key}={value!r}{hint}")

    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    target = dtype if dtype is not None else torch_dtype if torch_dtype is not None else torch.float32
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise ValueError(f"torch_dtype={target!r}: expected a floating torch.dtype such as torch.bfloat16")

    if not isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        raise ValueError(f"{pretrained_model_name_or_path!r}: expected a local folder path")
    if subfolder is not None and not isinstance(subfolder, str):
        raise ValueError(f"subfolder={subfolder!r}: expected a string")
    folder = Path(pretrained_model_name_or_path) / (subfolder or "")
    if not folder.is_dir():
        raise ValueError(
            f"{str(folder)!r} is not a local folder: {model_class.__name__}.from_pretrained loads only local "
            "folders (Hugging Face Hub ids are not downloaded here)"
        )
    return _load_files(model_class, transformer_files(folder), dtype=target, device=device)


def save_transformer(
    model: CausalLingBotWorldTransformer3DModel,
    folder: str | os.PathLike,
    *,
    layout: str = ORIGINAL,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    weights_prefix: str = DIFFUSERS_WEIGHTS_PREFIX,
    config_format: str | None = "diffusers",
) -> Path:
    r"""
    Write `config.json` and the weights like the published checkpoint: one `diffusion_pytorch_model.safetensors`
    when everything fits in `max_shard_bytes`, else `diffusion_pytorch_model-000NN-of-000MM.safetensors`
    shards plus `diffusion_pytorch_model.safetensors.index.json`.

    Args:
        model: The transformer to save (tensors are written in their current dtype).
        folder: Target folder, created if needed; weight files (and `config.json`) of an earlier save there are replaced.
        layout: `"original"` (like the published checkpoints) or `"diffusers"` tensor names.
        max_shard_bytes: Largest shard; a single larger tensor gets a shard of its own.
        weights_prefix: `"diffusion_pytorch_model"`, or `"model"` as the v2 1.3B release names its files
            (`model.safetensors.index.json`, `model-000NN-of-000MM.safetensors`).
        config_format: `"diffusers"` (this model's keys), `"native"` (the authors' WanModelFast keys, as
            in v2 14B's `transformers/config.json`) or None (no `config.json`, as the v2 1.3B release).

    Returns:
        The folder.
    """
    _check_layout(layout)
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if weights_prefix not in WEIGHTS_PREFIXES:
        raise ValueError(f"weights_prefix={weights_prefix!r}: must be one of {WEIGHTS_PREFIXES}")
    if config_format not in CONFIG_FORMATS:
        raise ValueError(f"config_format={config_format!r}: must be one of {CONFIG_FORMATS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale_names = {CONFIG_NAME} | {name for p in WEIGHTS_PREFIXES for name in (f"{p}.safetensors", f"{p}.safetensors.index.json")}
    shard_pattern = re.compile(rf"^({'|'.join(WEIGHTS_PREFIXES)})-\d{{5}}-of-\d{{5}}\.safetensors$")
    for stale in folder.iterdir():
        if stale.name in stale_names or shard_pattern.match(stale.name):
            stale.unlink()

    # 1. Config
    if config_format == "diffusers":
        model.save_config(folder)
    elif config_format == "native":
        (folder / CONFIG_NAME).write_text(json.dumps(native_config(model.config), indent=2) + "\n")

    # 2. Group tensors into shards in state-dict order
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total_bytes = 0
    for model_name, tensor in model.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][from_model_name(model_name, layout)] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
        total_bytes += size

    # 3. Files (+ index when sharded)
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{weights_prefix}.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            shard_name = f"{weights_prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / shard_name), metadata={"format": "pt"})
            weight_map.update({name: shard_name for name in shard})
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / f"{weights_prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    logger.info("saved %d tensors (%s layout, %d file(s)) to %s", sum(map(len, shards)), layout, len(shards), folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Components of a checkpoint folder


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 where it is fast (CUDA), fp32 on CPU where bf16 matmuls are slow and tests want exactness."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_dit(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype):
    """The checkpoint's causal DiT (its ``transformer`` component, wherever its layout keeps it, with
    ``lingbot_ray.json``'s streaming settings), in eval mode without gradients."""
    read_model_index(checkpoint).component_folder("transformer")
    files = transformer_files(checkpoint)
    logger.info(
        "loading transformer of %s from %s (dtype=%s, device=%s)",
        read_checkpoint_layout(checkpoint).describe(), files.folder, dtype, device,
    )
    model = _load_files(CausalLingBotWorldTransformer3DModel, files, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def random_dit(
    config: Mapping[str, Any], *, device: str | torch.device = "cpu", dtype: torch.dtype, seed: int = 0
) -> CausalLingBotWorldTransformer3DModel:
    """A causal DiT of ``config`` with random weights, made on ``device`` without a host copy (the
    full-size model in seconds on a GPU): the load path's meta skeleton and dtype rule
    (``_keep_in_fp32_modules``), then every matrix drawn N(0, 1/fan_in), the modulation tables
    N(0, 1/dim), norm scales 1 and biases 0. For speed and memory checks, never for pictures."""
    with torch.device("meta"):
        model = CausalLingBotWorldTransformer3DModel.from_config(dict(config))
    fp32_patterns = model._keep_in_fp32_modules
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = param.data.to(torch.float32 if keeps_fp32(name, fp32_patterns) else dtype)
            if name.endswith("scale_shift_table"):
                param.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            elif param.ndim >= 2:
                param.normal_(0.0, math.prod(param.shape[1:]) ** -0.5, generator=generator)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    still_meta = [name for name, t in model.named_buffers() if t.is_meta]
    if still_meta:
        raise ValueError(f"random_dit left buffers on the meta device: {', '.join(still_meta)}")
    return model.eval().requires_grad_(False)


def load_vae(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The Wan VAE wrapped for streaming decode (per-session caches live outside the module)."""
    from .vae_streaming import StreamingWanVAE  # model code per loader: a stage pulls in only what it runs

    sub = read_model_index(checkpoint).component_folder("vae")
    logger.info("loading vae from %s (dtype=%s, device=%s)", sub, dtype, device)
    return StreamingWanVAE.from_pretrained(sub, subfolder=None, dtype=dtype, device=device)


def load_prompt_encoder(checkpoint: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """UMT5 encoder + tokenizer as a prompt → embeddings function with its own small cache."""
    from .text_encoder import PromptEncoder

    index = read_model_index(checkpoint)
    text_encoder, tokenizer = index.component_folder("text_encoder"), index.component_folder("tokenizer")
    # PromptEncoder reads both from one folder: the checkpoint's own, or its shared_components
    assert text_encoder.parent == tokenizer.parent, (text_encoder, tokenizer)
    logger.info("loading text encoder from %s (dtype=%s, device=%s)", text_encoder.parent, dtype, device)
    return PromptEncoder.from_pretrained(text_encoder.parent, dtype=dtype, device=device)


def load_scheduler_config(checkpoint: str | os.PathLike) -> dict:
    """The scheduler's config through diffusers (the DMD sampler uses its ``num_train_timesteps``)."""
    from diffusers import UniPCMultistepScheduler

    sub = read_model_index(checkpoint).component_folder("scheduler")
    return dict(UniPCMultistepScheduler.from_pretrained(sub).config)
