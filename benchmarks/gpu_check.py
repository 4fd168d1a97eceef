"""The prepared GPU check of the fast path: the full-size LingBot World fast architecture with random
bf16 weights (nothing downloaded) at 832x480, one session per setting, every chunk decoded by both
decoders.

Settings: ``eager``, ``compiled`` (``dit.compile``, warmed up first) and ``compiled+fp8``
(``dit.fp8``, skipped with its reason where the GPU has no FP8 matmuls), each × the ``wan`` and the
``tiny`` decoder. Per setting and decoder: DiT, VAE and first-frame encode ms, p50/p95 of the
chunk's total (DiT + decode), generated fps, peak GPU memory, graphs compiled during the timed
chunks (0 when the compiled DiT reuses its graph), and the ratios to eager with the same decoder.

The text encoder stays off the GPU, as the memory plan puts it on an 80 GB card: the prompt
embedding is a random tensor of UMT5-XXL's shape, and its cost is not part of a chunk.

    python benchmarks/gpu_check.py --json gpu_check.json    # one H100: under 8 minutes
    python benchmarks/gpu_check.py --tiny                   # the same steps on CPU at a tiny size (CI)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from lingbot_ray.checkpoint import geometry_from_configs
from lingbot_ray.control.conditions import ChunkConditions
from lingbot_ray.engine import SessionSpec
from lingbot_ray.engine.fastpath import DECODERS, compile_dit, use_fp8, warm_up
from lingbot_ray.engine.sampler import DMDSampler
from lingbot_ray.engine.stages import DiTStage, VAEStage
from lingbot_ray.models.architectures import LINGBOT_WORLD_FAST_TRANSFORMER, WAN21_VAE
from lingbot_ray.models.loading import random_dit
from lingbot_ray.models.tiny_components import TINY_TRANSFORMER_CONFIG
from lingbot_ray.models.tiny_decoder import StreamingTinyDecoder, TinyAutoencoder, TinyDecoderConfig
from lingbot_ray.models.vae_streaming import StreamingWanVAE

logger = logging.getLogger("gpu_check")

SETTINGS = ("eager", "compiled", "compiled+fp8")
TEXT_TOKENS = 512  # UMT5's max_length: the prompt embedding's length
# --tiny: the test checkpoint's shapes (lingbot_ray/models/tiny_components.py) and narrow decoders
TINY_VAE = {**WAN21_VAE, "base_dim": 8, "num_res_blocks": 1}
TINY_DECODER = TinyDecoderConfig(decoder_widths=(32, 16, 8, 8), encoder_width=8)
# A camera pattern that keeps the camera path busy.
MOVES = (("w",), ("w", "l"), ("d",), ("i",), ("s", "j"), ())


@dataclass
class Result:
    setting: str
    decoder: str
    dit_ms: float = math.nan
    vae_ms: float = math.nan
    encode_ms: float = math.nan
    chunk_total_ms_p50: float = math.nan
    chunk_total_ms_p95: float = math.nan
    fps: float = math.nan
    peak_gpu_gb: float | None = None
    recompiles: int = 0
    skipped: str | None = None
    ratios_to_eager: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The DiT stage and one VAE stage per decoder, all with random weights, on ``device``."""
    transformer = TINY_TRANSFORMER_CONFIG if args.tiny else LINGBOT_WORLD_FAST_TRANSFORMER
    vae_config = TINY_VAE if args.tiny else WAN21_VAE
    geometry = geometry_from_configs(transformer, vae_config)
    t0 = time.perf_counter()
    model = random_dit(transformer, device=device, dtype=dtype, seed=args.seed)
    dit = DiTStage(model, geometry, DMDSampler(), device=device, dtype=dtype)
    torch.manual_seed(args.seed)
    with torch.device(device):  # the VAE's own random init, made where it runs
        wan = StreamingWanVAE(AutoencoderKLWan(**vae_config).eval())
        tiny = StreamingTinyDecoder(TinyAutoencoder(TINY_DECODER if args.tiny else TinyDecoderConfig()).eval())
    stages = {"wan": VAEStage(wan, geometry, device=device), "tiny": VAEStage(wan, geometry, device=device, decoder=tiny)}
    params = sum(p.numel() for p in model.parameters())
    logger.info("built the DiT (%.2fB parameters, %s) and the decoders in %.1f s", params / 1e9, dtype, time.perf_counter() - t0)
    return dit, stages


