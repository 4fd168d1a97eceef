"""What a checkpoint folder says about itself, read without torch: the facts every process needs
(the ingress too, which never loads a model).

A checkpoint folder has one of four layouts, told apart by the files in it, never by its name
(docs/MODEL.md, "Checkpoint folder" and "LingBot World 2.0")::

    diffusers     model_index.json at the root (LingBot World fast; v2 14B's -diffusers repo):
      model_index.json   _class_name LingBotWorldCausalDMDPipeline + one [library, class] per component
      transformer/       CausalLingBotWorldTransformer3DModel (sharded safetensors, either name layout)
      vae/               AutoencoderKLWan
      text_encoder/      UMT5EncoderModel
      tokenizer/         T5TokenizerFast
      scheduler/         UniPCMultistepScheduler config (only num_train_timesteps is used)
    native        the authors' v2 14B folder: the DiT in transformers/ (config.json with the
                  authors' WanModelFast keys + diffusion_pytorch_model shards)
    dit-only      the v2 1.3B release: model.safetensors.index.json + model-*.safetensors at the
                  root and no config.json (the config is derived from the tensor shapes)
    transformer   a transformer folder: config.json + diffusion_pytorch_model safetensors

Each may hold ``lingbot_ray.json``: this project's serving defaults (size, fps, DMD schedule, ...),
the model version where the files cannot tell it, and for the layouts that hold only a DiT the
folder the text encoder, tokenizer, VAE and scheduler come from (``shared_components``).

Here: finding the folder (``embedded:NAME`` or a path), its layout and model version, checking
``model_index.json``, the serving defaults, each component's config, and the :class:`ModelGeometry`
those configs imply. Loading weights is :mod:`lingbot_ray.models.loading`'s job.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .protocol import SessionDefaults, parse_size

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"

# The models lingbot_ray knows. They share one architecture; their sizes come from the files, and
# what else differs is in MODEL_SERVING_DEFAULTS below (docs/MODEL.md, "LingBot World 2.0").
V1 = "v1"  # LingBot World fast (robbyant/lingbot-world-fast-diffusers)
V2_14B = "v2-14b"  # LingBot World 2.0 14B causal-fast
V2_1P3B = "v2-1.3b"  # LingBot World 2.0 1.3B causal-fast
MODEL_VERSIONS = (V1, V2_14B, V2_1P3B)

# LingBot World fast v1's DMD schedule: indices into the 1000-step schedule, and its shift
# (docs/MODEL.md, "Timesteps", says where they come from)
V1_TIMESTEP_INDICES = (0, 179, 358, 679)
V1_SHIFT = 10.0
# LingBot World 2.0's as the reference server runs it (SGLang's LingBotWorldV2CausalDMDConfig:
# dmd_denoising_steps [1000, 750, 500, 250] with warp_denoising_step, flow_shift 5.0). The authors'
# script uses the same indices at shift 10; docs/MODEL.md, "LingBot World 2.0", says why 5 is the default.
V2_TIMESTEP_INDICES = (0, 250, 500, 750)
V2_SHIFT = 5.0
# What the model is given as its timestep: "float" (the reference server) or "int" (the authors'
# offline script); docs/MODEL.md, "Timesteps"
TIMESTEP_FORMATS = ("float", "int")

MODEL_INDEX_FILE = "model_index.json"
SERVING_DEFAULTS_FILE = "lingbot_ray.json"
# A checkpoint's own tiny decoder, optional (vae.decoder: tiny; docs/MODEL.md, "Tiny decoder")
TINY_DECODER_FOLDER = "tiny_decoder"
TRANSFORMER_CONFIG_FILE = "config.json"
PIPELINE_CLASS_NAME = "LingBotWorldCausalDMDPipeline"

# Folder layouts (module docstring)
LAYOUT_DIFFUSERS = "diffusers"
LAYOUT_NATIVE = "native"
LAYOUT_DIT_ONLY = "dit-only"
LAYOUT_TRANSFORMER = "transformer"
# The authors' v2 code loads the fast DiT from this subfolder (wan/configs: fast_checkpoint = 'transformers')
NATIVE_DIT_FOLDER = "transformers"
# Safetensors file families by prefix (PREFIX.safetensors, or PREFIX.safetensors.index.json + shards):
# diffusers' name, and the plain one of the v2 1.3B release
DIFFUSERS_WEIGHTS_PREFIX = "diffusion_pytorch_model"
PLAIN_WEIGHTS_PREFIX = "model"
WEIGHTS_PREFIXES = (DIFFUSERS_WEIGHTS_PREFIX, PLAIN_WEIGHTS_PREFIX)

# Streaming geometry of a transformer whose files do not give it. A 14B's: its diffusers
# transformer/config.json (v1 and v2 ship the same values, which the reference server runs). The
# authors' native transformers/config.json has no num_frames_per_block, and the authors' generator
# replaces its sink/window values at load, so they are not read.
REFERENCE_STREAMING: dict[str, int] = {"num_frames_per_block": 3, "sink_size": 9, "sliding_window_num_frames": 18}
# The 1.3B release has no config: blocks of 4 latent frames, sink 6, window 18 is what every public
# run of it uses (the authors' generate.py chunk default with run_fast.sh's --sink_size 6
# --local_attn_size 18; NVIDIA flashdreams' 1.3B preset; a community diffusers repackaging's config).
V2_1P3B_STREAMING: dict[str, int] = {"num_frames_per_block": 4, "sink_size": 6, "sliding_window_num_frames": 18}
# Attention heads of the 1.3B: not recoverable from tensor shapes and not published; 12 heads of
# 128 is what every third-party implementation assumes. lingbot_ray.json num_attention_heads overrides it.
V2_1P3B_ASSUMED_HEADS = 12
# The authors' WanModelFast (v1 and v2): rope_params(1024, ...) positions per axis, norm epsilon 1e-6
AUTHORS_ROPE_POSITIONS = 1024
AUTHORS_EPS = 1e-6

# The two tensor-name layouts of a transformer's safetensors (lingbot_ray.models.loading maps one
# onto the other), each told by one probe key
TENSOR_NAME_PROBES: dict[str, str] = {"original": "blocks.0.self_attn.q.weight", "diffusers": "blocks.0.attn1.to_q.weight"}
# The tensors whose shapes give a transformer's sizes: (original name, diffusers name)
_SIZE_TENSORS: dict[str, tuple[str, str]] = {
    "patch_embedding": ("patch_embedding.weight", "patch_embedding.weight"),  # [dim, in, p_t, p_h, p_w]
    "text_embedding": ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight"),  # [dim, text]
    "time_embedding": ("time_embedding.0.weight", "condition_embedder.time_embedder.linear_1.weight"),  # [dim, freq]
    "ffn": ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight"),  # [ffn, dim]
    "head": ("head.head.weight", "proj_out.weight"),  # [out * p_t * p_h * p_w, dim]
}
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")

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
    """A component the checkpoint needs is not there: a folder named by ``model_index.json``, or
    every component but the DiT of a checkpoint that holds only a DiT and names no ``shared_components``."""


class CheckpointLayoutError(ValueError):
    """A folder that has none of the checkpoint layouts lingbot_ray knows."""


_WIRE = SessionDefaults()  # the protocol's defaults (docs/PROTOCOL.md): a checkpoint without lingbot_ray.json serves these
_WIRE_WIDTH, _WIRE_HEIGHT = parse_size(_WIRE.size)


@dataclass(frozen=True)
class ServingDefaults:
    """Serving defaults of a checkpoint: its model's (:data:`MODEL_SERVING_DEFAULTS`), with what the
    optional ``lingbot_ray.json`` sets on top.

    Without the file a v1 checkpoint gets LingBot World fast's as the reference server runs it:
    832x480 at 16 fps, DMD indices [0, 179, 358, 679] at shift 10 with float timesteps, 500 px focal
    at every size; a v2 one the v2 schedule (docs/MODEL.md, "lingbot_ray.json").
    """

    width: int = _WIRE_WIDTH
    height: int = _WIRE_HEIGHT
    fps: float = _WIRE.fps
    num_frames: int = 12
    timestep_indices: tuple[int, ...] = V1_TIMESTEP_INDICES
    shift: float = V1_SHIFT
    timestep_format: str = TIMESTEP_FORMATS[0]
    served_model_name: str | None = None
    # Focal length in pixels at ``width`` x ``height``, resized per axis to other sizes (the authors'
    # rule). None: 500 px at every size (the reference server's). docs/MODEL.md, "Camera actions".
    camera_focal: float | None = None
    # Which model the checkpoint is, one of MODEL_VERSIONS, where its files cannot tell: a diffusers
    # folder is v1 unless this says otherwise (v1's and v2 14B's are alike file for file).
    model_version: str | None = None
    # For a checkpoint that holds only a DiT (the native and dit-only layouts): a diffusers LingBot
    # World checkpoint folder whose text encoder, tokenizer, VAE and scheduler it uses; a relative
    # path is relative to the checkpoint folder.
    shared_components: str | None = None
    # Attention heads of a transformer without config.json (the 1.3B release); None: 12, assumed.
    num_attention_heads: int | None = None
    # Over the transformer config's num_frames_per_block / sink_size / sliding_window_num_frames
    # (e.g. the authors' 4 / 6 / 18 for the v2 14B); None: the config's.
    num_frames_per_block: int | None = None
    sink_size: int | None = None
    window_frames: int | None = None
    # What decodes the DiT's latents where vae.decoder is not set: one of engine.fastpath.DECODERS
    # (tiny: the checkpoint's tiny_decoder/ folder); None: wan. docs/MODEL.md, "Tiny decoder".
    decoder: str | None = None
    # Latent frames of the first-frame condition that are encoded; every later latent frame repeats the
    # last one. None: until the VAE encoder's fixed point (the model's own rule). docs/MODEL.md,
    # "First-frame condition".
    condition_frames: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def focal_at_size(self) -> tuple[float, int, int] | None:
        """``camera_focal`` with the size it is given at, as ``control.camera.Intrinsics.for_frame`` takes it."""
        return None if self.camera_focal is None else (float(self.camera_focal), self.width, self.height)


# Each model's defaults without a lingbot_ray.json. v2: the reference server's schedule for both sizes
# (nobody serves the 1.3B with another one: flashdreams' 1.3B preset uses it too); the 1.3B's
# num_frames is its one block of 4 latent frames. Size and fps are v1's: the authors' v2 README and
# run_fast.sh show 480*832, sample_fps is 16 in their shared config and in SGLang's sampling params.
MODEL_SERVING_DEFAULTS: dict[str, ServingDefaults] = {
    V1: ServingDefaults(),
    V2_14B: ServingDefaults(timestep_indices=V2_TIMESTEP_INDICES, shift=V2_SHIFT),
    V2_1P3B: ServingDefaults(timestep_indices=V2_TIMESTEP_INDICES, shift=V2_SHIFT, num_frames=16),
}


def _as_folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    return path


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """``path`` as a JSON object; errors name it as ``what``."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: must hold a JSON object, got {type(raw).__name__}")
    return raw


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_settings(root: Path) -> dict[str, Any]:
    """``lingbot_ray.json`` of ``root`` ({} without one): known keys only, each value checked."""
    path = root / SERVING_DEFAULTS_FILE
    if not path.is_file():
        return {}
    raw = _read_json_object(path, SERVING_DEFAULTS_FILE)
    known = {f.name for f in fields(ServingDefaults)} - {"extra"}
    unknown = sorted(set(raw) - known - {"_comment"})
    if unknown:
        raise ValueError(f"{SERVING_DEFAULTS_FILE} keys={unknown!r}: unknown; known are {sorted(known)}")
    values = {k: v for k, v in raw.items() if k in known}

    def fail(name: str, rule: str) -> ValueError:
        return ValueError(f"{SERVING_DEFAULTS_FILE} {name}={values[name]!r}: {rule}")

    if "timestep_indices" in values:
        values["timestep_indices"] = tuple(int(i) for i in values["timestep_indices"])
    for name in ("width", "height", "num_frames"):
        if name in values and not (_is_int(values[name]) and values[name] >= 1):
            raise fail(name, "must be an integer >= 1")
    for name, least in (("num_attention_heads", 1), ("num_frames_per_block", 1), ("window_frames", 1), ("sink_size", 0), ("condition_frames", 1)):
        if values.get(name) is not None and not (_is_int(values[name]) and values[name] >= least):
            raise fail(name, f"must be an integer >= {least} or null")
    if "timestep_format" in values and values["timestep_format"] not in TIMESTEP_FORMATS:
        raise fail("timestep_format", f"must be one of {list(TIMESTEP_FORMATS)}")
    focal = values.get("camera_focal")
    if focal is not None and (isinstance(focal, bool) or not isinstance(focal, (int, float)) or not focal > 0):
        raise fail("camera_focal", "must be a positive number or null")
    if values.get("model_version") is not None and values["model_version"] not in MODEL_VERSIONS:
        raise fail("model_version", f"must be one of {list(MODEL_VERSIONS)} or null")
    shared = values.get("shared_components")
    if shared is not None and (not isinstance(shared, str) or not shared.strip()):
        raise fail("shared_components", "must be a folder path or null")
    from .engine.fastpath import DECODERS

    if values.get("decoder") is not None and values["decoder"] not in DECODERS:
        raise fail("decoder", f"must be one of {list(DECODERS)} or null")
    return values


