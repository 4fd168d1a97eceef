"""Time the streaming decoders: ms per 12-frame chunk, the Wan 2.1 VAE against the tiny (TAEHV-style) one.

    python benchmarks/bench_decoders.py [--threads 2] [--repeats 5] [--large-repeats N] [--skip-large]
        [--json PATH]

Every row decodes one session on the CPU in fp32: a first chunk of 3 latent frames (9 video frames,
untimed warm-up), then ``--repeats`` steady-state chunks of 3 latent frames (12 video frames each),
reporting the median wall time and the median CPU time of the process (all its threads). On a
machine where other work competes for the cores the wall time suffers first, and most for the Wan
decoder's many small sequential steps; with ``--threads 1`` the CPU time is the steadier number. Rows:

- 160x96 (latents 20x12, the embedded model's size): the embedded checkpoint's trained Wan decoder
  (base_dim 4) and its tiny decoder (the one sessions get), the tiny decoder at the taew2_1 widths
  (256, 128, 64, 64) and at narrow widths (64, 32, 16, 16), and the Wan 2.1 decoder architecture at
  base_dim 4..32 (random weights), which shows how decode cost grows with width;
- 832x480 (latents 104x60, Wan 2.1's size; ``--skip-large`` leaves it out): the full Wan 2.1 VAE
  (base_dim 96) against the taew2_1-width tiny decoder, both with random weights. The Wan VAE needs
  minutes per chunk on a few CPU cores: ``--large-repeats`` (default ``--repeats``) times fewer chunks.

Speed does not depend on weight values. GMAC/chunk is torch's FLOP count (convolutions and matmuls)
of one steady-state chunk, taken at a small latent size and scaled by the pixel count (exact for
these all-convolutional decoders). Both decoders run through the project's streaming wrappers
(`StreamingWanVAE`, `StreamingTinyDecoder`), i.e. the serving path.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKLWan
from torch.utils.flop_counter import FlopCounterMode

from lingbot_ray.checkpoint import TINY_DECODER_FOLDER, checkpoint_folder
from lingbot_ray.models.tiny_decoder import StreamingTinyDecoder, TinyAutoencoder, TinyDecoderConfig, load_tiny_autoencoder
from lingbot_ray.models.vae_streaming import StreamingWanVAE

EMBEDDED = "embedded:lingbot-world-tiny"
CHUNK_LATENT_FRAMES = 3
CHUNK_FRAMES = 12  # steady-state video frames per chunk (4 per latent frame)
Z_DIM = 16
SMALL = (12, 20)  # latent (h, w) of 160x96
LARGE = (60, 104)  # latent (h, w) of 832x480
FLOP_PROBE = (4, 4)  # latent (h, w) the FLOP count runs at before scaling
WAN_BASE_DIMS = (4, 8, 16, 24, 32)
TAEW2_1_WIDTHS = (256, 128, 64, 64)
NARROW_WIDTHS = (64, 32, 16, 16)

Decoder = StreamingWanVAE | StreamingTinyDecoder  # both have new_decode_cache() and decode_chunk()


@dataclass(frozen=True)
class Row:
    size: str
    decoder: str
    params_m: float
    gmac_per_chunk: float
    ms_per_chunk: float  # median wall time
    cpu_ms_per_chunk: float  # median process CPU time
    ms_per_frame: float
    frames_per_s: float
    repeats: int


def _wan(base_dim: int | None) -> StreamingWanVAE:
    if base_dim is None:
        return StreamingWanVAE(AutoencoderKLWan())  # diffusers' defaults are Wan 2.1's VAE (base_dim 96)
    vae = AutoencoderKLWan(
        base_dim=base_dim, z_dim=Z_DIM, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
    )
    return StreamingWanVAE(vae)


def _embedded_wan() -> StreamingWanVAE:
    return StreamingWanVAE.from_pretrained(checkpoint_folder(EMBEDDED))


def _embedded_tiny() -> StreamingTinyDecoder:
    return StreamingTinyDecoder(load_tiny_autoencoder(checkpoint_folder(EMBEDDED) / TINY_DECODER_FOLDER))


def _tiny(widths: tuple[int, int, int, int]) -> StreamingTinyDecoder:
    return StreamingTinyDecoder(TinyAutoencoder(TinyDecoderConfig(decoder_widths=widths)))


def _decoder_params(decoder: Decoder) -> int:
    if isinstance(decoder, StreamingWanVAE):
        modules = [decoder.vae.decoder, decoder.vae.post_quant_conv]
    else:
        modules = [decoder.model.decoder]
    return sum(p.numel() for m in modules for p in m.parameters())


def _latents(latent_hw: tuple[int, int], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, Z_DIM, CHUNK_LATENT_FRAMES, *latent_hw, generator=generator)


def _gmac_per_chunk(decoder: Decoder, latent_hw: tuple[int, int]) -> float:
    """Multiply-adds of one steady-state chunk, counted at `FLOP_PROBE` and scaled to `latent_hw`."""
    cache = decoder.new_decode_cache()
    _, cache = decoder.decode_chunk(_latents(FLOP_PROBE, 0), cache)
    counter = FlopCounterMode(display=False)
    with counter:
        decoder.decode_chunk(_latents(FLOP_PROBE, 1), cache)
    scale = (latent_hw[0] * latent_hw[1]) / (FLOP_PROBE[0] * FLOP_PROBE[1])
    return counter.get_total_flops() / 2 / 1e9 * scale


def _ms_per_chunk(decoder: Decoder, latent_hw: tuple[int, int], repeats: int) -> tuple[float, float]:
    """Median (wall ms, process CPU ms) of `repeats` steady-state chunks of one session."""
    chunks = [_latents(latent_hw, seed) for seed in (2, 3)]
    cache = decoder.new_decode_cache()
    _, cache = decoder.decode_chunk(chunks[0], cache)  # the session's first chunk: warm-up, untimed
    wall, cpu = [], []
    for i in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        frames, cache = decoder.decode_chunk(chunks[i % 2], cache)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
        if frames.shape[2] != CHUNK_FRAMES:
            raise RuntimeError(f"decoder returned {frames.shape[2]} frames for a steady chunk, expected {CHUNK_FRAMES}")
    return statistics.median(wall), statistics.median(cpu)


def _measure(size: str, name: str, build: Callable[[], Decoder], latent_hw: tuple[int, int], repeats: int) -> Row:
    torch.manual_seed(0)
    decoder = build()
    params = _decoder_params(decoder)
    gmac = _gmac_per_chunk(decoder, latent_hw)
    ms, cpu_ms = _ms_per_chunk(decoder, latent_hw, repeats)
    del decoder
    gc.collect()
    return Row(size, name, params / 1e6, gmac, ms, cpu_ms, ms / CHUNK_FRAMES, CHUNK_FRAMES * 1e3 / ms, repeats)


Plan = list[tuple[str, str, Callable[[], Decoder], tuple[int, int], int]]


def _plan(repeats: int, large_repeats: int | None) -> Plan:
    """(size, name, builder, latent (h, w), repeats) per row; ``large_repeats`` None leaves out 832x480."""
    plan: Plan = [
        ("160x96", "wan embedded (trained, base_dim 4)", _embedded_wan, SMALL, repeats),
        ("160x96", "tiny embedded (trained, the served decoder)", _embedded_tiny, SMALL, repeats),
        ("160x96", f"tiny taew2_1 {TAEW2_1_WIDTHS}", lambda: _tiny(TAEW2_1_WIDTHS), SMALL, repeats),
        ("160x96", f"tiny narrow {NARROW_WIDTHS}", lambda: _tiny(NARROW_WIDTHS), SMALL, repeats),
    ]
    for base_dim in WAN_BASE_DIMS:
        plan.append(("160x96", f"wan 2.1 arch base_dim {base_dim}", lambda b=base_dim: _wan(b), SMALL, repeats))
    if large_repeats is not None:
        plan.append(("832x480", "wan 2.1 VAE (base_dim 96)", lambda: _wan(None), LARGE, large_repeats))
        plan.append(("832x480", f"tiny taew2_1 {TAEW2_1_WIDTHS}", lambda: _tiny(TAEW2_1_WIDTHS), LARGE, large_repeats))
    return plan


def _print_row(row: Row) -> None:
    print(
        f"{row.size:<9}{row.decoder:<40}{row.params_m:>9.3f}{row.gmac_per_chunk:>12.1f}"
        f"{row.ms_per_chunk:>12.1f}{row.cpu_ms_per_chunk:>13.1f}{row.ms_per_frame:>11.1f}{row.frames_per_s:>9.2f}"
        f"{row.repeats:>5}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed steady-state chunks per decoder")
    parser.add_argument("--large-repeats", type=int, help="timed chunks of the 832x480 rows (default: --repeats)")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 832x480 rows")
    parser.add_argument("--json", metavar="PATH", help="also write the rows and settings as JSON")
    args = parser.parse_args()
    large_repeats = args.repeats if args.large_repeats is None else args.large_repeats
    if min(args.threads, args.repeats, large_repeats) < 1:
        parser.error(
            f"--threads={args.threads}, --repeats={args.repeats}, --large-repeats={large_repeats}: must be >= 1"
        )
    torch.set_num_threads(args.threads)

    print(f"CPU fp32, threads {torch.get_num_threads()}, median of n steady-state chunks "
          f"({CHUNK_LATENT_FRAMES} latent -> {CHUNK_FRAMES} video frames), torch {torch.__version__}")
    print(f"{'size':<9}{'decoder':<40}{'params M':>9}{'GMAC/chunk':>12}{'ms/chunk':>12}{'cpu ms/chunk':>13}"
          f"{'ms/frame':>11}{'frame/s':>9}{'n':>5}")
    rows = []
    for size, name, build, latent_hw, repeats in _plan(args.repeats, None if args.skip_large else large_repeats):
        row = _measure(size, name, build, latent_hw, repeats)
        _print_row(row)
        rows.append(row)

    if args.json:
        report = {
            "device": "cpu",
            "dtype": "float32",
            "threads": args.threads,
            "repeats": args.repeats,
            "large_repeats": None if args.skip_large else large_repeats,
            "chunk_latent_frames": CHUNK_LATENT_FRAMES,
            "chunk_frames": CHUNK_FRAMES,
            "torch": torch.__version__,
            "rows": [asdict(row) for row in rows],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
