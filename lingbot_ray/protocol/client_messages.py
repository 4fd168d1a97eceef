"""Messages the client sends: ``init`` (first) and runtime ``event`` messages.

Decoding is lenient exactly where real clients need it (docs/PROTOCOL.md, "init"): an int is accepted for a
number, an integral float for an integer (the reference WebUI packs integers ≥ 65536 as float64).
Anything else of the wrong type, fractional where an integer is due, or out of range is invalid, and
the raised :class:`ProtocolError` names the field and the value. Unknown keys are ignored.
"""

from __future__ import annotations

import html
import math
import re
from typing import Annotated, Any, Literal

import msgspec

from .actions import ACTIONS
from .errors import InvalidEvent, InvalidInit, ProtocolError

U32 = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
MAX_PENDING_ENTRIES = 512
# The deepest message the protocol has is 4 levels (init → condition_inputs → camera_actions → list).
MAX_NESTING = 16
_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


class InitLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Server-side bounds on what one session may ask for (from serve config)."""

    max_width: int = 1920
    max_height: int = 1088
    min_side: int = 32
    max_num_frames: int = 96
    max_inference_steps: int = 16
    max_prompt_chars: int = 8192
    max_first_frame_bytes: int = 12 * 2**20
    max_script_entries: int = MAX_PENDING_ENTRIES
    # pacing sends frames at fps: a tiny fps would hold a DiT slot for hours per chunk
    min_fps: float = 1.0
    max_fps: float = 120.0
    # KV-cache memory grows with the window (and doubles with guidance): cap what a client may ask
    max_window_frames: int = 64
    max_sink_frames: int = 32
    max_guidance_scale: float = 30.0


class SessionDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """What a session gets for the init fields its client leaves out: the served checkpoint's
    defaults. ``None`` leaves the choice to the engine (the model's block and cache geometry).
    ``size_multiple``: a frame's width and height must be multiples of it."""

    size: str = "832x480"
    fps: float = 16.0
    num_inference_steps: int = 4
    num_frames: int | None = None
    sink_size: int | None = None
    window_frames: int | None = None
    size_multiple: int = 16

    def __post_init__(self) -> None:
        parse_size(self.size)  # raises naming the size
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps!r}: must be positive")
        for name, least in (
            ("num_inference_steps", 1), ("size_multiple", 1), ("num_frames", 1), ("window_frames", 1), ("sink_size", 0)
        ):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name}={value!r}: must be >= {least}")


class ConditionInputs(msgspec.Struct, kw_only=True):
    camera_actions: list[list[str]] | None = None


class InitRequest(msgspec.Struct, kw_only=True, tag_field="type", tag="init"):
    """A validated ``init``. :func:`decode_init` fills what the client left out from the
    :class:`SessionDefaults`; fields still ``None`` take the model's defaults in the engine."""

    prompt: str
    model: str | None = None
    # bytes (an image file) or str (data URI, URL or server path); msgspec cannot union two str-likes
    first_frame: Any = None
    size: str | None = None
    fps: Annotated[float, msgspec.Meta(gt=0)] | None = None
    num_frames: Annotated[int, msgspec.Meta(ge=1)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 42
    num_inference_steps: Annotated[int, msgspec.Meta(ge=1)] | None = None
    guidance_scale: Annotated[float, msgspec.Meta(ge=0.0)] = 1.0  # capped by limits.max_guidance_scale
    negative_prompt: str | None = None
    max_chunks: Annotated[int, msgspec.Meta(ge=1)] | None = None
    realtime_causal_sink_size: Annotated[int, msgspec.Meta(ge=0)] | None = None
    realtime_causal_kv_cache_num_frames: Annotated[int, msgspec.Meta(gt=0)] | None = None
    realtime_output_format: Literal["webp", "jpeg", "raw"] | None = None
    output_compression: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None
    realtime_preview_max_width: Annotated[int, msgspec.Meta(ge=16, le=16384)] | None = None
    realtime_output_pacing: bool = False
    quality: Literal["lossless", "high"] = "lossless"
    enable_upscaling: bool = False
    upscaling_scale: Annotated[int, msgspec.Meta(ge=1, le=8)] = 4
    upscaling_model_path: str | None = None
    enable_frame_interpolation: bool = False
    frame_interpolation_exp: Annotated[int, msgspec.Meta(ge=1, le=4)] = 1
    frame_interpolation_scale: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    frame_interpolation_model_path: str | None = None
    condition_inputs: ConditionInputs | None = None

    @property
    def width(self) -> int:
        return parse_size(self.size)[0]

    @property
    def height(self) -> int:
        return parse_size(self.size)[1]

    @property
    def preview_quality(self) -> int:
        if self.output_compression is not None:
            return self.output_compression
        return 95 if self.realtime_output_format == "jpeg" else 90

    @property
    def camera_script(self) -> list[list[str]] | None:
        return None if self.condition_inputs is None else self.condition_inputs.camera_actions


class StateTransition(msgspec.Struct, frozen=True):
    """One live-control state: the held action tokens, from ``client_ts_ms`` on. The condition queue
    (:mod:`lingbot_ray.control.conditions`) takes this type as it is."""

    actions: tuple[str, ...]
    client_ts_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None


class CameraState(msgspec.Struct, kw_only=True):
    mode: Literal["state"]
    transitions: list[StateTransition]


class ClientEvent(msgspec.Struct, kw_only=True, frozen=True):
    """A validated runtime event. ``composite_input`` fills several of the optional parts."""

    kind: Literal["prompt", "camera_actions", "composite_input"]
    event_id: int | None = None
    prompt: str | None = None
    camera_script: list[list[str]] | None = None
    camera_state: list[StateTransition] | None = None


# ---------------------------------------------------------------------------------------------
# lenient number handling


def _integral_floats_to_int(value: Any, info: msgspec.inspect.Type) -> Any:
    """Turn integral floats into ints wherever ``info`` expects an int (recursively)."""
    if isinstance(info, msgspec.inspect.IntType):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(info, msgspec.inspect.UnionType):
        for sub in info.types:
            converted = _integral_floats_to_int(value, sub)
            if converted is not value:
                return converted
        return value
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, dict):
        by_name = {f.encode_name: f.type for f in info.fields}
        return {k: _integral_floats_to_int(v, by_name[k]) if k in by_name else v for k, v in value.items()}
    if isinstance(info, msgspec.inspect.ListType) and isinstance(value, list):
        return [_integral_floats_to_int(v, info.item_type) for v in value]
    return value


