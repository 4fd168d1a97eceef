"""Time the frame encoders on a realistic chunk: median ms per chunk and payload bytes per format.

    python -m benchmarks.bench_transport [--frames 12] [--size 832x480] [--reps 15] [--webp-method 0]

Frames are a rendered scene (smooth colour fields plus a coarse texture and fine grain) that drifts a
few pixels per frame: neither constant nor noise, so compression ratios resemble decoded video.
Delta-gzip is timed on continuation chunks (each a delta against the chunk before), its steady state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from lingbot_ray.transport import make_encoder

FORMATS = (("raw", "raw", None), ("jpeg q95", "jpeg", 95), ("delta-gzip", None, None), ("webp q90", "webp", 90))


def render_chunk(num_frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = np.kron(rng.normal(0, 1, (height // 4 + 4, width // 4 + 4)), np.ones((4, 4))).astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        shift = 2.0 * i
        scene = np.stack(
            [
                128 + 100 * np.sin((x + shift) / 90) * np.cos(y / 70),
                128 + 90 * np.cos((x + shift) / 130 + y / 110),
                255 * (x + y + 3 * shift) / (width + height),
            ],
            axis=-1,
        )
        offset = i // 2 % 8
        scene += 12 * texture[:height, offset : offset + width, None]
        scene += rng.normal(0, 2, (height, width, 1))
        frames[i] = np.clip(scene, 0, 255).astype(np.uint8)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", default="832x480")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--webp-method", type=int, default=0)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    frames = render_chunk(args.frames, width, height)
    print(f"{args.frames} frames {width}x{height}, {frames.nbytes} raw bytes, {args.reps} reps, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'format':<12}{'median ms':>10}{'min ms':>9}{'payload bytes':>15}{'batches':>9}")
    for label, fmt, quality in FORMATS:
        encoder = make_encoder(fmt, quality=quality, webp_method=args.webp_method)
        encoder.encode_chunk(frames, request_id="bench", chunk_index=0)  # warm-up; delta reference
        times = []
        for rep in range(args.reps):
            start = time.perf_counter()
            batches = encoder.encode_chunk(frames, request_id="bench", chunk_index=rep + 1)
            times.append((time.perf_counter() - start) * 1e3)
        payload = sum(batch.total_size for batch in batches)
        print(f"{label:<12}{statistics.median(times):>10.1f}{min(times):>9.1f}{payload:>15}{len(batches):>9}")


if __name__ == "__main__":
    main()
