"""The application's configuration: the ``args`` of ``serve_config.yaml`` (or of ``build_app``).

Every section rejects unknown keys, so a typo fails at deploy time with the key's name instead of
being silently ignored. Each deployment computes its Ray resources from its section in one place
(:func:`deployment_options`).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import msgspec

from lingbot_ray.protocol import InitLimits

Dtype = Literal["float32", "bfloat16", "float16"]


class _Section(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


EMBEDDED_PREFIX = "embedded:"


class ModelConfig(_Section):
    # Where the LingBot checkpoint comes from (a diffusers folder, a native release, or a DiT-only 1.3B
    # folder with shared_components: docs/MODEL.md, "Checkpoint folder" and "Detecting the version"):
    # - ``embedded:NAME``: a checkpoint shipped in the package (lingbot_ray/checkpoints/NAME); by
    #   default the embedded world model, so build_app({}) serves something without any file;
    # - a Hugging Face hub repo id, ``ORG/NAME`` (e.g. robbyant/lingbot-world-fast-diffusers) or
    #   ``hf://ORG/NAME``: fetched by each node into its hub cache (HF_HUB_CACHE; HF_TOKEN and
    #   HF_HUB_OFFLINE honoured; docs/DEPLOYING.md "Models from the hub"). A bare value is a repo id
    #   when it has exactly one ``/``, both parts are valid hub names, it does not start with ``/``,
    #   ``.`` or ``~``, and no local file or folder of that relative name exists (a local one wins;
    #   write ``./ORG/NAME`` or an absolute path to mean a folder for sure);
    # - anything else: a local folder (absolute paths are safest: replicas run in other directories).
    path: str = "embedded:lingbot-world-tiny"
    # Hub repos only: the branch, tag or commit to fetch (None: the repo's main branch). A branch is
    # resolved by each process when it starts; pin a commit so every replica serves the same weights.
    revision: str | None = None
    # Keys of the checkpoint's lingbot_ray.json laid over the folder's own (docs/MODEL.md,
    # "lingbot_ray.json"), for folders one cannot write to: e.g. {model_version: v2-14b} for the v2
    # 14B diffusers repo, whose files match v1's. Served through an overlay folder of links.
    checkpoint_settings: dict[str, Any] = msgspec.field(default_factory=dict)
    # Build a random-weights tiny checkpoint at ``path`` on first start when the folder is absent
    # (``path`` is then always a local folder, never a hub repo id).
    build_tiny_if_missing: bool = False
    # Name served at /v1/models and accepted in init.model; default: the folder's name.
    served_model_name: str | None = None
    device: str = "cpu"
    dit_dtype: Dtype = "float32"
    text_encoder_dtype: Dtype = "float32"
    # The DiT's attention kernel, through diffusers' dispatcher: native (torch SDPA), flash, _flash_3,
    # sage, xformers, ... (None: diffusers' default, native). Checked when the DiT replica starts.
    attention_backend: str | None = None
    # torch intra-op threads per stage replica (None: torch's default). Outputs are bit-exact only
    # between runs with the same device, dtype and thread count.
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        from lingbot_ray.hub import HUB_PREFIX, looks_like_repo_id, may_be_repo_id

        if self.path.startswith(HUB_PREFIX) and not looks_like_repo_id(self.path[len(HUB_PREFIX):]):
            raise ValueError(f"model.path={self.path!r}: {self.path[len(HUB_PREFIX):]!r} is not a hub repo id (ORG/NAME)")
        if self.path.startswith(HUB_PREFIX) and self.build_tiny_if_missing:
            raise ValueError(f"model.path={self.path!r}: build_tiny_if_missing builds a local folder, not a hub repo")
        if self.revision is not None:
            if not self.revision.strip():
                raise ValueError(f"model.revision={self.revision!r}: empty; leave it out for the main branch")
            if self.build_tiny_if_missing or not may_be_repo_id(self.path):
                raise ValueError(
                    f"model.revision={self.revision!r}: applies to a hub repo id only, and model.path={self.path!r} "
                    f"is a local folder{' (build_tiny_if_missing)' if self.build_tiny_if_missing else ''}"
                )


class ScalingConfig(_Section):
    """Session-aware autoscaling of a sticky stage (lingbot_ray/serve/autoscaling.py): replicas
    (DiT groups) from free session slots. Set, it replaces the section's fixed replica count."""

    min_replicas: int = 1
    max_replicas: int = 1
    # Free session slots to keep ready: a new session should not wait for a replica to start.
    target_free_slots: int = 1
    # A surplus replica, drained of new sessions, retires once it has held none for this long.
    drain_s: float = 30.0
    # Serve's health-check period of the stage: a retiring replica is stopped after 3 failed checks.
    health_check_period_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas}, max_replicas={self.max_replicas}: need 1 <= min_replicas <= max_replicas")
        if self.target_free_slots < 0:
            raise ValueError(f"target_free_slots={self.target_free_slots}: must be >= 0")
        if self.drain_s < 0 or self.health_check_period_s <= 0:
            raise ValueError(f"drain_s={self.drain_s}, health_check_period_s={self.health_check_period_s}: need >= 0 and > 0")


