import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from lingbot_ray.engine import (
    DiTStage,
    PositionLimitReached,
    SessionClosedError,
    TextStage,
    VAEStage,
)
from lingbot_ray.models.attention import PositionLimitError

from .helpers import HEIGHT, WIDTH, conditions, run


def differ(a, b):
    return a.shape != b.shape or not np.array_equal(a, b)


# ------------------------------------------------------------------------------------ geometry


def test_one_block_chunks_are_9_then_12_frames(engine, make_spec):
    state = engine.new_session(make_spec(num_frames=9))
    outs = [engine.step(state, conditions()) for _ in range(3)]
    engine.close(state)
    assert [o.frames.shape for o in outs] == [(9, HEIGHT, WIDTH, 3)] + [(12, HEIGHT, WIDTH, 3)] * 2
    assert all(o.frames.dtype == np.uint8 for o in outs)
    assert [o.chunk_index for o in outs] == [0, 1, 2]
    assert [o.start_frame for o in outs] == [0, 3, 6]
    assert [o.num_latent_frames for o in outs] == [3, 3, 3]
    assert set(outs[0].timings_ms) == {"text_encoder_ms", "dit_ms", "vae_ms", "postprocess_ms", "total_ms"}
    assert all(v >= 0 for o in outs for v in o.timings_ms.values())


def test_num_frames_24_gives_two_blocks_per_chunk(engine, make_spec):
    state = engine.new_session(make_spec(num_frames=24))
    outs = [engine.step(state, conditions(frames=6)) for _ in range(2)]
    engine.close(state)
    assert [o.num_frames for o in outs] == [21, 24]
    assert [o.num_latent_frames for o in outs] == [6, 6]
    assert [o.start_frame for o in outs] == [0, 6]


def test_a_two_block_chunk_equals_two_one_block_chunks(engine, make_spec):
    moves = [("w",), ("w", "l"), ("d",), ("i",), ("s",), ("j",)]
    one = run(
        engine,
        make_spec(num_frames=12),
        [
            dataclasses.replace(conditions(), camera_actions=tuple(moves[:3])),
            dataclasses.replace(conditions(), camera_actions=tuple(moves[3:])),
        ],
    )
    two = run(engine, make_spec(num_frames=24), [dataclasses.replace(conditions(), camera_actions=tuple(moves))])
    assert np.array_equal(two[0], np.concatenate(one))


# ------------------------------------------------------------------------------------ determinism


def test_same_seed_same_frames_across_two_engines(engine, other_engine, make_spec):
    assert engine is not other_engine and engine.dit.model is not other_engine.dit.model
    chunks = [conditions(), conditions(("w",)), conditions(("l",))]
    a = run(engine, make_spec(seed=11), chunks)
    b = run(other_engine, make_spec(seed=11), chunks)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    c = run(other_engine, make_spec(seed=12), chunks)
    assert all(differ(x, y) for x, y in zip(a, c))


def test_interleaved_sessions_do_not_share_state(engine, make_spec):
    alone_a = run(engine, make_spec(seed=1), [conditions(), conditions(("w",))])
    alone_b = run(engine, make_spec(seed=2, prompt="snow on the mountain"), [conditions(), conditions(("j",))])
    a = engine.new_session(make_spec(seed=1))
    b = engine.new_session(make_spec(seed=2, prompt="snow on the mountain"))
    got_a0, got_b0 = engine.step(a, conditions()).frames, engine.step(b, conditions()).frames
    got_b1, got_a1 = engine.step(b, conditions(("j",))).frames, engine.step(a, conditions(("w",))).frames
    for state in (a, b):
        engine.close(state)
    assert np.array_equal(got_a0, alone_a[0]) and np.array_equal(got_a1, alone_a[1])
    assert np.array_equal(got_b0, alone_b[0]) and np.array_equal(got_b1, alone_b[1])


def test_reset_replays_the_session(engine, make_spec):
    state = engine.new_session(make_spec())
    first = [engine.step(state, c).frames for c in (conditions(), conditions(("w",)))]
    state.reset()
    again = [engine.step(state, c).frames for c in (conditions(), conditions(("w",)))]
    engine.close(state)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))