_INIT_INFO = msgspec.inspect.type_info(InitRequest)
_TRANSITIONS_INFO = msgspec.inspect.type_info(list[StateTransition])


def _field_of(error: msgspec.ValidationError) -> str:
    match = re.search(r"at `\$\.?([^`]*)`", str(error))
    return match.group(1) if match and match.group(1) else "message"


def _lookup(raw: dict, path: str) -> Any:
    node: Any = raw
    for part in re.findall(r"[^.\[\]]+", path):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return node


# ---------------------------------------------------------------------------------------------
# field normalisation shared by init and events


def normalize_prompt(text: str, field: str, error: type[ProtocolError]) -> str:
    """Collapse whitespace, unescape HTML entities, strip; reject empty."""
    cleaned = " ".join(html.unescape(text).split())
    if not cleaned:
        raise error(field, text, "must be a non-empty string")
    return cleaned


def parse_size(size: str | None) -> tuple[int, int]:
    if size is None:
        raise ValueError("size is not set")
    match = _SIZE_RE.match(size)
    if not match:
        raise ValueError(f"size {size!r} is not of the form WIDTHxHEIGHT")
    return int(match.group(1)), int(match.group(2))


def check_actions(script: list[list[str]], field: str, error: type[ProtocolError], limit: int) -> list[list[str]]:
    """Keep known action tokens only (unknown ones are ignored, per protocol) and bound the length."""
    if len(script) > limit:
        raise error(field, f"<{len(script)} entries>", f"at most {limit} entries are accepted")
    return [ACTIONS.known(entry) for entry in script]