def run_setting(args, setting: str, dit: DiTStage, vaes: dict[str, VAEStage], device: torch.device) -> list[Result]:
    """One session of ``--warmup`` + ``--chunks`` chunks; each chunk's latents decoded by every decoder."""
    rng = np.random.default_rng(args.seed)
    image = rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8)
    spec = SessionSpec(prompt="gpu check", image=image, width=args.width, height=args.height, seed=args.seed, quality=args.quality)
    resolved = spec.resolve(dit.geometry)
    prompt = torch.randn(1, TEXT_TOKENS, dit.model.config.text_dim, generator=torch.Generator().manual_seed(args.seed))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # both decoders' stages share the Wan encoder: the first frame is encoded once
    _sync(device)
    t0 = time.perf_counter()
    condition = next(iter(vaes.values())).encode_condition(image)
    _sync(device)
    encode_ms = (time.perf_counter() - t0) * 1e3
    states = {name: stage.new_session(resolved) for name, stage in vaes.items()}
    dit_state = dit.new_session(resolved, condition, prompt)
    per_chunk = resolved.latent_frames_per_chunk
    times: dict[str, list[float]] = {"dit": [], **{name: [] for name in vaes}}
    frames = {name: 0 for name in vaes}
    graphs = None
    try:
        for index in range(args.warmup + args.chunks):
            if index == args.warmup:
                graphs = _graphs()
            actions = (MOVES[index % len(MOVES)],) * per_chunk
            _sync(device)
            t0 = time.perf_counter()
            latents = dit.step(dit_state, ChunkConditions(prompt=None, camera_actions=actions, event_id=None))
            _sync(device)
            dit_ms = (time.perf_counter() - t0) * 1e3
            decoded = {}
            for name, stage in vaes.items():
                t0 = time.perf_counter()
                decoded[name] = stage.decode(states[name], latents)
                _sync(device)
                decoded[name + "_ms"] = (time.perf_counter() - t0) * 1e3
            if index >= args.warmup:
                times["dit"].append(dit_ms)
                for name in vaes:
                    times[name].append(decoded[name + "_ms"])
                    frames[name] += len(decoded[name])
            logger.info(
                "%s chunk %d: DiT %.0f ms, %s", setting, index, dit_ms,
                ", ".join(f"{n} {decoded[n + '_ms']:.0f} ms" for n in vaes),
            )  # fmt: skip
    finally:
        dit_state.release()
        for state in states.values():
            state.release()
    recompiles = _graphs() - graphs
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    results = []
    for name in vaes:
        totals = [d + v for d, v in zip(times["dit"], times[name])]
        p50 = statistics.median(totals)
        results.append(Result(
            setting, name,
            dit_ms=statistics.median(times["dit"]), vae_ms=statistics.median(times[name]), encode_ms=encode_ms,
            chunk_total_ms_p50=p50, chunk_total_ms_p95=float(np.percentile(totals, 95)),
            fps=frames[name] / args.chunks / (p50 / 1e3), peak_gpu_gb=peak, recompiles=recompiles,
        ))  # fmt: skip
    return results


def apply_setting(args, setting: str, dit: DiTStage) -> str | None:
    """Make ``dit`` run as ``setting`` and warm it up (settings go eager → compiled → compiled+fp8
    on one model); returns why the setting cannot run here, or None."""
    if setting == "eager":
        return None
    if setting == "compiled+fp8":
        try:
            use_fp8(dit, args.fp8)
        except ValueError as exc:
            return str(exc)
    compile_dit(dit, args.compile_mode)  # again after FP8: the blocks' modules changed
    t0 = time.perf_counter()
    chunks = warm_up(dit, args.width, args.height, text_tokens=TEXT_TOKENS)
    logger.info("%s: warmed up (compiled) with %d chunks in %.1f s", setting, chunks, time.perf_counter() - t0)
    return None