# ------------------------------------------------------------------------------------ conditions


def test_prompt_change_changes_later_frames_only(engine, make_spec):
    base = run(engine, make_spec(), [conditions(), conditions(), conditions()])
    changed = run(
        engine, make_spec(), [conditions(), conditions(prompt="a red car on a coastal road"), conditions()]
    )
    assert np.array_equal(base[0], changed[0])
    assert differ(base[1], changed[1])
    assert differ(base[2], changed[2])  # the new prompt stays in effect


def test_prompt_change_keeps_the_kv_history(engine, make_spec):
    state = engine.new_session(make_spec())
    engine.step(state, conditions())
    held = state.dit.kv_cache.held_frames()
    engine.step(state, conditions(prompt="rain on a neon city at night"))
    assert held == [0, 1, 2]
    assert state.dit.kv_cache.held_frames() == [0, 1, 2, 3, 4, 5]
    engine.close(state)


def test_camera_actions_change_frames(engine, make_spec):
    still = run(engine, make_spec(), [conditions(), conditions(), conditions()])
    moving = run(engine, make_spec(), [conditions(), conditions(("w",)), conditions(("w",))])
    assert np.array_equal(still[0], moving[0])
    assert differ(still[1], moving[1])
    assert differ(still[2], moving[2])


def test_event_id_persists_until_another_is_sampled(engine, make_spec):
    state = engine.new_session(make_spec())
    ids = [engine.step(state, conditions(event_id=e)).event_id for e in (None, 5, None, 9)]
    engine.close(state)
    assert ids == [None, 5, 5, 9]


def _count_forwards(engine, monkeypatch):
    calls = []
    original = engine.dit.model.forward_block

    def spy(latents, timestep, **kwargs):
        calls.append((latents.shape[0], float(timestep[0]), kwargs["update_cache"]))
        return original(latents, timestep, **kwargs)

    monkeypatch.setattr(engine.dit.model, "forward_block", spy)
    return calls


def test_dmd_block_runs_steps_then_one_clean_context_forward(engine, make_spec, monkeypatch):
    calls = _count_forwards(engine, monkeypatch)
    run(engine, make_spec(), [conditions()])
    timesteps = [t for _, t, _ in calls]
    assert timesteps == pytest.approx([1000.0, 978.66, 947.18, 825.40, 0.0], abs=0.01)
    assert [u for _, _, u in calls] == [False] * 4 + [True]
    assert {b for b, _, _ in calls} == {1}

    calls.clear()
    two_steps = run(engine, make_spec(num_inference_steps=2), [conditions()])
    assert [t for _, t, _ in calls] == pytest.approx([1000.0, 825.40, 0.0], abs=0.01)
    four_steps = run(engine, make_spec(), [conditions()])
    assert differ(two_steps[0], four_steps[0])


def test_guidance_runs_both_branches(engine, make_spec, monkeypatch):
    plain = run(engine, make_spec(), [conditions(), conditions()])
    calls = _count_forwards(engine, monkeypatch)
    state = engine.new_session(make_spec(guidance_scale=3.0))
    assert state.dit.kv_cache.batch_size == 2
    guided = [engine.step(state, c).frames for c in (conditions(), conditions())]
    engine.close(state)
    assert {b for b, _, _ in calls} == {2}
    assert len(calls) == 2 * 5
    assert all(differ(x, y) for x, y in zip(plain, guided))
    negative = run(engine, make_spec(guidance_scale=3.0, negative_prompt="blurry, dark"), [conditions()])
    assert differ(negative[0], guided[0])


def test_guidance_scale_one_is_a_single_branch(engine, make_spec):
    state = engine.new_session(make_spec(guidance_scale=1.0, negative_prompt="ignored"))
    assert state.dit.kv_cache.batch_size == 1
    engine.close(state)


# ------------------------------------------------------------------------------------ lifecycle


def test_close_frees_state_and_later_use_raises(engine, make_spec):
    state = engine.new_session(make_spec())
    engine.step(state, conditions())
    engine.close(state)
    assert state.closed
    assert state.dit.kv_cache is None and state.dit.text_cache is None and state.dit.condition is None
    assert state.vae.decode_cache is None
    with pytest.raises(SessionClosedError):
        engine.step(state, conditions())
    with pytest.raises(SessionClosedError):
        state.reset()
    engine.close(state)  # idempotent


