"""A session whose opening the ingress gives up (stage timeout) stops holding the stages: its stage
calls are cancelled where they wait, and the first-frame encoding that already runs stops at its next
step, so the next session is not delayed behind it. In-process server, real WebSockets."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import websockets

from lingbot_ray.models import vae_streaming
from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.local import serve_locally
from tests.serve.test_e2e import collect, init_message

STAGE_TIMEOUT_S = 2.0
SLOW_STEP_S = 0.4  # added to every encoder step of the slow session's first frame


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("ckpt") / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = {
        "model": {"path": str(checkpoint), "torch_threads": 1},
        "dit": {"sessions_per_group": 2},
    }
    with serve_locally(config) as srv:
        yield srv


@pytest.fixture
def slow_wide_frames(monkeypatch):
    """Encoder steps of frames wider than 200 px take SLOW_STEP_S longer; their start times are kept."""
    original = vae_streaming._run_encoder_step
    steps: list[float] = []
    lock = threading.Lock()

    def step(vae, frames, feat_map):
        if frames.shape[-1] > 200:
            with lock:
                steps.append(time.monotonic())
            time.sleep(SLOW_STEP_S)
        return original(vae, frames, feat_map)

    monkeypatch.setattr(vae_streaming, "_run_encoder_step", step)
    return steps


async def _first_chunk_s(url: str, **fields) -> float:
    start = time.monotonic()
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(init_message(max_chunks=1, **fields))
        _, stats, errors, code, _, _ = await collect(ws)
    assert code == 1000 and stats and not errors, (code, errors)
    return time.monotonic() - start


def test_a_timed_out_opening_stops_and_does_not_delay_the_next_session(server, slow_wide_frames):
    url = server.url + "/v1/realtime_video/generate"
    # the baseline (the server's first session) runs under the default timeout: a cold opening on a
    # loaded machine may take longer than the short one the slow session is given
    baseline = asyncio.run(_first_chunk_s(url))

    async def give_up_then_next() -> tuple[float, list, float]:
        server.ingress.reconfigure({"ingress": {"stage_timeout_s": STAGE_TIMEOUT_S}})
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(init_message(size="320x192", max_chunks=1))
            _, stats, errors, code, reason, _ = await collect(ws)
        given_up = time.monotonic()
        assert code == 1011 and not stats and "stage_timeout_s" in reason, (code, reason)
        # the next session may take its time again (live knob: sessions already open keep theirs)
        server.ingress.reconfigure(None)
        return given_up, errors, await _first_chunk_s(url)

    try:
        given_up, _, next_session = asyncio.run(give_up_then_next())
    finally:
        server.ingress.reconfigure(None)
    # the slow encoding would go on for ~24 steps; it stopped at the first step after the close
    after_close = [t for t in slow_wide_frames if t > given_up]
    assert len(after_close) <= 1, (len(slow_wide_frames), len(after_close))
    # the next session waited at most for that one step, not for the whole encoding
    assert next_session < baseline + 2 * SLOW_STEP_S + 5.0, (baseline, next_session)
    chain = server.ingress.backend.chain
    deadline = time.monotonic() + 30
    while chain.vae.held or chain.vae.host.sessions or chain.dit.held or chain.dit.host.sessions:
        assert time.monotonic() < deadline, "a given-up session still holds a stage"
        time.sleep(0.05)
