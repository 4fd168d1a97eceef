"""Loading the components of a diffusers-style LingBot World checkpoint folder.

The folder is what the published checkpoints ship (MODEL.md, "Folder layout")::

    model_index.json       _class_name LingBotWorldCausalDMDPipeline + one [library, class] per component
    transformer/           CausalLingBotWorldTransformer3DModel (sharded safetensors, original names)
    vae/                   AutoencoderKLWan
    text_encoder/          UMT5EncoderModel
    tokenizer/             T5TokenizerFast
    scheduler/             UniPCMultistepScheduler config (only num_train_timesteps is used)
    lingbot_ray.json       optional: this project's serving defaults (size, fps, DMD schedule)

Each serving stage loads only its own components (the text stage never touches the transformer),
so every component has its own loader; :func:`load_pipeline` loads several at once. Everything goes
through :func:`read_model_index` first, which checks the index and names the offending key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MODEL_INDEX_FILE = "model_index.json"
SERVING_DEFAULTS_FILE = "lingbot_ray.json"
PIPELINE_CLASS_NAME = "LingBotWorldCausalDMDPipeline"

# component -> (library, class) as the published model_index.json names them
EXPECTED_COMPONENTS: dict[str, tuple[str, str]] = {
    "transformer": ("diffusers", "CausalLingBotWorldTransformer3DModel"),
    "vae": ("diffusers", "AutoencoderKLWan"),
    "text_encoder": ("transformers", "UMT5EncoderModel"),
    "tokenizer": ("transformers", "T5TokenizerFast"),
    "scheduler": ("diffusers", "UniPCMultistepScheduler"),
}
# present in the published index with a null value; this pipeline has no use for them
NULL_COMPONENTS = ("transformer_2", "image_encoder", "image_processor")
ALL_MODEL_COMPONENTS = ("transformer", "vae", "text_encoder")


class ComponentMissingError(FileNotFoundError):
    """A component folder named by ``model_index.json`` is not in the checkpoint folder."""


@dataclass(frozen=True)
class ModelIndex:
    """A checked ``model_index.json``: the folder and each used component's (library, class)."""

    folder: Path
    class_name: str
    components: dict[str, tuple[str, str]]
    diffusers_version: str | None = None

    def component_folder(self, name: str) -> Path:
        if name not in self.components:
            raise ValueError(f"component={name!r}: not one of {sorted(self.components)}")
        path = self.folder / name
        if not path.is_dir():
            raise ComponentMissingError(
                f"checkpoint {str(self.folder)!r} has no {name!r} folder, which model_index.json "
                f"names ({self.components[name][0]}.{self.components[name][1]})"
            )
        return path

    def check_folders(self, names: tuple[str, ...] | None = None) -> None:
        for name in names if names is not None else tuple(self.components):
            self.component_folder(name)


@dataclass(frozen=True)
class ServingDefaults:
    """Serving defaults of a checkpoint, read from the optional ``lingbot_ray.json``.

    Without the file these are LingBot World fast v1's: 832x480 at 16 fps, DMD indices
    [0, 179, 358, 679] at shift 10 (see :mod:`lingbot_ray.engine.sampler` for the source).
    """

    width: int = 832
    height: int = 480
    fps: float = 16.0
    num_frames: int = 12
    timestep_indices: tuple[int, ...] = (0, 179, 358, 679)
    shift: float = 10.0
    served_model_name: str | None = None
    # Focal length in pixels at ``width``, scaled with the frame width at other sizes (same field of
    # view). None: 500 px at any size, the value MODEL.md gives for the real model at 832x480.
    camera_focal: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _as_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not valid JSON ({exc})") from exc


def read_model_index(folder: str | Path) -> ModelIndex:
    """Read and check ``model_index.json``: the pipeline class, every used component's library and
    class, and that the unused ones are null. Component folders are checked when loaded."""
    root = _as_folder(folder)
    index_path = root / MODEL_INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"checkpoint folder {str(root)!r} has no {MODEL_INDEX_FILE}")
    raw = _read_json(index_path)
    if not isinstance(raw, dict):
        raise ValueError(f"{MODEL_INDEX_FILE}: must hold a JSON object, got {type(raw).__name__}")
    class_name = raw.get("_class_name")
    if class_name != PIPELINE_CLASS_NAME:
        raise ValueError(
            f"{MODEL_INDEX_FILE} _class_name={class_name!r}: expected {PIPELINE_CLASS_NAME!r}"
        )
    components: dict[str, tuple[str, str]] = {}
    for name, expected in EXPECTED_COMPONENTS.items():
        entry = raw.get(name)
        if entry is None:
            raise ValueError(f"{MODEL_INDEX_FILE} {name}={entry!r}: expected {list(expected)!r}")
        if not isinstance(entry, list) or len(entry) != 2 or tuple(entry) != expected:
            raise ValueError(f"{MODEL_INDEX_FILE} {name}={entry!r}: expected {list(expected)!r}")
        components[name] = expected
    for name in NULL_COMPONENTS:
        entry = raw.get(name)
        if entry is not None and entry != [None, None]:
            raise ValueError(
                f"{MODEL_INDEX_FILE} {name}={entry!r}: this pipeline uses no {name}; expected null"
            )
    version = raw.get("_diffusers_version")
    return ModelIndex(root, class_name, components, version if isinstance(version, str) else None)