def test_position_limit_is_a_typed_engine_error(engine, make_spec):
    # a DiT stage on the same weights whose geometry allows 6 latent frames
    geometry = dataclasses.replace(engine.geometry, rope_max_seq_len=6)
    dit = DiTStage(engine.dit.model, geometry, engine.dit.sampler, device=engine.device, dtype=engine.dit.dtype)
    resolved = make_spec().resolve(geometry)
    condition = engine.vae.encode_condition(make_spec().image)
    state = dit.new_session(resolved, condition, engine.text.encode(make_spec().prompt))
    dit.step(state, conditions())
    dit.step(state, conditions())
    with pytest.raises(PositionLimitReached, match="rope_max_seq_len=6"):
        dit.step(state, conditions())
    assert state.next_frame == 6


def test_position_limit_from_the_model_is_wrapped(engine, make_spec, monkeypatch):
    def refuse(*args, **kwargs):
        raise PositionLimitError("latent frames 0..2 exceed rope_max_seq_len")

    monkeypatch.setattr(engine.dit.model, "forward_block", refuse)
    state = engine.new_session(make_spec())
    with pytest.raises(PositionLimitReached):
        engine.step(state, conditions())
    engine.close(state)


def test_bad_inputs_name_the_field(engine, make_spec, image):
    state = engine.new_session(make_spec())
    with pytest.raises(ValueError, match="camera_actions"):
        engine.step(state, conditions(frames=2))
    engine.close(state)
    with pytest.raises(ValueError, match="width=72"):
        engine.new_session(make_spec(width=72, image=np.zeros((HEIGHT, 72, 3), np.uint8)))
    with pytest.raises(ValueError, match="window_frames=5"):
        engine.new_session(make_spec(sink_size=3, window_frames=5))
    state = engine.new_session(make_spec())
    with pytest.raises(ValueError, match="prompt_embeds"):
        engine.dit.step(state.dit, conditions(prompt="new"), None)
    engine.close(state)


def test_high_quality_decodes_in_bf16_close_to_lossless(engine, make_spec):
    lossless = run(engine, make_spec(), [conditions(), conditions()])
    state = engine.new_session(make_spec(quality="high"))
    assert state.vae.dtype == torch.bfloat16
    high = [engine.step(state, c).frames for c in (conditions(), conditions())]
    engine.close(state)
    for a, b in zip(lossless, high):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 8


# ------------------------------------------------------------------------------------ stages


def test_stages_used_separately_match_the_engine(tiny_folder, engine, make_spec):
    """The path the Ray graph takes: each stage from the folder, its own per-session state."""
    spec = make_spec(seed=3)
    chunks = [conditions(), conditions(("w",), prompt="a calm lake at sunset"), conditions(("l",))]
    expected = run(engine, spec, chunks)

    text = TextStage.from_pretrained(tiny_folder)
    dit = DiTStage.from_pretrained(tiny_folder)
    vae = VAEStage.from_pretrained(tiny_folder)
    resolved = spec.resolve(dit.geometry)
    dit_state = dit.new_session(resolved, vae.encode_condition(spec.image), text.encode(spec.prompt))
    vae_state = vae.new_session(resolved)
    for chunk, want in zip(chunks, expected):
        embeds = text.encode(chunk.prompt) if chunk.prompt is not None else None
        latents = dit.step(dit_state, chunk, embeds)
        assert np.array_equal(vae.decode(vae_state, latents), want)
    dit_state.release()
    vae_state.release()
    with pytest.raises(SessionClosedError):
        dit.step(dit_state, chunks[0])