class DiTConfig(_Section):
    # One replica = one actor group of ``sequence_parallel_degree`` ranks.
    num_groups: int = 1
    sequence_parallel_degree: int = 1
    sessions_per_group: int = 2
    num_cpus_per_rank: float = 1.0
    num_gpus_per_rank: float = 0.0
    # Keep DiT weights in host memory between chunks (saves GPU memory, costs transfer time).
    cpu_offload: bool = False
    # A session no call has touched for this long is released (its ingress died without closing it).
    # Keep it above the longest pause a client may take: a client that stops reading stalls its calls.
    session_idle_timeout_s: float = 600.0
    # torch.compile of the transformer blocks: none | default | max-autotune-no-cudagraphs |
    # max-autotune | reduce-overhead (CUDA graphs). The replica warms up (compiles) at the
    # checkpoint's default size before it reports ready (lingbot_ray/engine/fastpath.py).
    compile: str = "none"
    # FP8 matmuls in the transformer blocks: none | rowwise | tensorwise (lingbot_ray/models/fp8.py).
    # On a GPU it needs compute capability 8.9+ (Ada, Hopper, Blackwell); checked at replica start.
    fp8: str = "none"
    # Groups from session slots (min_replicas..max_replicas groups) instead of num_groups.
    autoscaling: ScalingConfig | None = None


class StageConfig(_Section):
    num_replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    # Sticky stages (VAE) refuse sessions beyond this; ignored by stateless stages.
    sessions_per_replica: int = 8
    # Text encoder only: run on CPU even when the device is a GPU.
    cpu_offload: bool = False
    # Sticky stages: release a session untouched for this long (see DiTConfig).
    session_idle_timeout_s: float = 600.0
    # Sticky stages: replicas from session slots instead of num_replicas (see DiTConfig).
    autoscaling: ScalingConfig | None = None


class VAEConfig(StageConfig):
    # What decodes the DiT's latents: wan (the checkpoint's VAE decoder) | tiny (a TAEHV-style tiny
    # temporal decoder: far cheaper; docs/MODEL.md "Tiny decoder"). None: the checkpoint's own choice
    # (`decoder` in its lingbot_ray.json), else wan. The first frame is always encoded by the
    # checkpoint's VAE encoder.
    decoder: str | None = None
    # The tiny decoder's weights: a taew2_1 .pth/.safetensors file in the published layout, or a
    # folder of config.json + model.safetensors (None: the checkpoint's own tiny_decoder/ folder).
    tiny_decoder_path: str | None = None

    def __post_init__(self) -> None:
        from lingbot_ray.engine.fastpath import DECODERS

        if self.decoder is not None and self.decoder not in DECODERS:
            raise ValueError(f"vae.decoder={self.decoder!r}: must be one of {list(DECODERS)} or null")
        if self.tiny_decoder_path is not None and self.decoder == "wan":
            raise ValueError(f"vae.tiny_decoder_path={self.tiny_decoder_path!r}: only read with vae.decoder: tiny")


class PostProcessConfig(StageConfig):
    # Server-side weights: RIFE v4 flownet.pkl and a Real-ESRGAN .pth (state dict layouts as published).
    rife_model_path: str | None = None
    esrgan_model_path: str | None = None
    # Folders a client's frame_interpolation_model_path / upscaling_model_path may point into.
    model_dirs: list[str] = msgspec.field(default_factory=list)
    # Real-ESRGAN tile size in pixels for frames whose activations do not fit (None: whole frames).
    tile: int | None = None

    @property
    def has_weights(self) -> bool:
        """Whether any session could post-process: server weights, or folders clients may name."""
        return bool(self.rife_model_path or self.esrgan_model_path or self.model_dirs)