def read_serving_defaults(folder: str | Path) -> ServingDefaults:
    """The checkpoint's model's serving defaults with its ``lingbot_ray.json`` on top (unknown keys
    are an error)."""
    layout = read_checkpoint_layout(folder)
    return dataclasses.replace(MODEL_SERVING_DEFAULTS[layout.version], **layout.settings)


# ---------------------------------------------------------------------------------------------
# Layout and version


@dataclass(frozen=True)
class CheckpointLayout:
    """What a checkpoint folder's files say it is: its layout, its model version (and what decided
    it), where its DiT's files are, and its ``lingbot_ray.json`` settings."""

    folder: Path
    layout: str
    version: str
    version_source: str
    transformer_folder: Path
    settings: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def shared_folder(self) -> Path | None:
        """The ``shared_components`` folder, resolved against the checkpoint folder; None if unset."""
        value = self.settings.get("shared_components")
        return None if value is None else (self.folder / Path(value).expanduser()).resolve()

    def describe(self) -> str:
        return f"LingBot World {self.version}, {self.layout} layout (version from {self.version_source})"


def _weights_file(folder: Path) -> str | None:
    """The one safetensors family in ``folder``: its index file if sharded, else its single file."""
    if not folder.is_dir():
        return None
    found = []
    for prefix in WEIGHTS_PREFIXES:
        for name in (f"{prefix}.safetensors.index.json", f"{prefix}.safetensors"):
            if (folder / name).is_file():
                found.append(name)
                break
    if len(found) > 1:
        raise ValueError(f"{str(folder)!r} holds two sets of transformer weights, {found}: keep one")
    return found[0] if found else None


