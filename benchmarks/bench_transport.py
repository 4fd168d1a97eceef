"""Time the frame encoders on realistic chunks: median ms per chunk, payload bytes per chunk and per
second of video, per format, at one or more sizes.

    python -m benchmarks.bench_transport [--frames 12] [--size 160x96,832x480] [--reps 15] [--fps 16]
                                         [--webp-method 0] [--bitrate 1500000] [--recorded DIR]

Frames are a rendered scene (smooth colour fields plus a coarse texture and fine grain) that drifts a
few pixels per frame: neither constant nor noise, so compression ratios resemble decoded video. With
``--recorded DIR`` they are a session's frames instead, as ``lingbot-ray record DIR --format raw``
writes them (frame_00000.png, …), taken chunk after chunk.

Delta-gzip and the WebRTC video encoders are timed on continuation chunks (each coded against the
chunk before), their steady state; the video encoders are the server's own (lingbot_ray.serve.webrtc:
VP8 with libvpx, H.264 with libx264, realtime settings, at ``--bitrate`` and a keyframe every
``--keyframe-interval`` seconds), so their bytes per second follow the bitrate asked for while the
stills' follow the content.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import time

import numpy as np

from lingbot_ray.transport import make_encoder

FORMATS = (("raw", "raw", None), ("jpeg q95", "jpeg", 95), ("delta-gzip", None, None), ("webp q90", "webp", 90))
VIDEO = (("webrtc VP8", "VP8"), ("webrtc H264", "H264"))


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


def recorded_chunks(folder: pathlib.Path, num_frames: int) -> list[np.ndarray]:
    """A recording's frames in chunks of ``num_frames`` (a last, shorter chunk is dropped)."""
    from PIL import Image

    paths = sorted(folder.glob("frame_*.png"))
    frames = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    chunks = [frames[i : i + num_frames] for i in range(0, len(frames) - num_frames + 1, num_frames)]
    if len(chunks) < 2:
        raise SystemExit(f"{folder}: {len(frames)} frames, need at least {2 * num_frames} (two chunks)")
    return chunks


def time_encoder(encode, chunks: list[np.ndarray], reps: int) -> tuple[list[float], list[int], int]:
    """``encode(frames, index) -> (payload bytes, batches)`` over ``reps`` chunks after a warm-up one
    (which also gives delta-gzip and the video encoders their reference)."""
    encode(chunks[0], 0)
    times, sizes, batches = [], [], 0
    for rep in range(reps):
        frames = chunks[(rep + 1) % len(chunks)]
        start = time.perf_counter()
        size, batches = encode(frames, rep + 1)
        times.append((time.perf_counter() - start) * 1e3)
        sizes.append(size)
    return times, sizes, batches


def stills(fmt: str | None, quality: int | None, webp_method: int):
    encoder = make_encoder(fmt, quality=quality, webp_method=webp_method)

    def encode(frames: np.ndarray, index: int) -> tuple[int, int]:
        batches = encoder.encode_chunk(frames, request_id="bench", chunk_index=index)
        return sum(batch.total_size for batch in batches), len(batches)

    return encode


def video(codec: str, bitrate: int, keyframe_interval_s: float, fps: float):
    from lingbot_ray.serve.webrtc import Video, VideoEncoder

    encoder = VideoEncoder(Video(codec, bitrate, keyframe_interval_s), fps)

    def encode(frames: np.ndarray, index: int) -> tuple[int, int]:
        return sum(map(len, encoder.encode_chunk(frames))), 0

    return encode


def bench(chunks: list[np.ndarray], args) -> None:
    frames = chunks[0]
    count, height, width = frames.shape[:3]
    seconds_per_chunk = count / args.fps
    print(f"\n{count} frames {width}x{height} per chunk ({seconds_per_chunk:.2f} s at {args.fps:g} fps), "
          f"{frames.nbytes} raw bytes, {args.reps} reps, load average {os.getloadavg()[0]:.2f}")
    print(f"{'format':<18}{'median ms':>10}{'min ms':>9}{'bytes/chunk':>13}{'bytes/s':>12}{'batches':>9}")
    encoders = [(label, stills(fmt, quality, args.webp_method)) for label, fmt, quality in FORMATS]
    try:
        encoders += [(f"{label} {args.bitrate // 1000}k", video(codec, args.bitrate, args.keyframe_interval, args.fps)) for label, codec in VIDEO]
    except ImportError as exc:  # the WebRTC module needs aiortc
        print(f"(no WebRTC rows: {exc})")
    for label, encode in encoders:
        times, sizes, batches = time_encoder(encode, chunks, args.reps)
        size = statistics.mean(sizes)
        print(f"{label:<18}{statistics.median(times):>10.1f}{min(times):>9.1f}{size:>13.0f}"
              f"{size / seconds_per_chunk:>12.0f}{batches if batches else '-':>9}")


def main() -> None:
    from lingbot_ray.serve.config import IngressConfig

    defaults = IngressConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--size", default="160x96,832x480", help="one or more WxH, comma-separated")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--fps", type=float, default=16.0, help="playback rate: bytes per second and the video encoders' rate")
    parser.add_argument("--webp-method", type=int, default=0)
    parser.add_argument("--bitrate", type=int, default=defaults.webrtc_bitrate, help="WebRTC video bits/s (ingress.webrtc_bitrate)")
    parser.add_argument("--keyframe-interval", type=float, default=defaults.webrtc_keyframe_interval_s)
    parser.add_argument("--recorded", type=pathlib.Path, help="a folder of frame_*.png (lingbot-ray record DIR --format raw)")
    args = parser.parse_args()
    if args.recorded:
        bench(recorded_chunks(args.recorded, args.frames), args)
        return
    for size in args.size.split(","):
        width, height = map(int, size.lower().split("x"))
        bench([render_chunk(args.frames, width, height)], args)


if __name__ == "__main__":
    main()