class IceServer(_Section):
    """A STUN or TURN server of the server's peer connections (the fields of WebRTC's RTCIceServer)."""

    urls: str | list[str]  # stun:host:port, turn:host:port?transport=udp|tcp, turns:host:port
    username: str | None = None
    credential: str | None = None


class IngressConfig(_Section):
    num_replicas: int = 1
    num_cpus: float = 0.5
    # Concurrent WebSocket sessions one ingress replica carries (each holds a request slot).
    max_sessions: int = 16
    # Sockets that have not sent a valid init yet hold no session slot; at most this many wait at
    # once (more are refused with 1013), each for at most init_timeout_s (then closed with 1008).
    max_pending_inits: int = 16
    init_timeout_s: float = 30.0
    # API key: the value itself, or the name of an environment variable holding it.
    api_key: str | None = None
    api_key_env: str | None = "LINGBOT_API_KEY"
    cors_allow_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])
    # The largest WebSocket message either way: frame batches are split below it; a client message
    # above it closes the socket with 1009.
    max_message_bytes: int = 8 * 2**20
    # Chunks of one session between "DiT started" and "sent": bounds memory, gives backpressure.
    max_chunks_in_flight: int = 2
    # Seconds a stage call may take before the session is failed (guards against a dead group).
    stage_timeout_s: float = 120.0
    webui_dir: str | None = None
    # POST /v1/videos: the most chunks one clip may ask for (it holds a session slot meanwhile).
    max_clip_chunks: int = 64
    # How long a rollout or downscale lets this replica's sessions go on before they are cut.
    graceful_shutdown_timeout_s: float = 60.0
    # POST /v1/realtime_video/webrtc (docs/PROTOCOL.md "WebRTC", docs/DEPLOYING.md "WebRTC media
    # ports"). The UDP ports this replica's peer connections bind for media, inclusive (0, 0: any
    # port the OS picks). Each session binds one port per host address.
    webrtc_port_min: int = 0
    webrtc_port_max: int = 0
    # The addresses host candidates are offered on (empty: every interface but loopback).
    webrtc_host_addresses: list[str] = msgspec.field(default_factory=list)
    # STUN/TURN servers of the server side; none by default (no outside lookups).
    webrtc_ice_servers: list[IceServer] = msgspec.field(default_factory=list)
    # The video a session gets unless its offer asks otherwise, and the most bitrate it may ask.
    webrtc_codec: Literal["VP8", "H264"] = "VP8"
    webrtc_bitrate: int = 1_500_000
    webrtc_max_bitrate: int = 20_000_000
    webrtc_keyframe_interval_s: float = 2.0

    def __post_init__(self) -> None:
        ports = (self.webrtc_port_min, self.webrtc_port_max)
        if ports != (0, 0) and not 1 <= self.webrtc_port_min <= self.webrtc_port_max <= 65535:
            raise ValueError(f"ingress.webrtc_port_min/max={ports}: need 1 <= min <= max <= 65535, or both 0 (any port)")
        if not 50_000 <= self.webrtc_bitrate <= self.webrtc_max_bitrate:
            raise ValueError(f"ingress.webrtc_bitrate={self.webrtc_bitrate}: need 50000 <= it <= webrtc_max_bitrate={self.webrtc_max_bitrate}")
        if not 0.1 <= self.webrtc_keyframe_interval_s <= 60:
            raise ValueError(f"ingress.webrtc_keyframe_interval_s={self.webrtc_keyframe_interval_s}: need 0.1 ... 60 s")

    def resolved_api_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


# ingress knobs that can change live (Serve's user_config → Ingress.reconfigure): no replica is replaced
LIVE_INGRESS_FIELDS = (
    "max_sessions",
    "max_pending_inits",
    "init_timeout_s",
    "api_key",
    "api_key_env",
    "max_message_bytes",
    "max_chunks_in_flight",
    "stage_timeout_s",
    "max_clip_chunks",
)