def add_ratios(results: list[Result]) -> None:
    eager = {r.decoder: r for r in results if r.setting == "eager" and r.skipped is None}
    for r in results:
        base = eager.get(r.decoder)
        if base is None or r.skipped is not None:
            continue
        r.ratios_to_eager = {
            "dit_speedup": base.dit_ms / r.dit_ms,
            "chunk_total_speedup": base.chunk_total_ms_p50 / r.chunk_total_ms_p50,
            "fps": r.fps / base.fps,
            **({"peak_gpu_memory": r.peak_gpu_gb / base.peak_gpu_gb} if r.peak_gpu_gb and base.peak_gpu_gb else {}),
        }


def table(results: list[Result]) -> str:
    header = "setting       decoder  DiT ms   VAE ms  encode ms  total p50  total p95    fps  peak GB  graphs  DiT x  total x"
    rows = [header]
    for r in results:
        if r.skipped is not None:
            rows.append(f"{r.setting:<13} {r.decoder:<7}  skipped: {r.skipped}")
            continue
        ratio = r.ratios_to_eager
        peak = f"{r.peak_gpu_gb:7.1f}" if r.peak_gpu_gb is not None else "      -"
        rows.append(
            f"{r.setting:<13} {r.decoder:<7} {r.dit_ms:7.1f} {r.vae_ms:8.1f} {r.encode_ms:10.1f} {r.chunk_total_ms_p50:10.1f} "
            f"{r.chunk_total_ms_p95:10.1f} {r.fps:6.1f} {peak} {r.recompiles:7d} {ratio.get('dit_speedup', 1.0):6.2f} "
            f"{ratio.get('chunk_total_speedup', 1.0):8.2f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny test shapes on CPU at 64x48 (what CI runs)")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--width", type=int, default=None, help="default 832 (64 with --tiny)")
    parser.add_argument("--height", type=int, default=None, help="default 480 (48 with --tiny)")
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks per setting (>= 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed chunks before them")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {SETTINGS}")
    parser.add_argument("--compile-mode", default="default", help="dit.compile of the compiled settings")
    parser.add_argument("--fp8", default="rowwise", choices=("rowwise", "tensorwise"), help="dit.fp8 of compiled+fp8")
    parser.add_argument("--quality", default="high", choices=("high", "lossless"), help="decode in bf16 (high) or fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        parser.error(f"--settings={args.settings!r}: each must be one of {SETTINGS}")
    if args.chunks < 1 or args.warmup < 0:
        parser.error(f"--chunks={args.chunks}, --warmup={args.warmup}: need >= 1 and >= 0")
    args.width = args.width or (64 if args.tiny else 832)
    args.height = args.height or (48 if args.tiny else 480)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run with --tiny on CPU, or on a GPU machine")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    logger.info("device %s (%s), %dx%d, %d timed chunks per setting", device, card, args.width, args.height, args.chunks)

    dit, vaes = build(args, device, dtype)
    results: list[Result] = []
    with torch.inference_mode():
        for setting in SETTINGS:  # in this order: FP8 converts the model the earlier settings ran
            if setting not in settings:
                continue
            skipped = apply_setting(args, setting, dit)
            if skipped is not None:
                results += [Result(setting, name, skipped=skipped) for name in DECODERS]
                continue
            try:
                results += run_setting(args, setting, dit, vaes, device)
            except torch.OutOfMemoryError as exc:
                results += [Result(setting, name, skipped=f"out of memory: {str(exc).splitlines()[0]}") for name in DECODERS]
                torch.cuda.empty_cache()
    add_ratios(results)
    report = {
        "device": card,
        "size": [args.width, args.height],
        "dtype": str(dtype),
        "chunks": args.chunks,
        "compile_mode": args.compile_mode,
        "fp8": args.fp8,
        "quality": args.quality,
        "torch": torch.__version__,
        "results": [asdict(r) for r in results],
    }
    sys.stdout.write(f"{card}, {args.width}x{args.height}, median of {args.chunks} chunks\n{table(results)}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
