"""How long a given-up session opening delays the next session (in-process server, real WebSockets).

    python -m benchmarks.bench_given_up_opening [--slow-step-s 0.4] [--timeout-s 2]

A session at 320x192 whose first-frame encoding is slowed by ``--slow-step-s`` per encoder step (about
24 steps to the encoder's fixed point) is given up after ``ingress.stage_timeout_s``; a 160x96 session
then opens on the same (single) VAE replica. Prints the encoder steps the given-up session still ran
after its close and the next session's time to its first chunk, beside the median of three sessions
on an idle server. The slow-down is a sleep in the encoder step, so the figure does not depend on how
fast this machine encodes.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import statistics
import tempfile
import time

import websockets

from lingbot_ray.models import vae_streaming
from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.local import serve_locally
from tests.serve.test_e2e import collect, init_message


async def first_chunk_s(url: str, **fields) -> float:
    start = time.monotonic()
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(init_message(max_chunks=1, **fields))
        _, stats, errors, code, reason, _ = await collect(ws)
    if not stats:
        raise RuntimeError(f"no chunk: close {code} {reason} {errors}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow-step-s", type=float, default=0.4)
    parser.add_argument("--timeout-s", type=float, default=2.0)
    args = parser.parse_args()

    steps: list[float] = []
    original = vae_streaming._run_encoder_step

    def slow_step(vae, frames, feat_map):
        if frames.shape[-1] > 200:
            steps.append(time.monotonic())
            time.sleep(args.slow_step_s)
        return original(vae, frames, feat_map)

    vae_streaming._run_encoder_step = slow_step
    checkpoint = pathlib.Path(tempfile.mkdtemp()) / "tiny"
    build_tiny_checkpoint(checkpoint)
    config = {
        "model": {"path": str(checkpoint), "torch_threads": 1},
        "dit": {"sessions_per_group": 2},
        "ingress": {"stage_timeout_s": args.timeout_s},
    }
    with serve_locally(config) as server:
        url = server.url + "/v1/realtime_video/generate"
        idle = statistics.median(asyncio.run(first_chunk_s(url)) for _ in range(3))

        async def give_up_then_next() -> tuple[int, str, float, float]:
            async with websockets.connect(url, max_size=None) as ws:
                await ws.send(init_message(size="320x192", max_chunks=1))
                _, _, _, code, reason, _ = await collect(ws)
            given_up = time.monotonic()
            server.ingress.reconfigure({"ingress": {"stage_timeout_s": 120.0}})  # the next one may take its time
            return code, reason, given_up, await first_chunk_s(url)

        code, reason, given_up, after = asyncio.run(give_up_then_next())
        time.sleep(args.slow_step_s * 30)  # whatever still runs of the given-up encoding shows up now
    print(f"given-up session: close {code} ({reason})")
    print(f"encoder steps of the given-up session: {len(steps)} in all, {sum(t > given_up for t in steps)} after its close")
    print(f"next session's first chunk: {after:.2f} s (idle server: {idle:.2f} s)")


if __name__ == "__main__":
    main()