class MediaConfig(_Section):
    allowed_dirs: list[str] = msgspec.field(default_factory=list)
    allow_url_fetch: bool = False
    max_bytes: int = 12 * 2**20
    fetch_timeout_s: float = 5.0


class ServeConfig(_Section):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    dit: DiTConfig = msgspec.field(default_factory=DiTConfig)
    vae: VAEConfig = msgspec.field(default_factory=VAEConfig)
    text_encoder: StageConfig = msgspec.field(default_factory=StageConfig)
    postprocess: PostProcessConfig = msgspec.field(default_factory=PostProcessConfig)
    ingress: IngressConfig = msgspec.field(default_factory=IngressConfig)
    media: MediaConfig = msgspec.field(default_factory=MediaConfig)
    limits: InitLimits = msgspec.field(default_factory=InitLimits)

    def __post_init__(self) -> None:
        positive = {
            "dit.num_groups": self.dit.num_groups,
            "dit.sequence_parallel_degree": self.dit.sequence_parallel_degree,
            "dit.sessions_per_group": self.dit.sessions_per_group,
            "vae.num_replicas": self.vae.num_replicas,
            "vae.sessions_per_replica": self.vae.sessions_per_replica,
            "text_encoder.num_replicas": self.text_encoder.num_replicas,
            "postprocess.num_replicas": self.postprocess.num_replicas,
            "ingress.num_replicas": self.ingress.num_replicas,
            "ingress.max_sessions": self.ingress.max_sessions,
            "ingress.max_pending_inits": self.ingress.max_pending_inits,
            "ingress.max_chunks_in_flight": self.ingress.max_chunks_in_flight,
            "ingress.max_message_bytes": self.ingress.max_message_bytes,
            "ingress.max_clip_chunks": self.ingress.max_clip_chunks,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key}={value!r}: must be >= 1")
        from lingbot_ray.engine.fastpath import COMPILE_MODES

        if self.dit.compile not in COMPILE_MODES:
            raise ValueError(f"dit.compile={self.dit.compile!r}: must be one of {list(COMPILE_MODES)}")
        from lingbot_ray.engine.fastpath import FP8_MODES

        if self.dit.fp8 not in FP8_MODES:
            raise ValueError(f"dit.fp8={self.dit.fp8!r}: must be one of {list(FP8_MODES)}")
        if self.text_encoder.autoscaling is not None:
            raise ValueError(
                "text_encoder.autoscaling: the text encoder holds no sessions; scale it with Serve's own "
                "autoscaling_config in the serve config's deployments section"
            )
        for key, value in {"ingress.init_timeout_s": self.ingress.init_timeout_s, "ingress.stage_timeout_s": self.ingress.stage_timeout_s}.items():
            if not value > 0:
                raise ValueError(f"{key}={value!r}: must be > 0")
        if self.ingress.max_message_bytes > 16 * 2**20:
            raise ValueError(
                f"ingress.max_message_bytes={self.ingress.max_message_bytes}: uvicorn caps WebSocket messages at 16 MiB"
            )

    def for_stage(self, section: str) -> ServeConfig:
        """What one stage deployment is bound: the model and its own section, the rest at their
        defaults (a stage reads nothing else). Note that Serve hashes an application's whole
        ``args`` into its code version, so any change of ``args`` replaces every replica; live
        changes go through the ingress's ``user_config`` (:meth:`with_live`)."""
        return ServeConfig(model=self.model, **{section: getattr(self, section)})

    def with_live(self, user_config: dict[str, Any] | None) -> ServeConfig:
        """This config with the live knobs of ``user_config`` laid over it (validated like the whole
        config): ``deployments: [{name: Ingress, user_config: {ingress: {...}, limits: {...},
        media: {...}}}]`` in a serve config changes them without replacing any replica."""
        user_config = user_config or {}
        unknown = set(user_config) - {"ingress", "limits", "media"}
        if unknown or set(user_config.get("ingress", {})) - set(LIVE_INGRESS_FIELDS):
            raise ValueError(f"user_config={sorted(user_config)!r}: only ingress.{{{', '.join(LIVE_INGRESS_FIELDS)}}}, limits, media are live")
        merged = msgspec.to_builtins(self)
        merged["ingress"].update(user_config.get("ingress", {}))
        for section in ("limits", "media"):
            merged[section].update(user_config.get(section, {}))
        return load_config(merged)

    def served_name(self, checkpoint_name: str | None) -> str:
        """The name served at /v1/models (and every metric's ``model`` tag): ``model.served_model_name``,
        else the checkpoint's own (``served_model_name`` in its lingbot_ray.json), else the folder's."""
        return self.model.served_model_name or checkpoint_name or self.served_model_name

    @property
    def served_model_name(self) -> str:
        path = self.model.path.removeprefix(EMBEDDED_PREFIX)
        return self.model.served_model_name or os.path.basename(os.path.normpath(path))


