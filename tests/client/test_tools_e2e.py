"""bench and record against a real server (the app in process, real WebSockets), as a user runs them."""

import asyncio
import json
import os
import pathlib
import threading
import time

import av
import numpy as np
import pytest
import yaml
from PIL import Image

from lingbot_ray.client.bench import bench_main
from lingbot_ray.client.record import record, record_main
from lingbot_ray.client.session import make_init, ws_url
from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.local import serve_locally

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "lingbot_ray", "webui", "samples", "world-dusk.png")


@pytest.fixture(scope="module")
def app_args(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    # the first frame's condition in one encoder step, as the embedded default serves it: a session at
    # a new size then opens in well under a second (to the encoder's fixed point it took ~4 s at 192x112)
    build_tiny_checkpoint(path, condition_frames=1)
    return {"model": {"path": str(path), "torch_threads": 1}, "dit": {"sessions_per_group": 1}}


@pytest.fixture(scope="module")
def server(app_args):
    with serve_locally(app_args) as srv:
        yield srv.url


def wait_for_free_slot(url):
    """The single slot frees a moment after the previous session closed."""
    from lingbot_ray.client.session import run_session

    for _ in range(50):
        result = asyncio.run(run_session(ws_url(url), make_init("x", pathlib.Path(SAMPLE).read_bytes(), max_chunks=1)))
        if not result.refused:
            return
        time.sleep(0.2)
    raise AssertionError("the slot never freed")


def test_bench_reports_every_figure_and_counts_refusals(server, tmp_path, capsys):
    wait_for_free_slot(server)
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    code = bench_main(["--url", server, "--sessions", "2", "--chunks", "6", "--out", str(out), "--plot", str(plot), "--no-progress"])
    assert code == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["sessions"] == 2 and summary["refused"] == 1 and summary["completed"] == 1  # one slot
    assert summary["chunks"] == 4  # 6 chunks minus 2 warm-up, from the served session
    for name in ("chunk_total_ms", "scheduler_forward_ms", "dit_ms", "vae_ms", "queue_wait_ms", "raw_payload_build_ms"):
        assert summary["fields_ms"][name]["n"] == 4 and summary["fields_ms"][name]["p95"] >= summary["fields_ms"][name]["p50"]
    assert summary["fields_ms"]["chunk_total_ms"]["p50"] > 0
    assert summary["generated_fps_per_session"]["n"] == 1 and summary["generated_fps_total"] > 0
    assert summary["time_to_first_frame_s"]["p50"] > 0
    assert summary["event_latency_ms"]["n"] >= 1 and summary["event_latency_ms"]["p50"] > 0
    assert summary["bytes_per_s_total"] > 160 * 96 * 3  # raw frames
    with Image.open(plot) as image:
        assert image.size[0] > 400
    printed = capsys.readouterr().out
    assert "1 refused" in printed and "chunk_total_ms" in printed


def test_bench_vs_inprocess_prints_ratios(server, app_args, tmp_path, capsys):
    wait_for_free_slot(server)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "lingbot_ray.serve.app:build_app", "args": app_args}]}))
    out = tmp_path / "bench.json"
    assert bench_main(["--url", server, "--chunks", "4", "--vs-inprocess", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["in_process"]["summary"]["completed"] == 1
    ratios = result["ratio_served_to_in_process"]
    assert 0.2 < ratios["generated_fps_per_session_p50"] < 5 and 0.2 < ratios["chunk_total_ms_p50"] < 5
    assert "ratio served / in-process" in capsys.readouterr().out


def test_record_mp4_with_stats(server, tmp_path):
    wait_for_free_slot(server)
    out = tmp_path / "walk.mp4"
    assert record_main([str(out), "--url", server, "--actions", "w*6,l*3", "--chunks", "3", "--first-frame", SAMPLE]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == 16
    assert len(frames) == 9 + 12 + 12 and frames[0].shape == (96, 160, 3)
    stats = [json.loads(line) for line in out.with_suffix(".stats.jsonl").read_text().splitlines()]
    assert [s["chunk_index"] for s in stats] == [0, 1, 2] and all(s["type"] == "chunk_stats" for s in stats)


def test_record_png_is_lossless_in_both_lossless_transports(server, tmp_path):
    folders = {}
    for fmt in ("raw", "delta-gzip"):
        wait_for_free_slot(server)
        folders[fmt] = tmp_path / fmt
        assert record_main([str(folders[fmt]), "--url", server, "--format", fmt, "--chunks", "2", "--seed", "5", "--actions", "d*4"]) == 0
    names = sorted(p.name for p in folders["raw"].glob("frame_*.png"))
    assert len(names) == 21 and names == sorted(p.name for p in folders["delta-gzip"].glob("frame_*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(folders["raw"] / name)), np.asarray(Image.open(folders["delta-gzip"] / name)))
    assert len((folders["raw"] / "stats.jsonl").read_text().splitlines()) == 2


def test_record_live_keys_from_a_terminal(server, tmp_path):
    """Keys typed on a pseudo-terminal become held-state events that the stream echoes; Q stops."""
    wait_for_free_slot(server)
    master, slave = os.openpty()
    init = make_init("x", pathlib.Path(SAMPLE).read_bytes(), output_format="raw")  # no max_chunks: runs until Q

    written = tmp_path / "live" / "stats.jsonl"  # flushed per chunk

    def chunks() -> list[dict]:
        try:
            return [json.loads(line) for line in written.read_text().splitlines() if line.endswith("}")]
        except FileNotFoundError:
            return []

    def wait_for(condition) -> None:  # on the stream itself, with a generous deadline
        deadline = time.monotonic() + 180
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)

    def type_keys():
        wait_for(lambda: len(chunks()) >= 1)  # streaming
        for _ in range(15):  # a held key auto-repeats (the terminal's pace, not the server's)
            os.write(master, b"w")
            time.sleep(0.1)
        # released after --release-after; Q once the release is echoed and the stream is long enough
        wait_for(lambda: len(chunks()) >= 4 and any(c["event_id"] == 2 for c in chunks()))
        os.write(master, b"q")

    typist = threading.Thread(target=type_keys)
    typist.start()
    try:
        result, frames, stats_path = asyncio.run(record(ws_url(server), init, tmp_path / "live", live_fd=slave, release_after_s=0.4))
    finally:
        typist.join()
        os.close(master)
        os.close(slave)
    echoed = [s["event_id"] for s in result.stats]
    assert 1 in echoed and 2 in echoed, echoed  # press w (event 1), its release (event 2)
    assert result.close_code == 1000 and not result.errors
    assert frames == sum(s["num_frames"] for s in result.stats) and frames >= 9 + 12 * 3
    assert len(stats_path.read_text().splitlines()) == len(result.stats)


def test_bench_for_a_duration_with_another_transport_and_size(server, tmp_path):
    wait_for_free_slot(server)
    out = tmp_path / "bench.json"
    assert bench_main(["--url", server, "--duration", "5", "--format", "webp", "--size", "192x112", "--warmup", "1",
                       "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    summary, session = result["summary"], result["sessions"][0]
    assert summary["sessions"] == 1 and summary["failed"] == 0 and summary["chunks"] >= 1
    assert session["close_code"] == 1000 and 4 <= session["elapsed_s"] < 30  # the client ended it
    assert {s["content_type"] for s in session["stats"]} == {"image/webp"}
    assert all((s["width"], s["height"]) == (192, 112) for s in session["stats"])
