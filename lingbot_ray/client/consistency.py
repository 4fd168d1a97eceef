"""Raw-frame consistency and latency guards: is this deployment right, and is it still fast?

The check replays one scripted session and compares it with stored ground truth, as the reference
system checks its own (docs/PROTOCOL.md, last section):

* the session: the embedded default over the WebSocket, raw transport, seed 42, 4 chunks, init
  script 6 × ``["w"]`` then 6 × ``[]`` (12 latent frames = 4 chunks of 3), first frame and prompt
  stored with the ground truth so the folder is self-contained;
* frames 0, middle and last against the stored PNGs: SSIM ≥ 0.92, PSNR ≥ 24 dB, mean absolute
  difference ≤ 10; the sha256 of *every* frame is stored too, so the report says whether the output
  is bit-exact (it is on the machine that wrote the ground truth, same torch, same thread count);
* latency guards from ``chunk_stats``: ignoring 2 warm-up chunks, p95 ``chunk_total_ms`` and p95
  ``scheduler_forward_ms`` under the limits for this machine class (``tests/consistency/latency_guards.yaml``);
* machines of one class differ about 2x in speed, and a shared one can be busy: when the server runs
  on this machine, a speed probe (a fixed workload shaped like a slice of a chunk, timed before and
  after the session) scales those limits in proportion to the machine's speed now, so that a slower
  or busy host is not read as a regression of the code, nor a faster one allowed one.

Command line (against a running server, e.g. ``serve run serve_config.yaml``)::

    lingbot-ray check                      # compare with tests/consistency/ground_truth, exit 1 on failure
    lingbot-ray check --write              # regenerate the ground truth from this server
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import yaml
from PIL import Image

from .compare import mean_abs_diff, psnr, ssim
from .session import SessionResult, make_init, parse_actions, run_session, ws_url

DEFAULT_GROUND_TRUTH = Path("tests/consistency/ground_truth")
DEFAULT_GUARDS = Path("tests/consistency/latency_guards.yaml")
SAMPLE_FIRST_FRAME = Path(__file__).resolve().parents[1] / "webui" / "samples" / "world-plaza.png"

SCRIPT = "w*6,_*6"
SEED = 42
CHUNKS = 4
PROMPT = "a procedural world, walking forward then standing still"
WARMUP_CHUNKS = 2

MIN_SSIM, MIN_PSNR_DB, MAX_MEAN_ABS_DIFF = 0.92, 24.0, 10.0
GUARDED_FIELDS = ("chunk_total_ms", "scheduler_forward_ms")


@dataclass
class FrameCheck:
    index: int
    ssim: float
    psnr_db: float
    mean_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.ssim >= MIN_SSIM and self.psnr_db >= MIN_PSNR_DB and self.mean_abs_diff <= MAX_MEAN_ABS_DIFF


@dataclass
class LatencyCheck:
    field: str
    p95_ms: float
    limit_ms: float  # the class's limit times ``scale``
    scale: float = 1.0  # the speed probe's time on this machine ÷ on the machine the limits describe

    @property
    def passed(self) -> bool:
        return self.p95_ms <= self.limit_ms


@dataclass(frozen=True)
class Guards:
    """One machine class's p95 limits (ms per guarded field), and what the speed probe takes on the quiet
    machine they were set on, its server running and idle (``None``: the limits are used as they are)."""

    limits: dict[str, float]
    speed_probe_ms: float | None = None

    def scale(self, probe_ms: float | None) -> float:
        """How much slower this machine is now than the one the limits were set on (< 1: faster)."""
        if probe_ms is None or self.speed_probe_ms is None:
            return 1.0
        return probe_ms / self.speed_probe_ms


@dataclass
class CheckReport:
    frames: list[FrameCheck] = field(default_factory=list)
    exact_frames: int = 0
    total_frames: int = 0
    latency: list[LatencyCheck] = field(default_factory=list)
    machine_class: str | None = None
    speed_probe_ms: float | None = None  # the probe's time on this machine around the session (None: not probed)
    problems: list[str] = field(default_factory=list)  # session errors, missing guards, count mismatches

    @property
    def bit_exact(self) -> bool:
        return self.total_frames > 0 and self.exact_frames == self.total_frames

    @property
    def frames_passed(self) -> bool:
        return bool(self.frames) and all(f.passed for f in self.frames) and not self.problems

    @property
    def latency_passed(self) -> bool:
        return all(c.passed for c in self.latency)

    @property
    def passed(self) -> bool:
        return self.frames_passed and self.latency_passed

    def lines(self) -> list[str]:
        out = [
            f"frame {f.index:3d}: SSIM {f.ssim:.4f} (≥ {MIN_SSIM}), PSNR {f.psnr_db:.2f} dB (≥ {MIN_PSNR_DB}), "
            f"mean abs diff {f.mean_abs_diff:.2f} (≤ {MAX_MEAN_ABS_DIFF})  {'ok' if f.passed else 'FAIL'}"
            for f in self.frames
        ]
        out.append(f"bit-exact: {'yes' if self.bit_exact else 'no'} ({self.exact_frames}/{self.total_frames} frames match their sha256)")
        for c in self.latency:
            scaled = f" = {c.limit_ms / c.scale:.0f} × {c.scale:.2f} for this machine's speed" if c.scale != 1.0 else ""
            out.append(f"p95 {c.field} {c.p95_ms:.0f} ms (≤ {c.limit_ms:.0f}{scaled} for {self.machine_class})  {'ok' if c.passed else 'FAIL'}")
        if self.speed_probe_ms is not None:
            out.append(f"speed probe: {self.speed_probe_ms:.1f} ms on this machine")
        out.extend(f"problem: {p}" for p in self.problems)
        out.append("PASSED" if self.passed else "FAILED")
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(bit_exact=self.bit_exact, passed=self.passed)
        for item, check in zip(data["frames"], self.frames):
            item["passed"] = check.passed
        for item, check in zip(data["latency"], self.latency):
            item["passed"] = check.passed
        return data


# ------------------------------------------------------------------------------ session and truth


def key_frame_indices(num_frames: int) -> list[int]:
    return sorted({0, num_frames // 2, num_frames - 1})


def sha256(frame: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frame).tobytes()).hexdigest()


def check_init(first_frame: bytes, *, seed: int = SEED, prompt: str = PROMPT) -> dict[str, Any]:
    return make_init(prompt, first_frame, seed=seed, max_chunks=CHUNKS, output_format="raw", actions=parse_actions(SCRIPT))


async def _session(url: str, init: dict, api_key: str | None, timeout_s: float) -> tuple[np.ndarray, SessionResult]:
    chunks: list[np.ndarray] = []
    result = await run_session(url, init, on_frames=lambda _, frames: chunks.append(frames), api_key=api_key, timeout_s=timeout_s)
    frames = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
    return frames, result


def run_check_session(url: str, init: dict, *, api_key: str | None = None, timeout_s: float = 300.0) -> tuple[np.ndarray, SessionResult]:
    """The scripted session's raw frames ``[N, H, W, 3]`` and its :class:`SessionResult`."""
    return asyncio.run(_session(ws_url(url), init, api_key, timeout_s))


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def write_ground_truth(url: str, out_dir: Path, *, first_frame: Path = SAMPLE_FIRST_FRAME, api_key: str | None = None) -> dict:
    """Run the scripted session against ``url`` and store its key frames, hashes and init in ``out_dir``."""
    image = first_frame.read_bytes()
    init = check_init(image)
    frames, result = run_check_session(url, init, api_key=api_key)
    if not result.completed or len(result.stats) != CHUNKS:
        raise RuntimeError(f"the scripted session did not complete: close {result.close_code} {result.close_reason!r}, errors {result.errors}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("frame_*.png"):
        stale.unlink()
    (out_dir / "first_frame.png").write_bytes(image)
    key_frames = {}
    for index in key_frame_indices(len(frames)):
        name = f"frame_{index:03d}.png"
        (out_dir / name).write_bytes(_png(frames[index]))
        key_frames[str(index)] = name
    manifest = {
        "init": {k: v for k, v in init.items() if k != "first_frame"},
        "first_frame": "first_frame.png",
        "num_frames": len(frames),
        "width": int(frames.shape[2]),
        "height": int(frames.shape[1]),
        "key_frames": key_frames,
        "sha256": [sha256(f) for f in frames],
        "chunk_frames": [s["num_frames"] for s in result.stats],
        "written_with": {
            "lingbot_ray": _version("lingbot_ray"),
            "torch": _version("torch"),
            "machine": f"{platform.machine()} {platform.system()}, {_cpu_count()} cores",
            "server": url,
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def compare_frames(frames: np.ndarray, ground_truth: Path, report: CheckReport) -> None:
    manifest = json.loads((ground_truth / "manifest.json").read_text())
    if len(frames) != manifest["num_frames"]:
        report.problems.append(f"the session gave {len(frames)} frames, the ground truth has {manifest['num_frames']}")
    report.total_frames = manifest["num_frames"]
    report.exact_frames = sum(sha256(f) == h for f, h in zip(frames, manifest["sha256"]))
    for index, name in sorted(manifest["key_frames"].items(), key=lambda item: int(item[0])):
        index = int(index)
        truth = np.asarray(Image.open(ground_truth / name).convert("RGB"))
        if index >= len(frames) or frames[index].shape != truth.shape:
            got = frames[index].shape if index < len(frames) else "no frame"
            report.problems.append(f"frame {index}: got {got}, the ground truth is {truth.shape}")
            continue
        frame = frames[index]
        report.frames.append(FrameCheck(index, ssim(frame, truth), psnr(frame, truth), mean_abs_diff(frame, truth)))


# ------------------------------------------------------------------------------------ latency


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else math.nan


def machine_class() -> str:
    """``LINGBOT_MACHINE_CLASS`` if set, else ``cpu-<N>core`` from the CPUs this process may use."""
    return os.environ.get("LINGBOT_MACHINE_CLASS") or f"cpu-{_cpu_count()}core"


def load_guards(path: Path, name: str) -> Guards | None:
    classes = yaml.safe_load(path.read_text()) or {}
    entry = classes.get(name)
    if entry is None:
        return None
    limits = {f"{f}_p95" for f in GUARDED_FIELDS}
    unknown = set(entry) - limits - {"speed_probe_ms"}
    if unknown:
        raise ValueError(f"{path}: machine class {name!r} has unknown guard keys {sorted(unknown)}")
    probe = entry.get("speed_probe_ms")
    return Guards(
        {key.removesuffix("_p95"): float(value) for key, value in entry.items() if key in limits},
        None if probe is None else float(probe),
    )


def latency_checks(
    stats: list[dict], guards: Guards, probe_ms: float | None = None, warmup: int = WARMUP_CHUNKS
) -> list[LatencyCheck]:
    """p95 of each guarded field over the chunks after ``warmup``, against its limit scaled to the
    machine's speed (``probe_ms``: :func:`speed_probe_ms` measured around the session)."""
    steady = stats[warmup:]
    scale = guards.scale(probe_ms)
    return [LatencyCheck(name, p95([s[name] for s in steady]), limit * scale, scale) for name, limit in guards.limits.items()]


def speed_probe_ms(repeats: int = 15) -> float:
    """Median wall time (ms) of a fixed workload shaped like a slice of one chunk of the embedded
    default: 4 transformer blocks (width 128, 4 heads, FFN 512) over 384 new tokens attending to
    1,152 cached ones, then two 3×3 convolutions at a decoder width. It runs on as many threads as
    this process may use cores, so it sees what the server's stages see when they share the machine."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    width, heads, new, cached = 128, 4, 384, 1152
    x = torch.randn(1, new, width, generator=generator)
    keys = torch.randn(1, heads, cached + new, width // heads, generator=generator)
    w_qkv = torch.randn(width, 3 * width, generator=generator) / width**0.5
    w_up = torch.randn(width, 4 * width, generator=generator) / width**0.5
    w_down = torch.randn(4 * width, width, generator=generator) / (4 * width) ** 0.5
    image = torch.randn(1, 32, 60, 80, generator=generator)
    conv = torch.randn(32, 32, 3, 3, generator=generator) / 96

    def once() -> None:
        h = x
        for _ in range(4):
            q = (h @ w_qkv)[..., :width].reshape(1, new, heads, -1).transpose(1, 2)  # keys and values: the cache
            attended = F.scaled_dot_product_attention(q, keys, keys).transpose(1, 2).reshape(1, new, width)
            h = h + attended
            h = h + F.gelu(h @ w_up) @ w_down
        y = image
        for _ in range(2):
            y = F.relu(F.conv2d(y, conv, padding=1))

    times, threads = [], torch.get_num_threads()
    torch.set_num_threads(_cpu_count())  # the same on every run, whatever this process set before
    try:
        with torch.inference_mode():
            once()  # warm-up: allocations, kernels
            for _ in range(repeats):
                start = time.perf_counter()
                once()
                times.append(1000 * (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times))


def check(
    url: str,
    ground_truth: Path = DEFAULT_GROUND_TRUTH,
    *,
    guards_path: Path | None = DEFAULT_GUARDS,
    machine: str | None = None,
    seed: int | None = None,
    script: str | None = None,
    api_key: str | None = None,
    speed_probe: bool = False,
) -> tuple[CheckReport, SessionResult]:
    """The whole check; ``seed`` and ``script`` (``parse_actions`` syntax) override the stored ones
    (another camera script must fail it). ``speed_probe``: time :func:`speed_probe_ms` before and
    after the session and scale the latency limits with it (only meaningful when the server runs here)."""
    manifest = json.loads((ground_truth / "manifest.json").read_text())
    init = dict(manifest["init"], first_frame=(ground_truth / manifest["first_frame"]).read_bytes())
    if seed is not None:
        init["seed"] = seed
    if script is not None:
        init["condition_inputs"] = {"camera_actions": [list(a) for a in parse_actions(script)]}
    before = speed_probe_ms() if speed_probe else None
    frames, result = run_check_session(url, init, api_key=api_key)
    report = CheckReport(machine_class=machine or machine_class())
    if before is not None:
        report.speed_probe_ms = (before + speed_probe_ms()) / 2
    if not result.completed:
        report.problems.append(f"session ended with close {result.close_code} {result.close_reason!r}, errors {result.errors}")
    compare_frames(frames, ground_truth, report)
    if guards_path is not None:
        guards = load_guards(guards_path, report.machine_class)
        if guards is None:
            report.problems.append(f"no latency guards for machine class {report.machine_class!r} in {guards_path}")
        else:
            report.latency = latency_checks(result.stats, guards, report.speed_probe_ms)
    return report, result


# ------------------------------------------------------------------------------------ helpers


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_local(url: str) -> bool:
    """Whether ``url`` names this machine (a loopback host), so a speed probe here describes the server."""
    host = urlsplit(url if "://" in url else f"ws://{url}").hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def check_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lingbot-ray check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="ws://127.0.0.1:8000", help="server (ws/http base or the full realtime URL)")
    parser.add_argument("--ground-truth", type=Path, default=DEFAULT_GROUND_TRUTH)
    parser.add_argument("--write", action="store_true", help="regenerate the ground truth from this server instead of checking")
    parser.add_argument("--first-frame", type=Path, default=SAMPLE_FIRST_FRAME, help="with --write: the session's first frame")
    parser.add_argument("--guards", type=Path, default=DEFAULT_GUARDS, help="latency guards per machine class (YAML)")
    parser.add_argument("--machine-class", default=None, help="guard entry to use (default: $LINGBOT_MACHINE_CLASS or cpu-<N>core)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency guards")
    parser.add_argument(
        "--speed-probe", action=argparse.BooleanOptionalAction, default=None,
        help="scale the latency limits to this machine's speed, timed around the session (default: on when the server is on this machine)",
    )
    parser.add_argument("--seed", type=int, default=None, help="override the stored seed (to see the check fail)")
    parser.add_argument("--api-key", default=os.environ.get("LINGBOT_API_KEY"))
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.write:
        manifest = write_ground_truth(args.url, args.ground_truth, first_frame=args.first_frame, api_key=args.api_key)
        print(f"wrote {args.ground_truth}: {manifest['num_frames']} frames {manifest['width']}x{manifest['height']}, "
              f"key frames {sorted(map(int, manifest['key_frames']))}")
        return 0
    report, _ = check(
        args.url,
        args.ground_truth,
        guards_path=None if args.no_latency else args.guards,
        machine=args.machine_class,
        seed=args.seed,
        api_key=args.api_key,
        speed_probe=is_local(args.url) if args.speed_probe is None else args.speed_probe,
    )
    print("\n".join(report.lines()))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(check_main(sys.argv[1:]))