def _unknown_layout(root: Path) -> CheckpointLayoutError:
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:20]) + (f" and {len(entries) - 20} more" if len(entries) > 20 else "")
    return CheckpointLayoutError(
        f"{str(root)!r} is not a LingBot World checkpoint folder: it has no {MODEL_INDEX_FILE} (diffusers layout), "
        f"no {NATIVE_DIT_FOLDER}/ with DiT weights (v2 14B native layout), no {TRANSFORMER_CONFIG_FILE} beside "
        f"{DIFFUSERS_WEIGHTS_PREFIX} safetensors (a transformer folder) and no {PLAIN_WEIGHTS_PREFIX}.safetensors"
        f"[.index.json] (the v2 1.3B release); it holds {shown or 'nothing'}"
    )


def read_checkpoint_layout(folder: str | Path) -> CheckpointLayout:
    """Tell a checkpoint folder's layout and model version from its files (docs/MODEL.md, "LingBot
    World 2.0", "Detecting the version"):

    - ``model_index.json`` at the root: the diffusers layout. Its files cannot tell v1 from v2 14B
      (same components, configs, tensor names and shapes), so the version is ``lingbot_ray.json``'s
      ``model_version``, v1 without one.
    - ``transformers/`` with DiT weights: the authors' native layout, which only v2 14B has.
    - ``config.json`` beside ``diffusion_pytorch_model``/``model`` safetensors: a transformer folder;
      the version is ``model_version``'s, v1 without one.
    - ``model.safetensors[.index.json]`` at the root and no ``config.json``: the v2 1.3B release.

    A ``model_version`` that contradicts what the files say is an error, and so is a folder with
    none of these (the error lists what the folder holds).
    """
    root = _as_folder(folder)
    settings = _read_settings(root)
    root_weights = _weights_file(root)
    implied: str | None = None
    if (root / MODEL_INDEX_FILE).is_file():
        layout, transformer = LAYOUT_DIFFUSERS, root / "transformer"
    elif _weights_file(root / NATIVE_DIT_FOLDER) is not None:
        layout, implied, transformer = LAYOUT_NATIVE, V2_14B, root / NATIVE_DIT_FOLDER
    elif root_weights is not None and (root / TRANSFORMER_CONFIG_FILE).is_file():
        layout, transformer = LAYOUT_TRANSFORMER, root
    elif root_weights is not None and root_weights.startswith(PLAIN_WEIGHTS_PREFIX + "."):
        layout, implied, transformer = LAYOUT_DIT_ONLY, V2_1P3B, root
    else:
        raise _unknown_layout(root)

    if layout == LAYOUT_DIFFUSERS and settings.get("shared_components") is not None:
        raise ValueError(
            f"{SERVING_DEFAULTS_FILE} shared_components={settings['shared_components']!r}: {str(root)!r} has its "
            f"own {MODEL_INDEX_FILE} and components; shared_components is for a checkpoint that holds only a DiT"
        )
    explicit = settings.get("model_version")
    if explicit is not None and implied is not None and explicit != implied:
        raise ValueError(
            f"{SERVING_DEFAULTS_FILE} model_version={explicit!r}: {str(root)!r} has the {layout} layout, "
            f"which is {implied!r}'s"
        )
    if explicit is not None:
        version, source = explicit, f"{SERVING_DEFAULTS_FILE} model_version"
    elif implied is not None:
        version, source = implied, f"the {layout} layout"
    else:
        version = V1
        source = f"default: a {layout} folder's files cannot tell v1 from v2 14B; set model_version in {SERVING_DEFAULTS_FILE}"
    return CheckpointLayout(root, layout, version, source, transformer, settings)


