"""The quality script's measures, checked on generators whose answer is known: the renderer itself
(perfect control and picture, far above "repeat the first frame") and baselines that must fail."""

import numpy as np
import torch
import pytest

from lingbot_ray.world import quality
from lingbot_ray.world.dataset import make_clip

W, H = 64, 48


def renderer(world, first, actions, num_chunks, seed):
    return make_clip(world, actions, W, H).frames


def repeat_first_frame(world, first, actions, num_chunks, seed):
    return np.repeat(first[None], 9 + 12 * (num_chunks - 1), axis=0)


def mirrored_controls(world, first, actions, num_chunks, seed):
    """Moves, but the wrong way round: w↔s, a↔d, j↔l, i↔k."""
    swap = dict(zip("wsadjlik", "swdaljki"))
    return make_clip(world, [[swap[k] for k in keys] for keys in actions], W, H).frames


def blurred(world, first, actions, num_chunks, seed):
    """The renderer's frames under a 5x5 box blur: close in PSNR, not in sharpness."""
    frames = make_clip(world, actions, W, H).frames.astype(np.float32)
    padded = np.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    box = sum(padded[:, dy : dy + H, dx : dx + W] for dy in range(5) for dx in range(5)) / 25
    return box.round().astype(np.uint8)


def blocky(world, first, actions, num_chunks, seed):
    """The renderer's frames averaged over each 8x8 latent cell: every edge sits on the latent grid."""
    frames = make_clip(world, actions, W, H).frames.astype(np.float32)
    cells = frames.reshape(len(frames), H // 8, 8, W // 8, 8, 3).mean(axis=(2, 4), keepdims=True)
    return np.broadcast_to(cells, (len(frames), H // 8, 8, W // 8, 8, 3)).reshape(frames.shape).round().astype(np.uint8)


@pytest.fixture(scope="module")
def reports():
    generators = (renderer, repeat_first_frame, mirrored_controls, blurred, blocky)
    return {fn.__name__: quality.measure_generator(fn, W, H, worlds=2, progress=False) for fn in generators}


def test_the_renderer_follows_every_control_and_beats_the_baseline(reports):
    report = reports["renderer"]
    assert report["control_fidelity"] == 1.0
    assert all(row[a] == 2 for a, row in report["control_confusion"].items())
    assert report["psnr_gain_db"] >= quality.PSNR_GAIN_TARGET_DB and report["passed"]
    assert report["psnr_chunk0_db"] == 99.0 and report["sharpness_kept"] == 1.0 and report["colour_kept"] == 1.0
    assert min(report["psnr_repeat_first_frame_db_per_chunk"][1:]) < 30  # the scripts keep the camera moving


def test_repeating_the_first_frame_gains_nothing_and_fails(reports):
    report = reports["repeat_first_frame"]
    assert report["psnr_gain_db"] == pytest.approx(0.0, abs=0.01)
    assert report["psnr_model_db_per_chunk"] == report["psnr_repeat_first_frame_db_per_chunk"]
    assert not report["passed"]


def test_mirrored_controls_score_no_fidelity(reports):
    report = reports["mirrored_controls"]
    assert report["control_fidelity"] < 0.5 and not report["passed"]
    assert report["control_confusion"]["w"]["s"] + report["control_confusion"]["j"]["l"] >= 3


def test_a_blur_keeps_its_colour_and_some_psnr_but_not_its_sharpness(reports):
    report = reports["blurred"]
    assert report["sharpness_kept"] < quality.SHARPNESS_TARGET and not report["passed"]
    assert report["colour_kept"] > 0.7 and report["control_fidelity"] == 1.0
    assert report["psnr_chunk0_db"] > 20


def grainy(world, first, actions, num_chunks, seed):
    """The blur with strong grain on top: as much gradient as the renderer's, none of its detail."""
    frames = blurred(world, first, actions, num_chunks, seed).astype(np.float32)
    noise = np.random.default_rng(seed).normal(0, 24, frames.shape)
    return np.clip(frames + noise, 0, 255).round().astype(np.uint8)


def _frames(generator):
    return generator(quality.held_out_worlds(1, 0)[0], None, [["w"]] * 3, 1, 0)


def _magnitude(frames):
    """The mean gradient magnitude, the ratio that grain and block edges both pass for sharpness."""
    x = frames.astype(np.float64)
    return float(np.hypot(np.diff(x, axis=-2)[..., :-1, :, :], np.diff(x, axis=-3)[..., :, :-1, :]).mean())


def test_blocks_are_not_sharpness():
    """Cell-by-cell frames have their only edges on the latent grid: a ratio of gradient magnitudes
    counts them as detail; off the grid they are none."""
    frames, truth = _frames(blocky), _frames(renderer)
    assert _magnitude(frames) > 0.25 * _magnitude(truth)  # 0.31
    assert quality.gradient_kept(frames, truth, grid=8) == 0.0 < quality.gradient_kept(frames, truth)
    assert quality.gradient_kept(truth, truth, grid=8) == 1.0


def test_grain_is_not_sharpness():
    """Noise on a blur has more gradient than the truth, and none of it is the truth's."""
    frames, truth, blur = _frames(grainy), _frames(renderer), _frames(blurred)
    assert _magnitude(frames) > _magnitude(truth)
    assert quality.gradient_kept(frames, truth, grid=8) == pytest.approx(quality.gradient_kept(blur, truth, grid=8), abs=0.05)
    assert quality.gradient_kept(blur, truth, grid=8) < quality.SHARPNESS_TARGET


def test_blocks_keep_psnr_but_not_sharpness(reports):
    report = reports["blocky"]
    assert report["sharpness_kept"] < 0.05 and not report["passed"]
    assert report["psnr_chunk0_db"] > 15


def test_report_text_is_one_table_of_measures_and_targets(reports):
    text = quality.format_report(reports["renderer"])
    assert "PASSED" in text and "generator at 64x48, 2 held-out worlds" in text
    assert "control fidelity" in text and "≥ 95.0 %" in text and "sharpness kept" in text and "≥ 0.70" in text
    assert "MISSED" in quality.format_report(reports["blurred"])


def test_vae_ceiling_generator_round_trips_the_renderers_frames(tmp_path):
    from lingbot_ray.models.tiny_components import build_tiny_vae

    build_tiny_vae(tmp_path / "vae", base_dim=8, seed=0)
    generate_fn = quality.vae_round_trip(tmp_path / "vae", W, H)
    actions = [[]] + [["w"]] * 5
    frames = generate_fn(quality.EVAL_SEED_START, None, actions, 2, 0)
    assert frames.shape == (21, H, W, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, generate_fn(quality.EVAL_SEED_START, None, actions, 2, 0))  # deterministic
    truth = make_clip(quality.EVAL_SEED_START, actions, W, H).frames
    assert not np.array_equal(frames, truth)  # it went through the (random) VAE

    from lingbot_ray.models.tiny_decoder import TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder

    torch.manual_seed(0)
    tiny = save_tiny_autoencoder(TinyAutoencoder(TinyDecoderConfig(encoder_width=1, decoder_widths=(8, 8, 4, 4))), tmp_path / "tiny_decoder")
    decoded = quality.vae_round_trip(tmp_path / "vae", W, H, tiny)(quality.EVAL_SEED_START, None, actions, 2, 0)
    assert decoded.shape == frames.shape and not np.array_equal(decoded, frames)  # the tiny decoder decoded it


def test_truth_history_writes_the_cache_from_the_truth_and_nothing_else():
    """The diagnostic generator changes only what the KV cache holds: the first chunk (nothing
    cached yet) is the served model's, bit for bit; the next differs, and is deterministic."""
    from pathlib import Path

    import lingbot_ray
    from lingbot_ray.engine import RealtimeEngine

    checkpoint = Path(lingbot_ray.__file__).parent / "checkpoints" / "lingbot-world-tiny"
    oracle = quality.truth_history(checkpoint)
    served = RealtimeEngine.from_pretrained(checkpoint)
    world, actions = quality.EVAL_SEED_START, [[]] + [["w"]] * 5
    first = make_clip(world, [[]], 160, 96).frames[0]
    plain = quality.generate(served, first, actions, 2, 0)
    frames = oracle(world, first, actions, 2, 0)
    assert frames.shape == plain.shape == (21, 96, 160, 3)
    assert np.array_equal(frames[:9], plain[:9])
    assert not np.array_equal(frames[9:], plain[9:])
    assert np.array_equal(frames, oracle(world, first, actions, 2, 0))


def test_the_strip_shows_the_first_measured_session():
    """Top row the renderer's frames of the first measured world and script, bottom row the
    generator's for the same session: the renderer's own strip has two equal rows, and the
    still picture's bottom row repeats the given frame."""
    seen = []

    def recording(world, first, actions, num_chunks, seed):
        seen.append((world, actions, seed))
        return renderer(world, first, actions, num_chunks, seed)

    strip = quality.session_strip(recording, W, H, frames=(0, 20, 44))
    assert strip.shape == (2 * H, 3 * W, 3) and strip.dtype == np.uint8
    assert np.array_equal(strip[:H], strip[H:])
    report_seen = []
    quality.measure_generator(lambda *a: report_seen.append(a[::2]) or renderer(*a), W, H, worlds=1, progress=False)
    assert seen[0] == report_seen[0]  # the same world, script and session seed as the measured session
    truth = make_clip(seen[0][0], seen[0][1], W, H).frames
    assert np.array_equal(strip[:H, W : 2 * W], truth[20]) and not np.array_equal(truth[20], truth[0])
    still = quality.session_strip(repeat_first_frame, W, H, frames=(0, 20, 44))
    assert np.array_equal(still[H:, 2 * W :], truth[0]) and np.array_equal(still[:H], strip[:H])


def test_the_strip_of_a_checkpoint_is_its_first_measured_session(tmp_path):
    """``--strip``: the embedded checkpoint served as ``measure`` serves it, scaled 2× as a PNG whose
    top row is the renderer's frames of the first measured session."""
    from pathlib import Path

    from PIL import Image

    import lingbot_ray

    checkpoint = Path(lingbot_ray.__file__).parent / "checkpoints" / "lingbot-world-tiny"
    strip = np.asarray(Image.open(quality.write_strip(checkpoint, tmp_path / "strip.png")))
    assert strip.shape == (2 * 2 * 96, 5 * 2 * 160, 3)
    world, actions = quality.held_out_worlds(1, 0)[0], quality.session_script(np.random.default_rng(0))
    truth = make_clip(world, actions, 160, 96).frames
    assert np.array_equal(strip[: 2 * 96 : 2, 2 * 160 : 4 * 160 : 2], truth[11])
    assert float(quality.frame_psnr(strip[2 * 96 :: 2, ::2][:, :160], truth[0])) > 20  # the given frame, through the VAE
