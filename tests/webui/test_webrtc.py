"""The WebUI's WebRTC transport in a real browser (Playwright + Debian's chromium) against the in-process
ingress: the session's video track plays in the page's <video>, keys go over the data channel and
change the picture, chunk_stats come back on it; a refused offer is reported. Also measures
glass-to-glass latency (an event sent → the first frame of the chunk that echoes it on screen) for
WebRTC and WebSocket+WebP, and prints it (``python -m pytest tests/webui/test_webrtc.py -s``).
"""

from __future__ import annotations

import os
import statistics

import pytest

pytest.importorskip("aiortc", reason="WebRTC needs aiortc (pip install aiortc)")
from tests.webui.test_webui import browser, log_text, open_ui, page, stat  # noqa: E402,F401 (browser, page: the shared fixtures)

from lingbot_ray.serve.local import serve_locally  # noqa: E402

# When each event is sent, after the previous one reached the screen: spread over a chunk's 0.75 s,
# so that the figures do not all fall at one phase of the chunk boundaries (an event waits for the
# next chunk's conditions to be sampled).
GLASS_DELAYS_MS = (0, 375, 125, 500, 250, 625)


@pytest.fixture(scope="module")
def server():
    config = {
        "model": {"path": "embedded:lingbot-world-tiny", "torch_threads": 1},
        "dit": {"sessions_per_group": 2},
        # media on loopback only: the test needs no network interface
        "ingress": {"webrtc_host_addresses": ["127.0.0.1"]},
    }
    with serve_locally(config) as srv:
        yield f"http://{srv.address}"




def video_digest(page) -> list[int]:
    """The <video>'s current picture, drawn to a canvas and read back: the sum of each of 8 bands."""
    return page.evaluate(
        """() => {
        const v = document.getElementById('video');
        const c = document.createElement('canvas');
        c.width = v.videoWidth;
        c.height = v.videoHeight;
        const g = c.getContext('2d');
        g.drawImage(v, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        const bands = new Array(8).fill(0);
        for (let i = 0; i < d.length; i += 4) bands[Math.min(7, Math.floor(i / 4 / c.width * 8 / c.height))] += d[i] + d[i + 1] + d[i + 2];
        return bands;
    }"""
    )


def frames_shown(page) -> int:
    return page.evaluate("window.lingbot.state.framesDrawn")