def is_checkpoint_folder(folder: str | Path) -> bool:
    """Whether ``folder`` exists and has a layout :func:`read_checkpoint_layout` knows."""
    if not Path(folder).is_dir():
        return False
    try:
        read_checkpoint_layout(folder)
    except CheckpointLayoutError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# model_index.json


@dataclass(frozen=True)
class ModelIndex:
    """A checked ``model_index.json``: the checkpoint folder, each used component's (library, class)
    and folder. For a checkpoint that holds only a DiT, the components but the transformer come from
    its ``shared_components`` folder (whose ``model_index.json`` this is), or are absent."""

    folder: Path
    class_name: str
    components: dict[str, tuple[str, str]]
    diffusers_version: str | None = None
    folders: Mapping[str, Path] = field(default_factory=dict)
    layout: CheckpointLayout | None = None

    def component_folder(self, name: str) -> Path:
        if name not in self.components:
            raise ValueError(f"component={name!r}: not one of {sorted(self.components)}")
        path = self.folders.get(name, self.folder / name)
        if path is None:
            raise ComponentMissingError(
                f"checkpoint {str(self.folder)!r} ({self.layout.describe() if self.layout else 'DiT only'}) holds only "
                f"a DiT, so it has no {name!r}: set shared_components in its {SERVING_DEFAULTS_FILE} to a diffusers "
                "LingBot World checkpoint folder with the text encoder, tokenizer, VAE and scheduler "
                "(docs/MODEL.md, 'LingBot World 2.0')"
            )
        if not path.is_dir():
            library, class_name = self.components[name]
            shared = path.parent != self.folder and name != "transformer"
            via = f" ({SERVING_DEFAULTS_FILE} shared_components of {str(self.folder)!r})" if shared else ""
            raise ComponentMissingError(
                f"checkpoint {str(path.parent)!r} has no {name!r} folder, which {MODEL_INDEX_FILE} names "
                f"({library}.{class_name}){via}"
            )
        return path

    def check_folders(self, names: tuple[str, ...] | None = None) -> None:
        for name in names if names is not None else tuple(self.components):
            self.component_folder(name)


def _parse_model_index(root: Path) -> tuple[str, dict[str, tuple[str, str]], str | None]:
    """``root/model_index.json`` checked: the pipeline class, every used component's library and
    class, and that the unused ones are null."""
    index_path = root / MODEL_INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"checkpoint folder {str(root)!r} has no {MODEL_INDEX_FILE}")
    raw = _read_json_object(index_path, MODEL_INDEX_FILE)
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
    return class_name, components, version if isinstance(version, str) else None


def read_model_index(folder: str | Path) -> ModelIndex:
    """The checkpoint's components: its own ``model_index.json`` (diffusers layout), or for a
    checkpoint that holds only a DiT, its DiT plus the ``shared_components`` folder's components.
    Component folders are checked when loaded."""
    layout = read_checkpoint_layout(folder)
    root = layout.folder
    if layout.layout == LAYOUT_DIFFUSERS:
        class_name, components, version = _parse_model_index(root)
        return ModelIndex(root, class_name, components, version, {name: root / name for name in components}, layout)
    shared = layout.shared_folder
    folders: dict[str, Path | None] = dict.fromkeys(EXPECTED_COMPONENTS)
    folders["transformer"] = layout.transformer_folder
    if shared is None:
        return ModelIndex(root, PIPELINE_CLASS_NAME, dict(EXPECTED_COMPONENTS), None, folders, layout)
    if not (shared / MODEL_INDEX_FILE).is_file():
        raise ComponentMissingError(
            f"{SERVING_DEFAULTS_FILE} shared_components={layout.settings['shared_components']!r} of {str(root)!r}: "
            f"{str(shared)!r} has no {MODEL_INDEX_FILE}; it must be a diffusers LingBot World checkpoint folder "
            "(e.g. robbyant/lingbot-world-v2-14b-causal-fast-diffusers)"
        )
    class_name, components, version = _parse_model_index(shared)
    folders.update({name: shared / name for name in components if name != "transformer"})
    return ModelIndex(root, class_name, components, version, folders, layout)


