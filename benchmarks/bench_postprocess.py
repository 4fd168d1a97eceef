"""Time the post-processing models: ms per output frame and multiply-adds per frame.

    python -m benchmarks.bench_postprocess [--size 160x96] [--batch 4] [--reps 3] [--device cpu]
        [--models rife-4.22.lite,rife-4.25,srvgg-animevideov3,srvgg-general-x4v3,rrdb-x2plus,rrdb-x4plus]

Weights are random (published shapes): speed does not depend on their values. RIFE is timed on a
batch of frame pairs at t = 0.5 (one new frame each); Real-ESRGAN on a batch of frames at its native
scale. Multiply-adds come from torch's FLOP counter (convolutions and matmuls; the bilinear resampling
and grid_sample of RIFE are not counted) and are per frame at the benchmark size, then scaled linearly
to 832×480 for comparison with docs/MODEL.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from lingbot_ray.models.realesrgan import RRDBNet, SRVGGNetCompact
from lingbot_ray.models.rife import IFNet

MODELS = {
    "rife-4.22.lite": lambda: IFNet("4.22.lite"),
    "rife-4.25": lambda: IFNet("4.25"),
    "srvgg-animevideov3": lambda: SRVGGNetCompact(upscale=4, num_feat=64, num_conv=16),
    "srvgg-general-x4v3": lambda: SRVGGNetCompact(upscale=4, num_feat=64, num_conv=32),
    "rrdb-x2plus": lambda: RRDBNet(scale=2),
    "rrdb-x4plus": lambda: RRDBNet(scale=4),
}


def _call(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, IFNet):
        return model.interpolate(x, x.flip(-1), 0.5, 1.0)
    return model.upscale(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="160x96", help="WxH of the input frames")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"size {width}x{height}, batch {args.batch}, device {device}, threads {torch.get_num_threads()}")
    print(f"{'model':<22}{'params M':>10}{'ms/frame':>12}{'GMAC/frame':>12}{'TMAC@832x480':>14}")
    for name in args.models.split(","):
        model = MODELS[name]().to(device).eval()
        x = torch.rand(args.batch, 3, height, width, device=device)
        with FlopCounterMode(display=False) as counter:
            _call(model, x[:1])
        macs = counter.get_total_flops() / 2
        _call(model, x)  # warm-up: allocator, kernels, lazy init
        times = []
        for _ in range(args.reps):
            _sync(device)
            start = time.perf_counter()
            _call(model, x)
            _sync(device)
            times.append((time.perf_counter() - start) / args.batch * 1e3)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        full = macs * (832 * 480) / (width * height) / 1e12
        print(f"{name:<22}{params:>10.2f}{statistics.median(times):>12.1f}{macs / 1e9:>12.2f}{full:>14.3f}")


if __name__ == "__main__":
    main()
