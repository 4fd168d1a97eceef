"""Parsing and message building shared by check, bench and record (no server needed)."""

import pytest

from lingbot_ray.client.bench import BenchSpec, _events, steady_fps
from lingbot_ray.client.record import KeyHolds, load_script
from lingbot_ray.client.session import SessionResult, make_init, parse_actions, ws_url


def test_parse_actions():
    assert parse_actions("w*6,_*6") == [["w"]] * 6 + [[]] * 6
    assert parse_actions("w+l*2, ,s") == [["w", "l"], ["w", "l"], [], ["s"]]
    assert parse_actions("i*0") == []
    with pytest.raises(ValueError, match=r"unknown keys \['x'\]"):
        parse_actions("w,x*2")
    with pytest.raises(ValueError, match="'many' is not an integer"):
        parse_actions("w*many")


def test_ws_url_and_init():
    assert ws_url("http://h:8000") == "ws://h:8000/v1/realtime_video/generate"
    assert ws_url("https://h/") == "wss://h/v1/realtime_video/generate"
    assert ws_url("ws://h:1/v1/realtime_video/generate") == "ws://h:1/v1/realtime_video/generate"
    with pytest.raises(ValueError, match="ftp://h"):
        ws_url("ftp://h")
    init = make_init("p", b"img", seed=7, max_chunks=3, output_format=None, actions=[["w"], []])
    assert init == {"type": "init", "prompt": "p", "seed": 7, "first_frame": b"img", "max_chunks": 3,
                    "condition_inputs": {"camera_actions": [["w"], []]}}


def test_bench_events_and_steady_fps():
    events = _events(BenchSpec(url="ws://x", chunks=8, event_every=2))
    assert [e.at_chunk for e in events] == [1, 3, 5, 7]
    assert [e.message["event_id"] for e in events] == [1, 2, 3, 4]
    assert _events(BenchSpec(url="ws://x", event_every=0)) == []
    result = SessionResult(stats=[{"num_frames": 9}, {"num_frames": 12}, {"num_frames": 12}, {"num_frames": 12}],
                           stats_arrival_s=[1.0, 1.5, 2.0, 2.5])
    assert steady_fps(result, 2) == pytest.approx(24 / 1.0)
    assert steady_fps(result, 0) == pytest.approx(45 / 2.5)
    assert steady_fps(result, 4) is None


def test_key_holds_follow_repeats_and_release():
    holds = KeyHolds(release_after_s=0.5)
    assert holds.press("w", 0.0) == ["w"]
    assert holds.press("w", 0.3) is None  # auto-repeat: still held, no change
    assert holds.press("l", 0.4) == ["l", "w"]
    assert holds.press("x", 0.4) is None  # not a camera key
    assert holds.expire(0.7) is None
    assert holds.expire(0.85) == ["l"]  # w's last repeat was at 0.3
    assert holds.press(" ", 0.9) == []  # space releases everything
    assert holds.press(" ", 1.0) is None


def test_load_script(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"actions": "w*2", "events": [{"at_chunk": 2, "kind": "prompt", "payload": "night"}]}')
    script = load_script(path)
    assert script["actions"] == [["w"], ["w"]]
    assert script["events"][0].at_chunk == 2 and script["events"][0].message == {"kind": "prompt", "payload": "night", "type": "event"}
    path.write_text('{"actions": "w", "speed": 2}')
    with pytest.raises(ValueError, match=r"unknown script keys \['speed'\]"):
        load_script(path)
    path.write_text('{"events": [{"kind": "prompt", "payload": "x"}]}')
    with pytest.raises(ValueError, match=r"events\[0\] needs an integer at_chunk"):
        load_script(path)


def test_latency_guard_file(tmp_path):
    from lingbot_ray.client.consistency import Guards, latency_checks, load_guards

    path = tmp_path / "guards.yaml"
    path.write_text("cpu-2core:\n  chunk_total_ms_p95: 100\n  scheduler_forward_ms_p95: 90\n")
    assert load_guards(path, "cpu-2core") == Guards({"chunk_total_ms": 100.0, "scheduler_forward_ms": 90.0})
    assert load_guards(path, "gpu-h100") is None
    stats = [{"chunk_total_ms": v, "scheduler_forward_ms": v} for v in (500, 500, 80, 95)]  # 2 warm-up chunks
    checks = {c.field: c for c in latency_checks(stats, load_guards(path, "cpu-2core"))}
    assert checks["chunk_total_ms"].passed and not checks["scheduler_forward_ms"].passed
    path.write_text("cpu-2core:\n  chunk_total_ms_p50: 100\n")
    with pytest.raises(ValueError, match=r"unknown guard keys \['chunk_total_ms_p50'\]"):
        load_guards(path, "cpu-2core")


def test_latency_limits_scale_with_the_machine_speed_the_probe_measures(tmp_path):
    """A machine the probe finds twice as slow as the one the limits were set on gets twice the limits,
    one twice as fast half of them; a class without a probe figure ignores the probe."""
    from lingbot_ray.client.consistency import latency_checks, load_guards

    path = tmp_path / "guards.yaml"
    path.write_text("cpu-2core:\n  chunk_total_ms_p95: 100\n  speed_probe_ms: 40\nplain:\n  chunk_total_ms_p95: 100\n")
    guards = load_guards(path, "cpu-2core")
    assert guards.speed_probe_ms == 40.0 and guards.scale(None) == 1.0
    stats = [{"chunk_total_ms": v} for v in (500, 500, 150, 190)]
    (slow,) = latency_checks(stats, guards, probe_ms=80.0)
    assert slow.passed and (slow.limit_ms, slow.scale) == (200.0, 2.0)
    quick = [{"chunk_total_ms": v} for v in (250, 250, 28, 30)]
    (fast,) = latency_checks(quick, guards, probe_ms=20.0)
    assert fast.passed and (fast.limit_ms, fast.scale) == (50.0, 0.5)
    (regressed,) = latency_checks([{"chunk_total_ms": 3 * s["chunk_total_ms"]} for s in quick], guards, probe_ms=20.0)
    assert not regressed.passed  # 3x as slow on the fast machine: within the class's limit as written, not within its own
    (plain,) = latency_checks(stats, load_guards(path, "plain"), probe_ms=80.0)
    assert not plain.passed and plain.scale == 1.0


def test_the_speed_probe_and_the_local_server_test():
    import torch

    from lingbot_ray.client.consistency import is_local, speed_probe_ms

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert speed_probe_ms(repeats=3) > 0 and torch.get_num_threads() == 1  # runs on its own threads, then puts them back
    finally:
        torch.set_num_threads(threads)
    assert is_local("ws://127.0.0.1:8000") and is_local("localhost:8000") and is_local("http://[::1]:8000/v1/realtime")
    assert not is_local("wss://world.example.com") and not is_local("ws://10.0.0.5:8000")