def read_component_config(folder: str | Path, component: str) -> dict[str, Any]:
    """A component's config without loading weights: ``config.json`` (``scheduler_config.json``), and
    for the transformer the config it is built from (:func:`transformer_files`)."""
    if component == "transformer":
        return dict(transformer_files(folder).config)
    index = read_model_index(folder)
    sub = index.component_folder(component)
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = sub / name
    if not path.is_file():
        raise ComponentMissingError(f"component folder {str(sub)!r} has no {name}")
    return _read_json_object(path, f"{component}/{name}")


# ---------------------------------------------------------------------------------------------
# The transformer's files and config


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header (8-byte little-endian length + JSON)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if size < 8 or not 0 < length <= size - 8:
            raise ValueError(f"{str(path)!r}: not a safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(path)!r}: not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r}: not a safetensors file (header is not a JSON object)")
    return {name: tuple(int(d) for d in info["shape"]) for name, info in header.items() if name != "__metadata__"}


@dataclass(frozen=True)
class TransformerFiles:
    """A transformer's safetensors (``weights``: the index file in ``folder``, or the single file)
    and the config of the :class:`CausalLingBotWorldTransformer3DModel` they fit, with where it came from."""

    folder: Path
    weights: str | None
    config: Mapping[str, Any]
    config_source: str

    @property
    def sharded(self) -> bool:
        return self.weights is not None and self.weights.endswith(".index.json")

    def tensor_files(self) -> dict[str, Path]:
        """Tensor name -> safetensors file, from the index if sharded, else the single file's header."""
        if self.weights is None:
            raise ComponentMissingError(
                f"transformer folder {str(self.folder)!r} has no weights: expected {DIFFUSERS_WEIGHTS_PREFIX}.safetensors"
                f"[.index.json] or {PLAIN_WEIGHTS_PREFIX}.safetensors[.index.json]"
            )
        if not self.sharded:
            single = self.folder / self.weights
            return dict.fromkeys(_safetensors_shapes(single), single)
        index_path = self.folder / self.weights
        weight_map = _read_json_object(index_path, str(index_path)).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path} has no 'weight_map'")
        files = {name: self.folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ValueError(f"shard {shard.name!r} listed in {self.weights} is missing from {str(self.folder)!r}")
        return files

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's name and shape, from the safetensors headers only (no tensor data is read)."""
        files = self.tensor_files()
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in sorted(set(files.values())):
            for name, shape in _safetensors_shapes(shard).items():
                if files.get(name) != shard:
                    raise ValueError(f"tensor {name!r} in {shard.name!r} is not listed for that shard in {self.weights}")
                shapes[name] = shape
        not_found = sorted(set(files) - set(shapes))
        if not_found:
            raise ValueError(f"{self.weights} lists tensors absent from their shards: {', '.join(not_found)}")
        return shapes


def tensor_naming(names: Any) -> str:
    """``"original"`` or ``"diffusers"``: which tensor-name layout ``names`` use, by the probe key present."""
    names = set(names)
    found = [naming for naming, probe in TENSOR_NAME_PROBES.items() if probe in names]
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the checkpoint layout: expected exactly one of {sorted(TENSOR_NAME_PROBES.values())} among "
            f"{len(names)} tensor names, found {[TENSOR_NAME_PROBES[naming] for naming in found]}"
        )
    return found[0]


def config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_attention_heads: int,
    streaming: Mapping[str, int],
    eps: float = AUTHORS_EPS,
) -> dict[str, Any]:
    """The transformer config a set of tensors (either name layout) implies: every size from their
    shapes, the head count given (shapes cannot tell it), the streaming geometry given, and the rest
    as every released LingBot World DiT has it (affine cross-attention norm, RMS q/k norm across heads,
    RoPE over 1024 positions, no CLIP image input). A tensor that does not fit is left to the strict
    load to name."""
    column = 0 if tensor_naming(shapes) == "original" else 1

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        name = _SIZE_TENSORS[key][column]
        if name not in shapes:
            raise ValueError(f"cannot derive the transformer config from the tensor shapes: {name} is missing")
        if len(shapes[name]) != ndim:
            raise ValueError(
                f"cannot derive the transformer config from the tensor shapes: {name} has shape "
                f"{list(shapes[name])}, expected {ndim} dimensions"
            )
        return tuple(shapes[name])

    dim, in_channels, *patch = shape("patch_embedding", 5)
    head_rows = shape("head", 2)[0]
    if head_rows % math.prod(patch):
        raise ValueError(f"{_SIZE_TENSORS['head'][column]} has {head_rows} rows: not a multiple of the patch {patch}")
    layers = sorted({int(match.group(1)) for name in shapes if (match := _BLOCK_INDEX.match(name))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"transformer blocks must be numbered 0..N-1; the tensors have blocks {layers}")
    if not _is_int(num_attention_heads) or num_attention_heads < 1 or dim % num_attention_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads!r}: must divide the model width {dim} "
            f"({_SIZE_TENSORS['patch_embedding'][column]}); set num_attention_heads in {SERVING_DEFAULTS_FILE}"
        )
    return {
        "patch_size": list(patch),
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": dim // num_attention_heads,
        "in_channels": in_channels,
        "out_channels": head_rows // math.prod(patch),
        "text_dim": shape("text_embedding", 2)[1],
        "freq_dim": shape("time_embedding", 2)[1],
        "ffn_dim": shape("ffn", 2)[0],
        "num_layers": len(layers),
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": AUTHORS_ROPE_POSITIONS,
        "pos_embed_seq_len": None,
        "local_attn_size": -1,
        **streaming,
    }


