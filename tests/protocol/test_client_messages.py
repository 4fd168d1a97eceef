import msgspec
import pytest

from lingbot_ray.protocol import (
    INVALID_EVENT,
    INVALID_INIT,
    InitLimits,
    InvalidEvent,
    InvalidInit,
    SessionDefaults,
    decode_event,
    decode_init,
)

SERVED = "lingbot-world-fast"
DEFAULTS = SessionDefaults()


def init(**fields):
    message = {"type": "init", "prompt": "a quiet alley", "first_frame": b"\x89PNG..."}
    message.update(fields)
    return decode_init(msgspec.msgpack.encode(message), served_model=SERVED, defaults=DEFAULTS)


def test_defaults_follow_the_spec():
    req = init()
    assert (req.width, req.height, req.size) == (832, 480, "832x480")
    assert req.fps == 16.0 and req.seed == 42 and req.num_inference_steps == 4
    assert req.guidance_scale == 1.0 and req.quality == "lossless"
    assert req.num_frames is None and req.max_chunks is None
    assert req.realtime_output_format is None and req.realtime_output_pacing is False
    assert req.enable_upscaling is False and req.upscaling_scale == 4
    assert req.enable_frame_interpolation is False and req.frame_interpolation_exp == 1
    assert req.frame_interpolation_scale == 1.0
    assert req.model == SERVED


@pytest.mark.parametrize(("fmt", "quality"), [("webp", 90), ("jpeg", 95), ("raw", 90)])
def test_preview_quality_defaults_per_format(fmt, quality):
    assert init(realtime_output_format=fmt).preview_quality == quality
    assert init(realtime_output_format=fmt, output_compression=33).preview_quality == 33


def test_lenient_numbers_as_real_clients_send_them():
    req = init(seed=123456.0, guidance_scale=1, num_frames=24.0, fps=25)
    assert req.seed == 123456 and isinstance(req.seed, int)
    assert req.guidance_scale == 1.0 and isinstance(req.guidance_scale, float)
    assert req.num_frames == 24 and isinstance(req.num_frames, int)


def test_unknown_keys_are_ignored():
    assert init(some_future_field={"x": 1}, another=[1, 2]).prompt == "a quiet alley"


def test_prompt_is_normalised():
    assert init(prompt="  A &amp; B\n\t  rain&#39;s  ").prompt == "A & B rain's"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 1.5),
        ("seed", -1),
        ("seed", "42"),
        ("seed", True),
        ("num_inference_steps", 0),
        ("num_inference_steps", 4.2),
        ("guidance_scale", "1"),
        ("guidance_scale", -0.5),
        ("fps", 0),
        ("fps", 1000),
        ("num_frames", 0),
        ("num_frames", 10_000),
        ("max_chunks", 0),
        ("realtime_causal_sink_size", -1),
        ("realtime_causal_kv_cache_num_frames", 0),
        ("realtime_output_format", "gif"),
        ("output_compression", 0),
        ("output_compression", 101),
        ("quality", "medium"),
        ("enable_upscaling", 1),
        ("frame_interpolation_exp", 0),
        ("frame_interpolation_scale", 8.0),
        ("size", "832x481"),
        ("size", "832"),
        ("size", "16x16"),
        ("size", "4096x4096"),
        ("size", 832),
        ("prompt", ""),
        ("prompt", " \n "),
        ("prompt", 3),
        ("model", "other-model"),
        ("first_frame", 12),
        ("condition_inputs", {"camera_actions": [["w", 3]]}),
        ("condition_inputs", {"camera_actions": "w"}),
        ("condition_inputs", {"camera_actions": [["w"]] * 513}),
    ],
)
def test_invalid_init_names_field_and_value(field, value):
    with pytest.raises(InvalidInit) as info:
        init(**{field: value})
    assert info.value.content == INVALID_INIT
    assert info.value.field.split(".")[0].split("[")[0] == field
    assert field in str(info.value)