def load_config(args: dict[str, Any] | ServeConfig | None) -> ServeConfig:
    """Validate ``args`` (from YAML); errors name the offending key path."""
    if isinstance(args, ServeConfig):
        return args
    try:
        return msgspec.convert(args or {}, ServeConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid serve config: {exc}") from None


def _replicas(count: int, slots: int, scaling: ScalingConfig | None) -> dict[str, Any]:
    """A stage's replica count: fixed, or Serve's autoscaling with the session-slot policy."""
    if scaling is None:
        return {"num_replicas": count, "health_check_period_s": 10}
    return {
        "num_replicas": "auto",
        "health_check_period_s": scaling.health_check_period_s,
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            # Serve delays a custom policy's decisions too (30 s up, 600 s down by default): the
            # policy scales up at once, and its downscale waits for a drained replica to empty
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "policy": {
                "policy_function": "lingbot_ray.serve.autoscaling:SessionSlotPolicy",
                "policy_kwargs": {"slots_per_replica": slots, "target_free_slots": scaling.target_free_slots},
            },
        },
    }


def deployment_options(config: ServeConfig) -> dict[str, dict[str, Any]]:
    """Ray Serve options of every deployment, computed from config in this one place."""
    dit = config.dit
    ranks = dit.sequence_parallel_degree
    rank_bundle = {"CPU": dit.num_cpus_per_rank, "GPU": dit.num_gpus_per_rank}
    rank_bundle = {k: v for k, v in rank_bundle.items() if v}
    dit_options: dict[str, Any] = {
        **_replicas(dit.num_groups, dit.sessions_per_group, dit.autoscaling),
        # Sessions are long-lived: each open session plus one in-flight call per session.
        "max_ongoing_requests": 2 * dit.sessions_per_group + 2,
        "request_router_config": {
            "request_router_class": "lingbot_ray.serve.router:SessionRouter",
            "request_routing_stats_period_s": 0.5,
        },
    }
    # The replica is rank 0 and sits in bundle 0; ranks 1..N-1 are child actors in bundles 1..N-1.
    dit_options["ray_actor_options"] = {"num_cpus": dit.num_cpus_per_rank, "num_gpus": dit.num_gpus_per_rank}
    if ranks > 1:
        dit_options["placement_group_bundles"] = [dict(rank_bundle) or {"CPU": 0.01} for _ in range(ranks)]
        dit_options["placement_group_strategy"] = "STRICT_PACK"

    def stage(section: StageConfig, sticky: bool) -> dict[str, Any]:
        options: dict[str, Any] = {
            **_replicas(section.num_replicas, section.sessions_per_replica, section.autoscaling if sticky else None),
            "ray_actor_options": {"num_cpus": section.num_cpus, "num_gpus": section.num_gpus},
            "max_ongoing_requests": 4 * section.sessions_per_replica + 4,
        }
        if sticky:
            options["request_router_config"] = {
                "request_router_class": "lingbot_ray.serve.router:SessionRouter",
                "request_routing_stats_period_s": 0.5,
            }
        return options

    return {
        "TextEncoder": stage(config.text_encoder, sticky=False),
        "DiTGroup": dit_options,
        "VAEDecoder": stage(config.vae, sticky=True),
        # sticky: RIFE pairs a chunk's first frame with the previous chunk's last
        "PostProcess": stage(config.postprocess, sticky=True),
        "Ingress": {
            "num_replicas": config.ingress.num_replicas,
            "graceful_shutdown_timeout_s": config.ingress.graceful_shutdown_timeout_s,
            "ray_actor_options": {"num_cpus": config.ingress.num_cpus},
            # Each open WebSocket holds one slot for its whole life, waiting for init or streaming.
            "max_ongoing_requests": config.ingress.max_sessions + config.ingress.max_pending_inits + 4,
        },
    }
