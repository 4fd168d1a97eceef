"""decode_init fills what the client leaves out from the served checkpoint's SessionDefaults."""

import pytest

from lingbot_ray.protocol import InitLimits, InvalidInit, SessionDefaults, decode_init

BASE = {"type": "init", "prompt": "a street", "first_frame": b"x"}
CHECKPOINT = SessionDefaults(
    size="160x96", fps=24.0, num_inference_steps=3, num_frames=12, sink_size=2, window_frames=9, size_multiple=32
)


def decode(defaults=CHECKPOINT, **fields):
    return decode_init({**BASE, **fields}, served_model="m", defaults=defaults)


def test_the_default_defaults_are_the_protocols():
    assert SessionDefaults() == SessionDefaults(
        size="832x480", fps=16.0, num_inference_steps=4, num_frames=None, sink_size=None, window_frames=None, size_multiple=16
    )
    init = decode_init(BASE, served_model="m")
    assert (init.size, init.fps, init.num_inference_steps, init.num_frames) == ("832x480", 16.0, 4, None)
    assert init.realtime_causal_sink_size is None and init.realtime_causal_kv_cache_num_frames is None


def test_omitted_fields_take_the_defaults():
    init = decode()
    assert (init.size, init.fps, init.num_inference_steps, init.num_frames) == ("160x96", 24.0, 3, 12)
    assert (init.realtime_causal_sink_size, init.realtime_causal_kv_cache_num_frames) == (2, 9)
    assert decode(size="", fps=None, num_inference_steps=None).size == "160x96"  # empty or null is omitted


def test_given_fields_win():
    init = decode(
        size="320x192", fps=12, num_inference_steps=2, num_frames=24,
        realtime_causal_sink_size=0, realtime_causal_kv_cache_num_frames=6,
    )
    assert (init.size, init.fps, init.num_inference_steps, init.num_frames) == ("320x192", 12.0, 2, 24)
    assert (init.realtime_causal_sink_size, init.realtime_causal_kv_cache_num_frames) == (0, 6)


def test_the_size_multiple_comes_from_the_defaults():
    assert decode(SessionDefaults(), size="176x96").size == "176x96"  # 16 divides both
    with pytest.raises(InvalidInit, match="multiple of 32") as refused:
        decode(size="176x96")
    assert refused.value.field == "size"
    assert decode(SessionDefaults(size="64x64", size_multiple=8), size="72x40").size == "72x40"


def test_limits_bound_the_clients_values_not_the_servers_defaults():
    limits = InitLimits(max_num_frames=6)
    assert decode_init(BASE, served_model="m", defaults=CHECKPOINT, limits=limits).num_frames == 12
    with pytest.raises(InvalidInit, match="num_frames"):
        decode_init({**BASE, "num_frames": 7}, served_model="m", defaults=CHECKPOINT, limits=limits)


@pytest.mark.parametrize(
    "field, value",
    [("size", "big"), ("fps", 0.0), ("num_inference_steps", 0), ("size_multiple", 0),
     ("num_frames", 0), ("window_frames", 0), ("sink_size", -1)],
)
def test_bad_defaults_name_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=field if field != "size" else "'big'"):
        SessionDefaults(**{field: value})