def test_engine_never_imports_ray():
    code = (
        "import sys, lingbot_ray.engine.engine, lingbot_ray.models.loading, lingbot_ray.models.tiny; "
        "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _with_settings(tiny_folder, tmp_path, **settings):
    """A copy of the tiny checkpoint whose lingbot_ray.json has ``settings`` added."""
    import json
    import shutil

    folder = tmp_path / "settings"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(tiny_folder, folder)
    path = folder / "lingbot_ray.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    return folder


def test_camera_focal_is_the_reference_servers_500_px_at_every_size_by_default(tiny_folder):
    # SGLang-diffusion's LingBot World pipeline config (lingbot_world.py) builds its camera
    # intrinsics as [500, 500, W/2, H/2] whatever the session size.
    from lingbot_ray.engine.stages import DiTStage

    dit = DiTStage.from_pretrained(tiny_folder)
    for width, height in ((832, 480), (1280, 720), (320, 192)):
        intrinsics = dit.intrinsics(width, height)
        assert (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy) == (500.0, 500.0, width / 2, height / 2)


def test_camera_focal_from_the_checkpoint_is_resized_per_axis_as_the_authors_do(tiny_folder, tmp_path):
    # The authors' script (robbyant lingbot-world, wan/image2video_fast.py with get_Ks_transformed
    # in wan/utils/cam_utils.py) gives intrinsics at 832x480 and resizes them to the output size:
    # fx by width / 832, fy by height / 480. Here the focal is given at the tiny's 160x96.
    from lingbot_ray.engine.stages import DiTStage

    folder = _with_settings(tiny_folder, tmp_path, camera_focal=96.0)
    intrinsics = DiTStage.from_pretrained(folder).intrinsics(320, 240)
    assert (intrinsics.fx, intrinsics.fy, intrinsics.cx, intrinsics.cy) == (192.0, 240.0, 160.0, 120.0)
    folder = _with_settings(tiny_folder, tmp_path, camera_focal=-1)
    with pytest.raises(ValueError, match="camera_focal=-1"):
        DiTStage.from_pretrained(folder)


def test_timestep_format_comes_from_the_checkpoint(tiny_folder, tmp_path):
    from lingbot_ray.engine.stages import DiTStage

    assert DiTStage.from_pretrained(tiny_folder).sampler.timestep_format == "float"
    folder = _with_settings(tiny_folder, tmp_path, timestep_format="int")
    assert DiTStage.from_pretrained(folder).sampler.schedule().timesteps == (999.0, 978.0, 947.0, 825.0)
    folder = _with_settings(tiny_folder, tmp_path, timestep_format="half")
    with pytest.raises(ValueError, match="timestep_format='half'"):
        DiTStage.from_pretrained(folder)


# ------------------------------------------------------------------------ LingBot World 2.0


@pytest.fixture(scope="module")
def v2_folders(tmp_path_factory, tiny_folder):
    """Tiny v2 checkpoints whose DiT-only ones share the tiny v1 folder's text encoder and VAE."""
    from lingbot_ray.models.tiny import build_tiny_checkpoint
    from tests.models.v2_layouts import TINY_V2_1P3B_OVERRIDES, build_v2_14b_native, build_v2_1p3b, write_settings

    root = tmp_path_factory.mktemp("v2")
    build_v2_1p3b(root / "small", shared=tiny_folder)
    build_v2_14b_native(root / "native", shared=tiny_folder)
    # the same 1.3B DiT in the diffusers layout (as a community repackaging builds it): its config
    # written out, model_version given, the same seeds for every component
    build_tiny_checkpoint(root / "small-diffusers", seed=0, transformer_overrides=TINY_V2_1P3B_OVERRIDES)
    write_settings(root / "small-diffusers", model_version="v2-1.3b")
    return root


def test_a_v2_1p3b_session_streams_13_then_16_frames(v2_folders, make_spec):
    """Blocks of 4 latent frames: 1 + 4·3 = 13 frames first, then 16, as the authors' script gives."""
    from lingbot_ray.engine import RealtimeEngine

    engine = RealtimeEngine.from_pretrained(v2_folders / "small")
    assert engine.geometry.num_frames_per_block == 4
    assert engine.dit.sampler.timestep_indices == (0, 250, 500, 750) and engine.dit.sampler.shift == 5.0
    frames = run(engine, make_spec(), [conditions(["w"], frames=4), conditions(["j"], frames=4), conditions([], frames=4)])
    assert [f.shape for f in frames] == [(13, HEIGHT, WIDTH, 3), (16, HEIGHT, WIDTH, 3), (16, HEIGHT, WIDTH, 3)]
    assert all(f.std() > 0 for f in frames)


def test_the_1p3b_release_serves_what_the_same_dit_in_a_diffusers_folder_serves(v2_folders, make_spec):
    from lingbot_ray.engine import RealtimeEngine

    chunks = [conditions(["w"], frames=4), conditions(["d", "l"], frames=4)]
    release = run(RealtimeEngine.from_pretrained(v2_folders / "small"), make_spec(), chunks)
    repackaged = run(RealtimeEngine.from_pretrained(v2_folders / "small-diffusers"), make_spec(), chunks)
    assert all(np.array_equal(a, b) for a, b in zip(release, repackaged, strict=True))


def test_a_v2_14b_native_session_streams_with_the_reference_geometry(v2_folders, make_spec):
    from lingbot_ray.engine import RealtimeEngine

    engine = RealtimeEngine.from_pretrained(v2_folders / "native")
    geometry = engine.geometry
    assert (geometry.num_frames_per_block, geometry.default_sink_size, geometry.default_window_frames) == (3, 9, 18)
    frames = run(engine, make_spec(), [conditions(["w"]), conditions(["i"])])
    assert [f.shape[0] for f in frames] == [9, 12]


def test_the_checkpoint_names_the_decoder_sessions_get_unless_the_config_does(tiny_folder, tmp_path):
    from lingbot_ray.engine.stages import VAEStage
    from lingbot_ray.models.tiny_decoder import StreamingTinyDecoder, TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder
    from lingbot_ray.models.vae_streaming import StreamingWanVAE

    assert isinstance(VAEStage.from_pretrained(tiny_folder).vae_for(torch.float32), StreamingWanVAE)  # no setting: wan
    folder = _with_settings(tiny_folder, tmp_path, decoder="tiny")
    save_tiny_autoencoder(TinyAutoencoder(TinyDecoderConfig(encoder_width=1, decoder_widths=(8, 8, 4, 4))), folder / "tiny_decoder")
    assert isinstance(VAEStage.from_pretrained(folder).vae_for(torch.float32), StreamingTinyDecoder)
    assert isinstance(VAEStage.from_pretrained(folder, decoder="wan").vae_for(torch.float32), StreamingWanVAE)
    with pytest.raises(ValueError, match=r"vae.tiny_decoder_path='elsewhere': only read with vae.decoder: tiny \(this checkpoint decodes with wan\)"):
        VAEStage.from_pretrained(tiny_folder, tiny_decoder_path="elsewhere")
    folder = _with_settings(tiny_folder, tmp_path, decoder="taesd")
    with pytest.raises(ValueError, match=r"lingbot_ray.json decoder='taesd': must be one of \['wan', 'tiny'\] or null"):
        VAEStage.from_pretrained(folder)


def test_the_checkpoints_condition_frames_bound_the_first_frame_encoding(tiny_folder, tmp_path):
    from lingbot_ray.engine.stages import VAEStage

    image = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    full = VAEStage.from_pretrained(tiny_folder).encode_condition(image)  # no setting: to the encoder's fixed point
    assert full.num_encoded_frames > 3
    stage = VAEStage.from_pretrained(_with_settings(tiny_folder, tmp_path, condition_frames=2))
    assert stage.condition_frames == 2
    short = stage.encode_condition(image)
    assert short.num_encoded_frames == 2 and stage.encode_condition(image, max_frames=1).num_encoded_frames == 1
    torch.testing.assert_close(short.latents, full.latents[:, :, :2])  # the encoded frames are the same ones
    later = short.slice(0, 5)[:, 4:]  # every later latent frame repeats the last encoded one (mask 0 after frame 0)
    assert all(torch.equal(later[:, :, t], short.latents[:, :, 1]) for t in range(1, 5))
    with pytest.raises(ValueError, match=r"lingbot_ray.json condition_frames=0: must be an integer >= 1 or null"):
        VAEStage.from_pretrained(_with_settings(tiny_folder, tmp_path, condition_frames=0))