# The authors' WanModelFast config keys that give sizes -> how the derived config says them
_NATIVE_SIZES: dict[str, Any] = {
    "dim": lambda c: c["num_attention_heads"] * c["attention_head_dim"],
    "in_dim": lambda c: c["in_channels"],
    "out_dim": lambda c: c["out_channels"],
    "ffn_dim": lambda c: c["ffn_dim"],
    "freq_dim": lambda c: c["freq_dim"],
    "text_dim": lambda c: c["text_dim"],
    "num_layers": lambda c: c["num_layers"],
    "patch_size": lambda c: list(c["patch_size"]),
}


def is_native_config(config: Mapping[str, Any]) -> bool:
    """Whether a transformer ``config.json`` has the authors' WanModelFast keys (``dim``, ``num_heads``)."""
    return "num_heads" in config and "dim" in config and "num_attention_heads" not in config


def config_from_native(
    native: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], *, streaming: Mapping[str, int], what: str
) -> dict[str, Any]:
    """The transformer config of an authors' ``config.json`` (WanModelFast keys; it leaves out
    ``patch_size``, ``cross_attn_norm``, ``qk_norm`` and ``text_dim``, its ``ignore_for_config``): the
    head count and epsilon from it, the sizes from the tensor shapes, checked against the keys it has."""
    heads = native.get("num_heads")
    if not _is_int(heads) or heads < 1:
        raise ValueError(f"{what} num_heads={heads!r}: must be an integer >= 1")
    config = config_from_shapes(shapes, num_attention_heads=heads, streaming=streaming, eps=float(native.get("eps", AUTHORS_EPS)))
    for key, derived in _NATIVE_SIZES.items():
        if key in native and (list(native[key]) if key == "patch_size" else native[key]) != derived(config):
            raise ValueError(f"{what} {key}={native[key]!r}: the tensors say {derived(config)!r}")
    return config


def native_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformer config as the authors' WanModelFast saves it (what :func:`config_from_native`
    reads): its registered keys but the ``ignore_for_config`` ones. ``local_attn_size`` and
    ``sink_size`` are WanModelFast's defaults (the released file's values are not public, and its
    generator replaces them)."""
    return {
        "_class_name": "WanModelFast",
        "model_type": "i2v",
        "text_len": 512,
        "in_dim": config["in_channels"],
        "dim": config["num_attention_heads"] * config["attention_head_dim"],
        "ffn_dim": config["ffn_dim"],
        "freq_dim": config["freq_dim"],
        "out_dim": config["out_channels"],
        "num_heads": config["num_attention_heads"],
        "num_layers": config["num_layers"],
        "local_attn_size": -1,
        "sink_size": 0,
        "eps": config["eps"],
    }


# lingbot_ray.json key -> transformer config key it replaces
_STREAMING_OVERRIDES = {
    "num_frames_per_block": "num_frames_per_block",
    "sink_size": "sink_size",
    "window_frames": "sliding_window_num_frames",
}


def transformer_files(folder: str | Path) -> TransformerFiles:
    """The DiT of a checkpoint folder of any layout (or of a transformer folder, or of a pipeline
    folder with a ``transformer`` subfolder): its safetensors and its config, which is

    - ``config.json`` as it is (diffusers keys);
    - the authors' ``config.json`` (WanModelFast keys) translated, sizes from the tensor shapes and
      streaming geometry the reference server's (:data:`REFERENCE_STREAMING`);
    - without ``config.json`` (the 1.3B release): derived from the tensor shapes, with 12 heads
      (assumed; ``lingbot_ray.json`` ``num_attention_heads`` overrides) and the 1.3B's streaming
      geometry (:data:`V2_1P3B_STREAMING`);

    and in every case ``lingbot_ray.json``'s ``num_frames_per_block``, ``sink_size`` and
    ``window_frames`` on top.
    """
    root = _as_folder(folder)
    try:
        layout = read_checkpoint_layout(root)
    except CheckpointLayoutError:
        nested = root / "transformer"
        if (nested / TRANSFORMER_CONFIG_FILE).is_file():  # a pipeline folder without model_index.json
            return transformer_files(nested)
        raise
    if layout.layout == LAYOUT_DIFFUSERS:  # checked against model_index.json, with its error if absent
        sub = read_model_index(root).component_folder("transformer")
    else:
        sub = layout.transformer_folder
    # without weights (a hub snapshot of the JSON files only) a diffusers config.json still reads
    weights = _weights_file(sub)
    settings = layout.settings
    heads = settings.get("num_attention_heads")
    config_path = sub / TRANSFORMER_CONFIG_FILE
    what = f"{sub.name}/{TRANSFORMER_CONFIG_FILE}"
    if config_path.is_file():
        raw = _read_json_object(config_path, what)
        if is_native_config(raw):
            shapes = TransformerFiles(sub, weights, {}, "").shapes()
            config = config_from_native(raw, shapes, streaming=REFERENCE_STREAMING, what=what)
            source = f"{what} (the authors' WanModelFast keys) with sizes from the tensor shapes"
        else:
            config, source = dict(raw), what
        if heads is not None and heads != config.get("num_attention_heads"):
            raise ValueError(
                f"{SERVING_DEFAULTS_FILE} num_attention_heads={heads!r}: {what} says {config.get('num_attention_heads')!r}; "
                "the key is for a transformer without config.json"
            )
    elif layout.layout == LAYOUT_DIT_ONLY:
        shapes = TransformerFiles(sub, weights, {}, "").shapes()
        count = V2_1P3B_ASSUMED_HEADS if heads is None else heads
        config = config_from_shapes(shapes, num_attention_heads=count, streaming=V2_1P3B_STREAMING)
        source = (
            f"the tensor shapes (no {TRANSFORMER_CONFIG_FILE}), num_attention_heads {count} "
            + ("assumed (not published)" if heads is None else f"from {SERVING_DEFAULTS_FILE}")
        )
    else:
        raise ComponentMissingError(f"transformer folder {str(sub)!r} has no {TRANSFORMER_CONFIG_FILE}")
    for key, config_key in _STREAMING_OVERRIDES.items():
        if settings.get(key) is not None:
            config[config_key] = settings[key]
    return TransformerFiles(sub, weights, config, source)


# ---------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class ModelGeometry:
    """Shapes the engine derives from the served checkpoint's configs (never literals).

    ``vae_scale_spatial``/``vae_scale_temporal`` come from the VAE config, the rest from the
    transformer config.
    """

    vae_scale_spatial: int
    vae_scale_temporal: int
    latent_channels: int
    patch_size: tuple[int, int, int]
    num_frames_per_block: int
    default_sink_size: int
    default_window_frames: int
    rope_max_seq_len: int | None

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be whole patches of whole latent pixels."""
        return self.vae_scale_spatial * max(self.patch_size[1], self.patch_size[2])

    def pixel_frames(self, num_latent_frames: int, *, first: bool) -> int:
        """Pixel frames the causal VAE yields: the session's very first latent frame gives one."""
        if first:
            return 1 + self.vae_scale_temporal * (num_latent_frames - 1)
        return self.vae_scale_temporal * num_latent_frames

    def blocks_per_chunk(self, num_frames: int) -> int:
        """docs/PROTOCOL.md: ``num_frames`` rounded up to whole blocks of ``temporal * frames_per_block``."""
        return max(1, math.ceil(num_frames / (self.vae_scale_temporal * self.num_frames_per_block)))

    def tokens_per_frame(self, width: int, height: int) -> int:
        h = height // self.vae_scale_spatial // self.patch_size[1]
        w = width // self.vae_scale_spatial // self.patch_size[2]
        return h * w



