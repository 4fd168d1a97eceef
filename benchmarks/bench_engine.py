"""Per-chunk engine time split by stage (text, DiT, VAE), in-process, no Ray.

Default: builds the tiny random checkpoint in a temporary folder and runs one session at the size
embedded in its ``lingbot_ray.json``. Point ``--checkpoint`` at any checkpoint folder (real or tiny)
and ``--device cuda`` to measure a GPU. After ``--warmup`` chunks, ``--chunks`` chunks are timed
and the median and p90 of every stage are printed as a table.

The engine's memory plan is printed first, before anything is loaded; the text encoder goes where the
plan puts it (``--text-device`` overrides), and ``--memory-budget-gb`` caps what the engine may use.

    python benchmarks/bench_engine.py [--checkpoint PATH] [--device cpu] [--chunks 20] [--warmup 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lingbot_ray.control.conditions import ChunkConditions
from lingbot_ray.engine import RealtimeEngine, SessionSpec
from lingbot_ray.engine.memory import GB, plan_memory
from lingbot_ray.models.loading import default_dtype
from lingbot_ray.models.tiny import build_tiny_checkpoint

logger = logging.getLogger("bench_engine")

STAGES = ("text_encoder_ms", "dit_ms", "vae_ms", "total_ms")
# A camera pattern that keeps the trajectory (and so the camera path) busy.
MOVES = (("w",), ("w", "l"), ("d",), ("i",), ("s", "j"), ())


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run(args: argparse.Namespace, folder: Path) -> str:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * GB)
    # the engine makes the same plan again when it loads; this copy is shown before anything is allocated
    plan = plan_memory(
        folder,
        device=args.device,
        dit_dtype=dtype or default_dtype(args.device),
        text_dtype=default_dtype(args.device),
        text_device=args.text_device,
        budget=budget,
    )
    sys.stdout.write(f"{plan.table()}\n{plan.text_placement()}\n\n")
    sys.stdout.flush()
    t0 = time.perf_counter()
    engine = RealtimeEngine.from_pretrained(
        folder, device=args.device, dtype=dtype, text_device=args.text_device, memory_budget=budget
    )
    load_s = time.perf_counter() - t0
    width = args.width or engine.defaults.width
    height = args.height or engine.defaults.height
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    spec = SessionSpec(
        prompt="A quiet rainy London alley, stable camera motion.",
        image=image,
        width=width,
        height=height,
        num_frames=args.num_frames,
        seed=42,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        quality=args.quality,
    )
    t0 = time.perf_counter()
    state = engine.new_session(spec)
    session_s = time.perf_counter() - t0
    latent_frames = state.dit.resolved.latent_frames_per_chunk

    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    frames = 0
    for chunk in range(args.warmup + args.chunks):
        actions = tuple(MOVES[(chunk * latent_frames + i) % len(MOVES)] for i in range(latent_frames))
        out = engine.step(state, ChunkConditions(prompt=None, camera_actions=actions, event_id=None))
        if chunk >= args.warmup:
            frames += out.num_frames
            for stage in STAGES:
                timings[stage].append(out.timings_ms[stage])
    engine.close(state)

    rows = [
        f"checkpoint {folder}",
        f"device {args.device}, dit dtype {engine.dit.dtype}, text encoder on {engine.memory.text_device}, "
        f"torch threads {torch.get_num_threads()}",
        f"size {width}x{height}, {latent_frames} latent frames/chunk, {args.steps} steps, "
        f"guidance {args.guidance_scale}, quality {args.quality}",
        f"load {load_s * 1e3:.0f} ms, new session {session_s * 1e3:.0f} ms, "
        f"{args.chunks} chunks timed after {args.warmup} warm-up",
        "",
        f"{'stage':<16}{'median ms':>12}{'p90 ms':>10}{'min ms':>10}{'share':>8}",
    ]
    total_median = statistics.median(timings["total_ms"])
    for stage in STAGES:
        values = timings[stage]
        median = statistics.median(values)
        rows.append(
            f"{stage:<16}{median:>12.1f}{percentile(values, 90):>10.1f}{min(values):>10.1f}"
            f"{(median / total_median if total_median else 0.0):>8.0%}"
        )
    total_s = sum(timings["total_ms"]) / 1e3
    rows += ["", f"generated {frames} frames in {total_s:.2f} s of model time = {frames / total_s:.1f} fps"]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: build a tiny one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="DiT dtype (default by device)")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-frames", type=int, default=12)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--quality", choices=("lossless", "high"), default="lossless")
    parser.add_argument("--width", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--height", type=int, default=None, help="default: the checkpoint's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--text-device", default=None, help="text encoder device (default: the memory plan's choice)")
    parser.add_argument("--memory-budget-gb", type=float, default=None, help="GB (1e9 B) the engine may use")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint is not None:
        report = run(args, args.checkpoint)
    else:
        with tempfile.TemporaryDirectory(prefix="lingbot-tiny-") as tmp:
            report = run(args, build_tiny_checkpoint(Path(tmp) / "tiny"))
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
