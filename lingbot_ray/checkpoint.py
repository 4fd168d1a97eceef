"""What a checkpoint folder says about itself, read without torch: the facts every process needs
(the ingress too, which never loads a model).

A checkpoint is a diffusers-style folder (docs/MODEL.md, "Checkpoint folder")::

    model_index.json       _class_name LingBotWorldCausalDMDPipeline + one [library, class] per component
    transformer/           CausalLingBotWorldTransformer3DModel (sharded safetensors, either name layout)
    vae/                   AutoencoderKLWan
    text_encoder/          UMT5EncoderModel
    tokenizer/             T5TokenizerFast
    scheduler/             UniPCMultistepScheduler config (only num_train_timesteps is used)
    lingbot_ray.json       optional: this project's serving defaults (size, fps, DMD schedule, ...)

Here: finding the folder (``embedded:NAME`` or a path), checking ``model_index.json``, the serving
defaults, each component's config, and the :class:`ModelGeometry` those configs imply. Loading weights
is :mod:`lingbot_ray.models.loading`'s job.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .protocol import SessionDefaults, parse_size

logger = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
# LingBot World fast v1's DMD schedule: indices into the 1000-step schedule, and its shift
# (docs/MODEL.md, "Timesteps", says where they come from)
V1_TIMESTEP_INDICES = (0, 179, 358, 679)
V1_SHIFT = 10.0
# What the model is given as its timestep: "float" (the reference server) or "int" (the authors'
# offline script); docs/MODEL.md, "Timesteps"
TIMESTEP_FORMATS = ("float", "int")

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


_WIRE = SessionDefaults()  # the protocol's defaults (docs/PROTOCOL.md): a checkpoint without lingbot_ray.json serves these
_WIRE_WIDTH, _WIRE_HEIGHT = parse_size(_WIRE.size)


@dataclass(frozen=True)
class ServingDefaults:
    """Serving defaults of a checkpoint, read from the optional ``lingbot_ray.json``.

    Without the file these are LingBot World fast v1's as the reference server runs it: 832x480 at
    16 fps, DMD indices [0, 179, 358, 679] at shift 10 with float timesteps, 500 px focal at every
    size (docs/MODEL.md, "lingbot_ray.json").
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
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def focal_at_size(self) -> tuple[float, int, int] | None:
        """``camera_focal`` with the size it is given at, as ``control.camera.Intrinsics.for_frame`` takes it."""
        return None if self.camera_focal is None else (float(self.camera_focal), self.width, self.height)


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


def read_model_index(folder: str | Path) -> ModelIndex:
    """Read and check ``model_index.json``: the pipeline class, every used component's library and
    class, and that the unused ones are null. Component folders are checked when loaded."""
    root = _as_folder(folder)
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
    return ModelIndex(root, class_name, components, version if isinstance(version, str) else None)


def read_serving_defaults(folder: str | Path) -> ServingDefaults:
    """Serving defaults from ``lingbot_ray.json`` if present (unknown keys are an error)."""
    path = _as_folder(folder) / SERVING_DEFAULTS_FILE
    if not path.is_file():
        return ServingDefaults()
    raw = _read_json_object(path, SERVING_DEFAULTS_FILE)
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
    if defaults.timestep_format not in TIMESTEP_FORMATS:
        raise ValueError(
            f"{SERVING_DEFAULTS_FILE} timestep_format={defaults.timestep_format!r}: must be one of {list(TIMESTEP_FORMATS)}"
        )
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
    return _read_json_object(path, f"{component}/{name}")


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


def ensure_checkpoint(
    path: str, *, build_tiny_if_missing: bool = False, revision: str | None = None, weights: bool = True
) -> Path:
    """The checkpoint folder of ``model.path`` (see :func:`checkpoint_folder`); with
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
    if (folder / MODEL_INDEX_FILE).is_file():
        return folder
    if not build_tiny_if_missing:
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

    @classmethod
    def read(cls, folder: str | Path) -> CheckpointFacts:
        read_model_index(folder).check_folders()
        return cls(Path(folder), read_serving_defaults(folder), read_geometry(folder))

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