def hold_and_release(page, keys: str, delays_ms: tuple[int, ...]) -> list[float]:
    """Hold and release keys in turn, one event per delay (waited after the previous event reached
    the screen); the events' glass-to-glass times in ms."""
    for index, delay in enumerate(delays_ms):
        key = keys[index // 2 % len(keys)]
        samples = page.evaluate("window.lingbot.state.glassSamples.length")
        page.wait_for_timeout(delay)
        (page.keyboard.down if index % 2 == 0 else page.keyboard.up)(key)
        page.wait_for_function(f"window.lingbot.state.glassSamples.length > {samples}", timeout=30000)
    return [sample["ms"] for sample in page.evaluate("window.lingbot.state.glassSamples")]


def start(page, server, transport: str, *, codec: str | None = None, max_chunks: int | None = None, **fields) -> None:
    open_ui(page, server)
    page.select_option("#transport", transport)
    if codec:
        page.select_option("#video-codec", codec)
    if max_chunks:
        page.uncheck("#continuous")
        page.fill("#max-chunks", str(max_chunks))
    for selector, value in fields.items():
        page.fill(selector, value)
    page.click("#start")


def test_webrtc_session_plays_reacts_to_keys_and_reports_chunk_stats(page, server):
    start(page, server, "webrtc", **{"#video-kbps": "800"})
    assert page.evaluate("document.getElementById('video').hidden") is False
    page.wait_for_function("window.lingbot.state.stats.chunks >= 1", timeout=60000)
    page.wait_for_function("window.lingbot.state.framesDrawn >= 2", timeout=20000)
    # decoded frames at the session's size, not black, and moving
    assert page.evaluate("[document.getElementById('video').videoWidth, document.getElementById('video').videoHeight]") == [160, 96]
    assert [stat(page, "width"), stat(page, "height")] == [160, 96]
    first = video_digest(page)
    assert sum(first) > 0, "the video is black"
    page.wait_for_function(f"window.lingbot.state.framesDrawn >= {frames_shown(page) + 4}", timeout=20000)
    assert video_digest(page) != first, "the video did not change"

    # a held key goes over the data channel, comes back in chunk_stats, and changes the picture
    assert stat(page, "lastEventId") is None
    before = video_digest(page)
    page.keyboard.down("j")
    page.wait_for_function("window.lingbot.state.stats.glassEventId >= 1", timeout=30000)
    page.wait_for_function(f"window.lingbot.state.framesDrawn >= {frames_shown(page) + 6}", timeout=20000)
    page.keyboard.up("j")
    assert video_digest(page) != before, "the picture did not change after the held key"
    assert stat(page, "lastEventId") >= 1 and stat(page, "eventLatencyMs") > 0
    assert "camera state [j]" in log_text(page) and "VP8 800 kbps" in log_text(page)

    # chunk_stats arrive on the data channel and fill the panel
    page.wait_for_function("window.lingbot.state.stats.chunks >= 3", timeout=30000)
    assert stat(page, "wsPayloadBytes") > 0 and stat(page, "bytesPerChunk") == stat(page, "wsPayloadBytes")
    for cell in ["st-gen-fps", "st-chunk-ms", "st-event-ms", "st-glass-ms", "st-bytes", "st-decode-ms"]:
        assert page.inner_text(f"#{cell}") != "—", cell
    # every frame the server sent so far was shown: the frame numbers the glass figure relies on
    assert frames_shown(page) >= page.evaluate("window.lingbot.state.rtcFramesBefore") - 1

    page.click("#stop")
    page.wait_for_function("window.lingbot.state.stats.closeCode !== null", timeout=10000)
    assert stat(page, "closeCode") == 1000 and "closed: client stop" in log_text(page)
    assert not page.page_errors, page.page_errors


def test_an_h264_session_plays_to_its_end(page, server):
    start(page, server, "webrtc", codec="H264", max_chunks=2)
    page.wait_for_function("window.lingbot.state.stats.closeCode !== null", timeout=60000)
    assert stat(page, "closeCode") == 1000 and "closed: data channel closed" in log_text(page)
    assert "H264 1500 kbps" in log_text(page) and stat(page, "chunks") == 2
    sent = page.evaluate("window.lingbot.state.rtcFramesBefore")
    assert sent == stat(page, "framesReceived") > 0
    # every frame reached the screen (the last one may still be on its way when the connection closes)
    assert sent - 1 <= frames_shown(page) <= sent
    assert not page.page_errors, page.page_errors


def test_a_refused_webrtc_offer_is_reported(page, server):
    start(page, server, "webrtc", **{"#size": "65x32"})
    page.wait_for_function("window.lingbot.state.stats.closeCode !== null", timeout=20000)
    assert stat(page, "closeCode") == 400
    assert "HTTP 400 invalid generate request (size=" in log_text(page)
    assert page.inner_text("#status") == "init rejected"
    assert not page.page_errors, page.page_errors


def test_glass_to_glass_latency_webrtc_vs_websocket_webp(browser, server):
    """No assertion on the figures: they are printed for the benchmark notes."""
    figures = {}
    for transport in ("webrtc", "webp"):
        context = browser.new_context(viewport={"width": 1400, "height": 960})
        page = context.new_page()
        start(page, server, transport)
        page.wait_for_function("window.lingbot.state.stats.chunks >= 2", timeout=60000)
        figures[transport] = hold_and_release(page, "jl", GLASS_DELAYS_MS)
        page.click("#stop")
        context.close()
    print("\nglass-to-glass, event sent -> first frame of its chunk on screen (ms), chromium on loopback, "
          f"160x96 at 16 fps, load average {os.getloadavg()[0]:.2f}:")
    for transport, samples in figures.items():
        label = "WebRTC VP8" if transport == "webrtc" else "WebSocket+WebP"
        print(f"  {label:<15} median {statistics.median(samples):6.0f}  samples {[round(s) for s in samples]}")
    assert all(len(samples) == len(GLASS_DELAYS_MS) for samples in figures.values())