def test_missing_prompt_type_and_first_frame():
    with pytest.raises(InvalidInit, match="prompt"):
        decode_init({"type": "init", "first_frame": b"x"}, served_model=SERVED, defaults=DEFAULTS)
    with pytest.raises(InvalidInit, match="type"):
        decode_init({"type": "event", "prompt": "x"}, served_model=SERVED, defaults=DEFAULTS)
    with pytest.raises(InvalidInit, match="first_frame"):
        decode_init({"type": "init", "prompt": "x"}, served_model=SERVED, defaults=DEFAULTS)
    text_only = decode_init(
        {"type": "init", "prompt": "x"}, served_model=SERVED, defaults=DEFAULTS, requires_first_frame=False
    )
    assert text_only.first_frame is None


@pytest.mark.parametrize("raw", [b"\xc1\xc1", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode("init")])
def test_undecodable_or_non_map_init(raw):
    with pytest.raises(InvalidInit):
        decode_init(raw, served_model=SERVED, defaults=DEFAULTS)


def test_limits_come_from_config():
    limits = InitLimits(
        max_width=512, max_height=512, max_num_frames=12, max_inference_steps=4,
        max_window_frames=18, max_sink_frames=9, max_guidance_scale=5.0,
    )
    kwargs = dict(served_model=SERVED, defaults=SessionDefaults(size="256x160"), limits=limits)
    base = {"type": "init", "prompt": "x", "first_frame": b"x"}
    assert decode_init({**base, "size": "512x512"}, **kwargs).size == "512x512"
    assert decode_init({**base, "realtime_causal_kv_cache_num_frames": 18, "realtime_causal_sink_size": 9}, **kwargs)
    for extra in (
        {"size": "528x512"},
        {"num_frames": 13},
        {"num_inference_steps": 5},
        {"realtime_causal_kv_cache_num_frames": 19},
        {"realtime_causal_sink_size": 10},
        {"guidance_scale": 5.5},
    ):
        with pytest.raises(InvalidInit, match=next(iter(extra))):
            decode_init({**base, **extra}, **kwargs)


def test_initial_camera_script_drops_unknown_tokens():
    req = init(condition_inputs={"camera_actions": [["w", "x", "j"], [], ["jump"]]})
    assert req.camera_script == [["w", "j"], [], []]


def test_model_may_be_empty_or_the_served_one():
    assert init(model="").model == SERVED
    assert init(model=SERVED).model == SERVED


# ----------------------------------------------------------------------------------- events


def event(**fields):
    return decode_event(msgspec.msgpack.encode({"type": "event", **fields}))


def test_prompt_event():
    ev = event(kind="prompt", payload="  new   scene ", event_id=7)
    assert (ev.kind, ev.prompt, ev.event_id) == ("prompt", "new scene", 7)


def test_camera_script_and_state_events():
    script = event(kind="camera_actions", payload=[["w"], ["w", "q"], []])
    assert script.camera_script == [["w"], ["w"], []] and script.camera_state is None and script.event_id is None
    state = event(
        kind="camera_actions",
        event_id=70000.0,
        payload={"mode": "state", "transitions": [{"actions": ["w"], "client_ts_ms": 123456.0}, {"actions": []}]},
    )
    assert state.event_id == 70000
    assert [t.actions for t in state.camera_state] == [("w",), ()]
    assert state.camera_state[0].client_ts_ms == 123456 and state.camera_state[1].client_ts_ms is None