def read_serving_defaults(folder: str | Path) -> ServingDefaults:
    """Serving defaults from ``lingbot_ray.json`` if present (unknown keys are an error)."""
    path = _as_folder(folder) / SERVING_DEFAULTS_FILE
    if not path.is_file():
        return ServingDefaults()
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{SERVING_DEFAULTS_FILE}: must hold a JSON object")
    known = {f.name for f in fields(ServingDefaults)} - {"extra"}
    unknown = sorted(set(raw) - known - {"_comment"})
    if unknown:
        raise ValueError(f"{SERVING_DEFAULTS_FILE} keys={unknown!r}: unknown; known are {sorted(known)}")
    values = {k: v for k, v in raw.items() if k in known}
    if "timestep_indices" in values:
        values["timestep_indices"] = tuple(int(i) for i in values["timestep_indices"])
    defaults = ServingDefaults(**values)
    for name in ("width", "height", "num_frames"):
        value = getattr(defaults, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{SERVING_DEFAULTS_FILE} {name}={value!r}: must be an integer >= 1")
    focal = defaults.camera_focal
    if focal is not None and (isinstance(focal, bool) or not isinstance(focal, (int, float)) or not focal > 0):
        raise ValueError(f"{SERVING_DEFAULTS_FILE} camera_focal={focal!r}: must be a positive number or null")
    return defaults


def read_component_config(folder: str | Path, component: str) -> dict[str, Any]:
    """A component's ``config.json`` (or ``scheduler_config.json``), without loading weights."""
    index = read_model_index(folder)
    sub = index.component_folder(component)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = sub / name
    if not path.is_file():
        raise ComponentMissingError(f"component folder {str(sub)!r} has no {name}")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{component}/{name}: must hold a JSON object")
    return config


def load_transformer(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype):
    """The causal DiT, through the project's strict sharded loader (either name layout on disk)."""
    # model code is imported per loader so that a stage pulls in only what it runs
    from . import loading

    index = read_model_index(folder)
    sub = index.component_folder("transformer")
    logger.info("loading transformer from %s (dtype=%s, device=%s)", sub, dtype, device)
    model = loading.load_transformer(sub, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def load_vae(folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The Wan VAE wrapped for streaming decode (per-session caches live outside the module)."""
    from .vae_streaming import StreamingWanVAE

    index = read_model_index(folder)
    sub = index.component_folder("vae")
    logger.info("loading vae from %s (dtype=%s, device=%s)", sub, dtype, device)
    return StreamingWanVAE.from_pretrained(sub, subfolder=None, dtype=dtype, device=device)


def load_prompt_encoder(
    folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """UMT5 encoder + tokenizer as a prompt → embeddings function with its own small cache."""
    from .text_encoder import PromptEncoder

    index = read_model_index(folder)
    index.check_folders(("text_encoder", "tokenizer"))
    logger.info("loading text encoder from %s (dtype=%s, device=%s)", index.folder, dtype, device)
    return PromptEncoder.from_pretrained(index.folder, dtype=dtype, device=device)


def load_scheduler_config(folder: str | Path) -> dict[str, Any]:
    """The scheduler's config through diffusers (the DMD sampler uses its ``num_train_timesteps``)."""
    from diffusers import UniPCMultistepScheduler

    index = read_model_index(folder)
    sub = index.component_folder("scheduler")
    return dict(UniPCMultistepScheduler.from_pretrained(sub).config)


@dataclass
class LingBotWorldPipeline:
    """Loaded components of one checkpoint; a component not asked for is ``None``."""

    index: ModelIndex
    defaults: ServingDefaults
    scheduler_config: dict[str, Any]
    transformer: Any = None
    vae: Any = None
    prompt_encoder: Any = None


def load_pipeline(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    text_dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    components: tuple[str, ...] = ALL_MODEL_COMPONENTS,
) -> LingBotWorldPipeline:
    """Load the named model components (``transformer``, ``vae``, ``text_encoder``).

    ``dtype`` (transformer) and ``text_dtype`` default to bf16 on CUDA and fp32 elsewhere.
    """
    unknown = sorted(set(components) - set(ALL_MODEL_COMPONENTS))
    if unknown:
        raise ValueError(f"components={components!r}: unknown {unknown}; known {ALL_MODEL_COMPONENTS}")
    index = read_model_index(folder)
    index.check_folders()
    dtype = dtype or default_dtype(device)
    text_dtype = text_dtype or default_dtype(device)
    return LingBotWorldPipeline(
        index=index,
        defaults=read_serving_defaults(folder),
        scheduler_config=load_scheduler_config(folder),
        transformer=load_transformer(folder, device=device, dtype=dtype) if "transformer" in components else None,
        vae=load_vae(folder, device=device, dtype=vae_dtype) if "vae" in components else None,
        prompt_encoder=(
            load_prompt_encoder(folder, device=device, dtype=text_dtype)
            if "text_encoder" in components
            else None
        ),
    )


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 where it is fast (CUDA), fp32 on CPU where bf16 matmuls are slow and tests want exactness."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