def _nesting(value: Any) -> int:
    """How deep maps and arrays nest in ``value`` (iteratively: a hostile message cannot recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_NESTING:
                    return depth + 1
                stack.append((child, depth + 1))
        deepest = max(deepest, depth)
    return deepest


def _as_map(raw: Any, error: type[ProtocolError]) -> dict:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = msgspec.msgpack.decode(raw)
        except msgspec.DecodeError as exc:
            raise error("message", f"<{len(raw)} bytes>", f"not MessagePack: {exc}") from None
        except RecursionError:
            raise error("message", f"<{len(raw)} bytes>", f"maps/arrays nested deeper than {MAX_NESTING} levels") from None
    if not isinstance(raw, dict):
        raise error("message", raw, "must be a MessagePack map")
    for key in raw:
        if not isinstance(key, str):
            raise error("message", key, f"map keys must be strings, got a {type(key).__name__} key")
    if _nesting(raw) > MAX_NESTING:
        raise error("message", "<nested message>", f"maps/arrays nested deeper than {MAX_NESTING} levels")
    return raw


# ---------------------------------------------------------------------------------------------
# init

# init field -> the SessionDefaults field it takes when the client leaves it out
_DEFAULTED = {
    "fps": "fps",
    "num_inference_steps": "num_inference_steps",
    "num_frames": "num_frames",
    "realtime_causal_sink_size": "sink_size",
    "realtime_causal_kv_cache_num_frames": "window_frames",
}


def decode_init(
    raw: bytes | dict,
    *,
    served_model: str,
    defaults: SessionDefaults | None = None,
    limits: InitLimits | None = None,
    requires_first_frame: bool = True,
) -> InitRequest:
    """Validate the first client message; what it leaves out takes ``defaults`` (the served
    checkpoint's). Raises :class:`InvalidInit` naming the field and value."""
    limits = limits or InitLimits()
    defaults = defaults or SessionDefaults()
    message = _as_map(raw, InvalidInit)
    if message.get("type") != "init":
        raise InvalidInit("type", message.get("type"), 'the first message must have type "init"')
    if "prompt" not in message:
        raise InvalidInit("prompt", None, "is required")
    try:
        init = msgspec.convert(_integral_floats_to_int(message, _INIT_INFO), InitRequest)
    except msgspec.ValidationError as exc:
        field = _field_of(exc)
        raise InvalidInit(field, _lookup(message, field), str(exc)) from None

    if len(init.prompt) > 4 * limits.max_prompt_chars:  # not worth cleaning
        raise InvalidInit("prompt", f"<{len(init.prompt)} chars>", f"longer than {limits.max_prompt_chars}")
    updates: dict[str, Any] = {"prompt": normalize_prompt(init.prompt, "prompt", InvalidInit)}
    if len(updates["prompt"]) > limits.max_prompt_chars:
        raise InvalidInit("prompt", f"<{len(updates['prompt'])} chars>", f"longer than {limits.max_prompt_chars}")
    if init.negative_prompt is not None:
        if len(init.negative_prompt) > limits.max_prompt_chars:
            raise InvalidInit(
                "negative_prompt", f"<{len(init.negative_prompt)} chars>", f"longer than {limits.max_prompt_chars}"
            )
        updates["negative_prompt"] = " ".join(html.unescape(init.negative_prompt).split()) or None
    if init.model not in (None, "", served_model):
        raise InvalidInit("model", init.model, f"not served here (served: {served_model!r})")
    updates["model"] = served_model

    if init.first_frame is not None and not isinstance(init.first_frame, (bytes, str)):
        raise InvalidInit("first_frame", init.first_frame, "must be bytes or a string")
    if init.first_frame is None or init.first_frame in (b"", ""):
        if requires_first_frame:
            raise InvalidInit("first_frame", init.first_frame, "is required for image-to-video models")
    elif isinstance(init.first_frame, bytes) and len(init.first_frame) > limits.max_first_frame_bytes:
        raise InvalidInit(
            "first_frame", init.first_frame, f"larger than {limits.max_first_frame_bytes} bytes"
        )

    size = defaults.size if init.size in (None, "") else init.size
    try:
        width, height = parse_size(size)
    except ValueError as exc:
        raise InvalidInit("size", init.size, str(exc)) from None
    multiple = defaults.size_multiple
    for name, side, top in (("width", width, limits.max_width), ("height", height, limits.max_height)):
        if side % multiple or not limits.min_side <= side <= top:
            raise InvalidInit(
                "size", size, f"{name} {side} must be a multiple of {multiple} in [{limits.min_side}, {top}]"
            )
    updates["size"] = f"{width}x{height}"

    # the limits bound what the client asks for; the defaults are the server's own
    if init.fps is not None and not limits.min_fps <= init.fps <= limits.max_fps:
        raise InvalidInit("fps", init.fps, f"must be in [{limits.min_fps:g}, {limits.max_fps:g}]")
    if init.num_frames is not None and init.num_frames > limits.max_num_frames:
        raise InvalidInit("num_frames", init.num_frames, f"above {limits.max_num_frames}")
    if (init.num_inference_steps or 0) > limits.max_inference_steps:
        raise InvalidInit("num_inference_steps", init.num_inference_steps, f"above {limits.max_inference_steps}")
    if (init.realtime_causal_kv_cache_num_frames or 0) > limits.max_window_frames:
        raise InvalidInit(
            "realtime_causal_kv_cache_num_frames", init.realtime_causal_kv_cache_num_frames, f"above {limits.max_window_frames}"
        )
    if (init.realtime_causal_sink_size or 0) > limits.max_sink_frames:
        raise InvalidInit("realtime_causal_sink_size", init.realtime_causal_sink_size, f"above {limits.max_sink_frames}")
    if init.guidance_scale > limits.max_guidance_scale:
        raise InvalidInit("guidance_scale", init.guidance_scale, f"above {limits.max_guidance_scale}")
    if init.condition_inputs is not None and init.condition_inputs.camera_actions is not None:
        script = check_actions(
            init.condition_inputs.camera_actions,
            "condition_inputs.camera_actions",
            InvalidInit,
            limits.max_script_entries,
        )
        updates["condition_inputs"] = ConditionInputs(camera_actions=script)
    for name, default in _DEFAULTED.items():
        if getattr(init, name) is None:
            updates[name] = getattr(defaults, default)
    return msgspec.structs.replace(init, **updates)


# ---------------------------------------------------------------------------------------------
# events


def _event_id(message: dict) -> int | None:
    value = message.get("event_id")
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise InvalidEvent("event_id", value, "must be an integer in [0, 2**32)")
    return value


def _camera_payload(payload: Any, field: str, limits: InitLimits) -> dict[str, Any]:
    if isinstance(payload, list):
        try:
            script = msgspec.convert(payload, list[list[str]])
        except msgspec.ValidationError as exc:
            raise InvalidEvent(field, payload, str(exc)) from None
        return {"camera_script": check_actions(script, field, InvalidEvent, limits.max_script_entries)}
    if isinstance(payload, dict) and payload.get("mode") == "state":
        transitions_raw = payload.get("transitions")
        if not isinstance(transitions_raw, list):
            raise InvalidEvent(f"{field}.transitions", transitions_raw, "must be a list")
        if len(transitions_raw) > limits.max_script_entries:
            raise InvalidEvent(
                f"{field}.transitions", f"<{len(transitions_raw)} entries>", f"at most {limits.max_script_entries}"
            )
        try:
            transitions = msgspec.convert(
                _integral_floats_to_int(transitions_raw, _TRANSITIONS_INFO), list[StateTransition]
            )
        except msgspec.ValidationError as exc:
            raise InvalidEvent(f"{field}.transitions", transitions_raw, str(exc)) from None
        known = [msgspec.structs.replace(t, actions=tuple(ACTIONS.known(t.actions))) for t in transitions]
        return {"camera_state": known}
    raise InvalidEvent(field, payload, 'must be list[list[str]] or {"mode": "state", "transitions": [...]}')


def _event_prompt(text: str, field: str, limits: InitLimits) -> str:
    """A prompt event is capped like the init's prompt (before any cleaning, so a huge one costs nothing)."""
    if len(text) > 4 * limits.max_prompt_chars:
        raise InvalidEvent(field, f"<{len(text)} chars>", f"longer than {limits.max_prompt_chars}")
    prompt = normalize_prompt(text, field, InvalidEvent)
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidEvent(field, f"<{len(prompt)} chars>", f"longer than {limits.max_prompt_chars}")
    return prompt


def decode_event(raw: bytes | dict, *, limits: InitLimits | None = None) -> ClientEvent:
    """Validate a runtime event. Raises :class:`InvalidEvent` naming the field and value."""
    limits = limits or InitLimits()
    message = _as_map(raw, InvalidEvent)
    if message.get("type") != "event":
        raise InvalidEvent("type", message.get("type"), 'runtime messages must have type "event"')
    kind = message.get("kind")
    event_id = _event_id(message)
    payload = message.get("payload")
    if kind == "prompt":
        if not isinstance(payload, str):
            raise InvalidEvent("payload", payload, "a prompt event's payload must be a string")
        return ClientEvent(kind=kind, event_id=event_id, prompt=_event_prompt(payload, "payload", limits))
    if kind == "camera_actions":
        return ClientEvent(kind=kind, event_id=event_id, **_camera_payload(payload, "payload", limits))
    if kind == "composite_input":
        if not isinstance(payload, dict):
            raise InvalidEvent("payload", payload, "a composite_input payload must be a map")
        input_types = payload.get("input_types")
        if (
            not isinstance(input_types, list)
            or not input_types
            or any(t not in ("prompt", "camera_actions") for t in input_types)
        ):
            raise InvalidEvent(
                "payload.input_types", input_types, 'must be a non-empty list of "prompt", "camera_actions"'
            )
        parts: dict[str, Any] = {}
        if "prompt" in input_types:
            prompt = payload.get("prompt")
            if not isinstance(prompt, str):
                raise InvalidEvent("payload.prompt", prompt, "must be a string when listed in input_types")
            parts["prompt"] = _event_prompt(prompt, "payload.prompt", limits)
        if "camera_actions" in input_types:
            parts.update(_camera_payload(payload.get("camera_actions"), "payload.camera_actions", limits))
        return ClientEvent(kind=kind, event_id=event_id, **parts)
    raise InvalidEvent("kind", kind, 'must be "prompt", "camera_actions" or "composite_input"')