def read_geometry(folder: str | Path) -> ModelGeometry:
    """The shapes a checkpoint implies, from its transformer and VAE configs (no weights loaded)."""
    return geometry_from_configs(
        read_component_config(folder, "transformer"),
        read_component_config(folder, "vae"),
    )


def geometry_from_configs(transformer: dict[str, Any], vae: dict[str, Any]) -> ModelGeometry:
    """Geometry from the ``transformer/config.json`` and ``vae/config.json`` dictionaries."""

    def need(config: dict[str, Any], component: str, key: str) -> Any:
        if config.get(key) is None:
            raise ValueError(f"{component}/config.json {key}={config.get(key)!r}: required")
        return config[key]

    temporal_down = [bool(d) for d in need(vae, "vae", "temperal_downsample")]
    # older AutoencoderKLWan configs lack the scale factors; the downsampling list implies them
    spatial = int(vae.get("scale_factor_spatial") or 2 ** len(temporal_down))
    temporal = int(vae.get("scale_factor_temporal") or 2 ** sum(temporal_down))
    patch = tuple(int(p) for p in need(transformer, "transformer", "patch_size"))
    if len(patch) != 3:
        raise ValueError(f"transformer/config.json patch_size={list(patch)!r}: expected (t, h, w)")
    rope = transformer.get("rope_max_seq_len")
    return ModelGeometry(
        vae_scale_spatial=spatial,
        vae_scale_temporal=temporal,
        latent_channels=int(need(transformer, "transformer", "out_channels")),
        patch_size=patch,  # type: ignore[arg-type]
        num_frames_per_block=int(need(transformer, "transformer", "num_frames_per_block")),
        default_sink_size=int(need(transformer, "transformer", "sink_size")),
        default_window_frames=int(need(transformer, "transformer", "sliding_window_num_frames")),
        rope_max_seq_len=int(rope) if rope else None,
    )


# ---------------------------------------------------------------------------------------------
# Where the folder is


EMBEDDED_ROOT = Path(__file__).resolve().parent / "checkpoints"


def embedded_checkpoints() -> list[str]:
    """Names of the checkpoints shipped inside the package (``model.path: embedded:NAME``)."""
    if not EMBEDDED_ROOT.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_ROOT.iterdir() if (p / "model_index.json").is_file())


def _local_folder(path: str, revision: str | None) -> Path:
    """``embedded:NAME`` or a filesystem path as a folder (no hub)."""
    if revision is not None:
        raise ValueError(
            f"model.path={path!r} model.revision={revision!r}: a revision applies to a hub repo id only, "
            f"and {path!r} is a local folder here"
        )
    if not path.startswith(EMBEDDED_PREFIX):
        return Path(path).expanduser().resolve()
    name = path[len(EMBEDDED_PREFIX):]
    if name not in embedded_checkpoints():
        raise FileNotFoundError(f"model.path={path!r}: no embedded checkpoint {name!r}; shipped: {embedded_checkpoints()}")
    return EMBEDDED_ROOT / name