def test_composite_event_carries_both_parts():
    ev = event(
        kind="composite_input",
        event_id=3,
        payload={"input_types": ["prompt", "camera_actions"], "prompt": "p", "camera_actions": [["d"]]},
    )
    assert ev.prompt == "p" and ev.camera_script == [["d"]] and ev.event_id == 3
    only_camera = event(
        kind="composite_input",
        payload={"input_types": ["camera_actions"], "prompt": "ignored", "camera_actions": {"mode": "state", "transitions": []}},
    )
    assert only_camera.prompt is None and only_camera.camera_state == []


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "prompt", "payload": ""},
        {"kind": "prompt", "payload": 5},
        {"kind": "zoom", "payload": 1},
        {"kind": "camera_actions", "payload": "w"},
        {"kind": "camera_actions", "payload": [["w", 1]]},
        {"kind": "camera_actions", "payload": {"mode": "joystick"}},
        {"kind": "camera_actions", "payload": {"mode": "state", "transitions": [{"actions": "w"}]}},
        {"kind": "camera_actions", "payload": {"mode": "state", "transitions": [{"actions": [], "client_ts_ms": 1.5}]}},
        {"kind": "camera_actions", "payload": [["w"]] * 513},
        {"kind": "prompt", "payload": "x", "event_id": -1},
        {"kind": "prompt", "payload": "x", "event_id": 2**32},
        {"kind": "prompt", "payload": "x", "event_id": 1.5},
        {"kind": "prompt", "payload": "x", "event_id": "1"},
        {"kind": "composite_input", "payload": {"input_types": []}},
        {"kind": "composite_input", "payload": {"input_types": ["prompt"]}},
        {"kind": "composite_input", "payload": {"input_types": ["camera_actions"], "camera_actions": None}},
        {"kind": "composite_input", "payload": ["prompt"]},
    ],
)
def test_invalid_events(fields):
    with pytest.raises(InvalidEvent) as info:
        event(**fields)
    assert info.value.content == INVALID_EVENT


def test_second_init_is_an_invalid_event():
    with pytest.raises(InvalidEvent, match="type"):
        decode_event(msgspec.msgpack.encode({"type": "init", "prompt": "x"}))


@pytest.mark.parametrize("levels", [20, 100_000])
def test_deeply_nested_messages_are_refused_naming_the_nesting(levels):
    """Nesting beyond any real message is refused at decode with the protocol's error (no
    RecursionError), whether the decoder would manage it or not."""
    tail = b"\x91" * levels + b"\x01"  # [[[...1...]]]
    init = b"\x84\xa4type\xa4init\xa6prompt\xa1x\xabfirst_frame\xc4\x011\xa7padding" + tail
    event = b"\x83\xa4type\xa5event\xa4kind\xa6prompt\xa7payload" + tail
    with pytest.raises(InvalidInit, match="nested deeper than 16 levels") as refused:
        decode_init(init, served_model="m", defaults=SessionDefaults(size="64x64"))
    assert refused.value.field == "message"
    with pytest.raises(InvalidEvent, match="nested deeper than 16 levels"):
        decode_event(event)


def test_prompt_events_are_capped_like_the_init_prompt():
    limits = InitLimits(max_prompt_chars=100)
    huge = "x" * 10_000_000  # once accepted: the shared text encoder spent a minute on it
    for message in (
        {"type": "event", "kind": "prompt", "payload": huge},
        {"type": "event", "kind": "composite_input", "payload": {"input_types": ["prompt"], "prompt": "y" * 101}},
    ):
        with pytest.raises(InvalidEvent, match="longer than 100") as refused:
            decode_event(msgspec.msgpack.encode(message), limits=limits)
        assert len(str(refused.value)) < 300
    assert decode_event({"type": "event", "kind": "prompt", "payload": "a  b" * 20}, limits=limits).prompt


def test_every_numeric_init_field_is_bounded_on_both_sides():
    for fps in (1e-300, 0.5, 0, -1, 121):
        with pytest.raises(InvalidInit) as refused:
            init(fps=fps)
        assert refused.value.field == "fps"
    assert init(fps=1).fps == 1


def test_replies_and_logs_never_carry_a_client_value_at_full_length_or_a_heap_address():
    huge_enum = "webp" * 1_000_000
    with pytest.raises(InvalidInit) as refused:
        init(realtime_output_format=huge_enum)
    assert refused.value.field == "realtime_output_format" and len(str(refused.value)) < 400
    ext = msgspec.msgpack.encode({"type": "init", "prompt": "x", "first_frame": msgspec.msgpack.Ext(1, b"abc")})
    with pytest.raises(InvalidInit) as refused:
        decode_init(ext, served_model="m", defaults=SessionDefaults(size="64x64"))
    assert "0x" not in str(refused.value) and refused.value.field == "first_frame"
    with pytest.raises(InvalidEvent, match="map keys must be strings") as refused:
        decode_event(msgspec.msgpack.encode({"type": "event", 7: "x", "kind": "prompt"}))
    assert refused.value.field == "message"