def checkpoint_folder(path: str, *, revision: str | None = None, weights: bool = True) -> Path:
    """``model.path`` as a folder: ``embedded:NAME`` is a checkpoint shipped in ``lingbot_ray/checkpoints``
    (found wherever the package is installed); a hub repo id (``ORG/NAME`` that is not an existing
    local path, or ``hf://ORG/NAME``; the rule is :func:`lingbot_ray.hub.hub_repo_id`) is fetched at
    ``revision`` into the Hugging Face cache and its snapshot folder returned (``weights=False``: only
    its JSON files, for processes that load no model); anything else is a filesystem path."""
    from lingbot_ray import hub  # stdlib only; huggingface_hub is imported when a repo is fetched

    if hub.hub_repo_id(path) is None:
        return _local_folder(path, revision)
    return hub.snapshot(path, revision=revision, weights=weights)


def with_settings(folder: Path, settings: dict[str, Any] | None) -> Path:
    """``folder`` with ``settings`` laid over its ``lingbot_ray.json`` (serve config
    ``model.checkpoint_settings``), for a folder one cannot write to: a hub snapshot, a shared
    volume. The result is an overlay folder of links to ``folder``'s entries plus the merged
    ``lingbot_ray.json``, under ``$LINGBOT_RAY_CACHE`` (default ``~/.cache/lingbot_ray``)/overlays,
    one per folder and settings; links are re-made on each call, so weights fetched into ``folder``
    later show through. The merged file is checked like any ``lingbot_ray.json``."""
    if not settings:
        return folder
    import hashlib
    import os

    folder = folder.resolve()
    merged = _read_json_object(folder / SERVING_DEFAULTS_FILE, SERVING_DEFAULTS_FILE) if (folder / SERVING_DEFAULTS_FILE).is_file() else {}
    merged.update(settings)
    key = hashlib.sha256(json.dumps([str(folder), merged], sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LINGBOT_RAY_CACHE") or Path.home() / ".cache" / "lingbot_ray")
    overlay = cache / "overlays" / f"{folder.name}-{key}"
    overlay.mkdir(parents=True, exist_ok=True)
    for entry in folder.iterdir():
        link = overlay / entry.name
        if entry.name != SERVING_DEFAULTS_FILE and not link.exists():
            try:
                link.symlink_to(entry, target_is_directory=entry.is_dir())
            except FileExistsError:  # another replica made it meanwhile
                pass
    written = overlay / f".{SERVING_DEFAULTS_FILE}.{os.getpid()}"
    written.write_text(json.dumps(merged, indent=2, sort_keys=True))
    written.replace(overlay / SERVING_DEFAULTS_FILE)  # atomic: replicas racing write the same text
    _read_settings(overlay)  # every key checked, by name
    return overlay


def ensure_checkpoint(
    path: str,
    *,
    build_tiny_if_missing: bool = False,
    revision: str | None = None,
    weights: bool = True,
    settings: dict[str, Any] | None = None,
) -> Path:
    """:func:`_ensure_folder`, with ``settings`` laid over the folder's ``lingbot_ray.json``
    (:func:`with_settings`)."""
    folder = _ensure_folder(path, build_tiny_if_missing=build_tiny_if_missing, revision=revision, weights=weights)
    return with_settings(folder, settings)


def _ensure_folder(path: str, *, build_tiny_if_missing: bool, revision: str | None, weights: bool) -> Path:
    """The checkpoint folder of ``model.path`` (see :func:`checkpoint_folder`), of any layout
    :func:`read_checkpoint_layout` knows; with
    ``build_tiny_if_missing`` ``path`` is always a local folder, and an absent one is built first (a
    random-weights tiny checkpoint: tests and first starts without files).

    Replicas start concurrently, so the build happens under a file lock and only once (and a hub
    download once per node, under a lock next to the cache).
    """
    if build_tiny_if_missing:
        from lingbot_ray import hub

        if path.startswith(hub.HUB_PREFIX):
            raise ValueError(f"model.path={path!r}: build_tiny_if_missing builds a local folder; it cannot apply to a hub repo")
        folder = _local_folder(path, revision)
    else:
        folder = checkpoint_folder(path, revision=revision, weights=weights)
    if (folder / MODEL_INDEX_FILE).is_file() or is_checkpoint_folder(folder):
        return folder
    if not build_tiny_if_missing:
        if folder.is_dir() and any(folder.iterdir()):
            read_checkpoint_layout(folder)  # raises, naming what the folder holds
        raise FileNotFoundError(
            f"model.path={path!r}: no {MODEL_INDEX_FILE} at {folder} "
            "(set model.build_tiny_if_missing: true to build a random tiny model there)"
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / MODEL_INDEX_FILE).is_file():
            from lingbot_ray.models.tiny import build_tiny_checkpoint  # torch: only when building

            logger.info("model.path %s is absent: building a tiny checkpoint there (first start)", folder)
            build_tiny_checkpoint(folder, force=folder.exists())
    return folder


@dataclass(frozen=True)
class CheckpointFacts:
    """Everything a process that does not run a model needs to know about the served checkpoint."""

    folder: Path
    defaults: ServingDefaults
    geometry: ModelGeometry
    layout: CheckpointLayout | None = None

    @classmethod
    def read(cls, folder: str | Path) -> CheckpointFacts:
        read_model_index(folder).check_folders()
        return cls(Path(folder), read_serving_defaults(folder), read_geometry(folder), read_checkpoint_layout(folder))

    def session_defaults(self) -> SessionDefaults:
        """What a session gets for the init fields it leaves out: this checkpoint's size, fps, chunk
        length, cache geometry, and its distilled schedule's own step count."""
        return SessionDefaults(
            size=f"{self.defaults.width}x{self.defaults.height}",
            fps=self.defaults.fps,
            num_inference_steps=len(self.defaults.timestep_indices),
            num_frames=self.defaults.num_frames,
            sink_size=self.geometry.default_sink_size,
            window_frames=self.geometry.default_window_frames,
            size_multiple=self.geometry.size_multiple,
        )
