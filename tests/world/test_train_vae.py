"""Training the world VAE: crops render exactly (or are cut from a dataset's clips), the loss falls,
resume is exact, the saved folder serves."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from lingbot_ray.engine.session import ModelGeometry, SessionSpec
from lingbot_ray.engine.stages import VAEStage, frames_to_uint8
from lingbot_ray.models.vae_streaming import StreamingWanVAE
from lingbot_ray.world import train_vae as tv
from lingbot_ray.world.dataset import ClipDataset, generate_dataset, make_clip

STEPS = 12


def tiny_config(out_dir, **changes) -> tv.TrainConfig:
    settings = {
        "out_dir": str(out_dir),
        "steps": STEPS,
        "base_dim": 4,
        "res_blocks": 1,
        "crop": (16, 16),
        "frames": 5,
        "max_context": 2,
        "first_frame_share": 0.5,
        "batch": 2,
        "lr": 3e-3,
        "warmup": 3,
        "frame_size": (32, 24),
        "checkpoint_every": 4,
        "log_every": 4,
        "workers": 0,
        "stats_clips": 2,
        "stats_latent_frames": 2,
        "eval_clips": 1,
        "eval_latent_frames": 4,
        "progress": False,
    }
    settings.update(changes)
    return tv.TrainConfig(**settings)


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, one_thread):
    cfg = tiny_config(tmp_path_factory.mktemp("full"))
    return cfg, tv.train(cfg)


def test_colour_kept_is_one_for_exact_colour_and_zero_for_grey():
    x = tv.to_pixels(make_clip(1_000_011, [[], ["l"]], 48, 32).frames)[None]
    luma = (torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1, 1) * x).sum(dim=1, keepdim=True)  # BT.601 Y
    assert tv.colour_kept(x, x) == pytest.approx(1.0)
    assert abs(tv.colour_kept(luma.expand_as(x), x)) < 0.02  # right luminance, no colour
    half = luma + 0.5 * (x - luma)  # half the saturation
    assert tv.colour_kept(half, x) == pytest.approx(0.5, abs=0.02)
    assert tv.psnr(luma.expand_as(x), x) > 20  # what PSNR makes of the grey picture


def test_a_rendered_crop_is_that_window_of_the_full_frame():
    actions = [[], ["w"], ["l"]]
    full = make_clip(5, actions, 48, 32).frames
    crop = tv.render_crop(5, actions, (48, 32), (16, 8), x0=24, y0=8)
    assert crop.shape == (9, 8, 16, 3)
    assert np.abs(crop.astype(int) - full[:, 8:16, 24:40]).max() <= 1  # float rounding at most


def test_training_lowers_the_reconstruction_loss(full_run):
    cfg, result = full_run
    batch = torch.stack([tv.CropDataset(cfg.seed + 1, cfg.frames, cfg.crop, cfg.frame_size)[i] for i in range(4)])
    torch.manual_seed(cfg.seed)
    initial = tv.build_vae(cfg.base_dim, cfg.res_blocks)
    trained = AutoencoderKLWan.from_pretrained(result.vae_dir)
    with torch.no_grad():
        before = tv.loss_terms(initial, batch, None, cfg.kl_weight, cfg.edge_weight)["loss"].item()
        after = tv.loss_terms(trained, batch, None, cfg.kl_weight, cfg.edge_weight)["loss"].item()
    assert after < 0.8 * before, (before, after)
    log = [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [4, 8, 12]


def test_resume_continues_exactly(full_run, tmp_path, one_thread):
    cfg, _result = full_run
    interrupted = tiny_config(tmp_path, stop_at=5)  # checkpoints at 4 and (on stopping) 5
    stopped = tv.train(interrupted)
    assert stopped.step == 5 and stopped.vae_dir is None
    assert tv.latest_checkpoint(tmp_path).name == "step_0000005.pt"
    resumed = tv.train(tiny_config(tmp_path), resume=True)
    assert resumed.step == STEPS
    expected = torch.load(tv.latest_checkpoint(cfg.out_dir), weights_only=False)
    got = torch.load(tv.latest_checkpoint(tmp_path), weights_only=False)
    assert expected["step"] == got["step"] == STEPS
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    assert torch.equal(expected["rng"]["noise"], got["rng"]["noise"])


def test_saved_folder_loads_with_measured_statistics_and_streams(full_run):
    cfg, result = full_run
    vae = AutoencoderKLWan.from_pretrained(result.vae_dir).eval()
    assert vae.config.base_dim == cfg.base_dim and vae.config.num_res_blocks == cfg.res_blocks
    mean, std = tv.latent_statistics(vae, cfg)
    np.testing.assert_allclose(vae.config.latents_mean, mean, atol=1e-5)
    np.testing.assert_allclose(vae.config.latents_std, std, atol=1e-5)
    assert vae.config.latents_mean != [0.0] * tv.Z_DIM and vae.config.latents_std != [1.0] * tv.Z_DIM
    report = json.loads((Path(cfg.out_dir) / "eval.json").read_text())
    assert report["clips"] == 1 and np.isfinite(report["psnr"]) and report["colour_kept"] <= 1
    assert (Path(cfg.out_dir) / "eval_side_by_side.png").is_file()

    # The serving path: first frame → condition latents, then streamed decode == one-shot decode.
    streaming = StreamingWanVAE.from_pretrained(result.vae_dir, subfolder=None)
    geometry = ModelGeometry(8, 4, 16, (1, 2, 2), 3, 9, 18, 1024)
    stage = VAEStage(streaming, geometry)
    width, height = 32, 32
    frames = make_clip(1_000_003, [[], ["w"], ["w"], ["l"], ["l"], ["a"]], width, height).frames
    condition = stage.encode_condition(frames[0])
    assert condition.latents.shape[:2] == (1, 16)
    x = tv.to_pixels(frames)[None]
    with torch.no_grad():
        mu, _, _ = tv.encode_moments(vae, x)
        one_shot = frames_to_uint8(vae.decode(mu).sample)
    z = (mu - torch.tensor(mean).view(1, -1, 1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1, 1)
    spec = SessionSpec(prompt="a world", image=frames[0], width=width, height=height)
    state = stage.new_session(spec.resolve(geometry))
    streamed = np.concatenate([stage.decode(state, z[:, :, i : i + 3]) for i in (0, 3)])
    assert streamed.shape == one_shot.shape == frames.shape
    assert np.abs(streamed.astype(int) - one_shot).max() <= 1  # de-/normalisation rounding only


def test_a_warmed_up_stream_continues_exactly(one_thread):
    torch.manual_seed(0)
    vae = tv.build_vae(4, 1).eval()
    x = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    with torch.no_grad():
        mu, _, _ = tv.encode_moments(vae, x)
        head, _, cache = tv.encode_moments(vae, x[:, :, :5])
        tail, _, _ = tv.encode_moments(vae, x[:, :, 5:], cache)
        torch.testing.assert_close(torch.cat([head, tail], dim=2), mu)
        frames, _ = tv.decode_frames(vae, mu)
        first, cache = tv.decode_frames(vae, mu[:, :, :2])
        rest, _ = tv.decode_frames(vae, mu[:, :, 2:], cache)
        torch.testing.assert_close(torch.cat([first, rest], dim=2), frames)
    dataset = tv.CropDataset(0, 5, (16, 8), (32, 24), batch=2, max_context=3, first_frame_share=0.3)
    for index in range(0, 12, 2):
        context = dataset.context(index)
        assert dataset.context(index + 1) == context
        assert dataset[index].shape == (3, 1 + 4 * (context + 1), 8, 16)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips") / "data"
    generate_dataset(folder, num_clips=3, num_latent_frames=4, width=32, height=24, seed=0, workers=1)
    return folder


def test_crops_of_a_datasets_clips_are_windows_of_their_frames(clip_folder):
    clips = [tv.to_pixels(np.array(frames)) for frames, _, _ in ClipDataset(clip_folder)]
    dataset = tv.ClipCropDataset(clip_folder, 0, 5, (16, 8), batch=2, max_context=2, first_frame_share=0.3)
    assert dataset.frame_size == (32, 24)
    contexts, starts = set(), set()
    for index in range(16):
        sample, context = dataset[index], dataset.context(index)
        contexts.add(context)
        length = 1 + 4 * (context + 1)
        assert sample.shape == (3, length, 8, 16)
        assert torch.equal(sample, dataset[index])  # a pure function of (seed, index)
        found = [t for clip in clips for t in range(clip.shape[1] - length + 1) for y in range(17) for x in range(17)
                 if torch.equal(sample, clip[:, t : t + length, y : y + 8, x : x + 16])]
        assert found, index
        starts.update(found)
    assert contexts == {0, 1, 2} and len(starts) > 1


def test_training_on_a_datasets_clips_resumes_exactly_and_checks_they_fit(clip_folder, tmp_path, one_thread):
    whole = tv.train(tiny_config(tmp_path / "whole", steps=4, data_dir=str(clip_folder), eval_clips=0))
    assert whole.step == 4 and whole.vae_dir is not None
    assert tv.train(tiny_config(tmp_path / "parts", steps=4, data_dir=str(clip_folder), stop_at=2)).step == 2
    tv.train(tiny_config(tmp_path / "parts", steps=4, data_dir=str(clip_folder)), resume=True)
    expected = torch.load(tv.latest_checkpoint(tmp_path / "whole"), weights_only=False)
    got = torch.load(tv.latest_checkpoint(tmp_path / "parts"), weights_only=False)
    assert got["config"]["data_dir"] == str(clip_folder)
    for name, tensor in expected["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    with pytest.raises(ValueError, match=r"clips have 4 latent frames, max_context=3 with frames=5 needs 5"):
        tv.train(tiny_config(tmp_path / "long", data_dir=str(clip_folder), max_context=3))
    with pytest.raises(ValueError, match=r"clips are 32x24, frame_size is 48x24"):
        tv.train(tiny_config(tmp_path / "wide", data_dir=str(clip_folder), frame_size=(48, 24)))


def test_a_run_that_slows_down_re_plans_its_schedule_and_still_anneals(tmp_path, one_thread, monkeypatch, capsys):
    clock, real = [0.0], tv.loss_terms

    def timed(*args, **kwargs):  # 1 s per step, 2 s from step 21 on, on a fake clock
        clock[0] += 1.0 if clock[0] < 20 else 2.0
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "loss_terms", timed)
    monkeypatch.setattr(tv.time, "perf_counter", lambda: clock[0])
    cfg = tiny_config(tmp_path, steps=None, minutes=1.0, eval_clips=0)
    result = tv.train(cfg)
    out = capsys.readouterr().out
    planned = int(out.split("schedule fixed at ")[1].split()[0])
    assert planned == 13 + int(0.98 * (60 - 13))  # timed from step 3 to 13 at 1 s/step
    assert result.total_steps < planned
    assert result.step == result.total_steps and clock[0] <= 60  # the schedule ran to its end in time
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == result.total_steps
    assert last["lr"] == pytest.approx(tv.lr_at(result.total_steps - 1, result.total_steps, cfg))
    assert last["lr"] < 1.1 * cfg.min_lr_ratio * cfg.lr  # annealed


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, one_thread, monkeypatch):
    real = tv.loss_terms
    calls = []

    def diverging(*args, **kwargs):  # finite for 6 steps, then NaN
        terms = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > 6:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(tv, "loss_terms", diverging)
    with pytest.raises(FloatingPointError, match=r"train VAE: loss nan at step 7: .*lower --lr"):
        tv.train(tiny_config(tmp_path))
    kept = torch.load(tv.latest_checkpoint(tmp_path), weights_only=False)
    assert kept["step"] == 4 and all(torch.isfinite(t).all() for t in kept["model"].values())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    cfg = tiny_config(tmp_path_factory.mktemp("tiny"), base_dim=6, decoder_base_dim=4, tiny_widths=(8, 8, 4, 4), stats_momentum=0.2)
    return cfg, tv.train(cfg)


def test_a_tiny_decoded_run_trains_the_encoder_and_tiny_decoder_only_and_resumes_exactly(tiny_run, tmp_path, one_thread):
    cfg, result = tiny_run
    log = [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    torch.manual_seed(cfg.seed)
    initial = tv.build_model(cfg)
    trained = torch.load(tv.latest_checkpoint(cfg.out_dir), weights_only=False)["model"]
    changed = {name for name, tensor in initial.state_dict().items() if not torch.equal(tensor, trained[name])}
    assert any(n.startswith("vae.encoder.") for n in changed) and any(n.startswith("tiny.decoder.") for n in changed)
    assert not any(n.startswith(("vae.decoder.", "vae.post_quant_conv.", "tiny.encoder.")) for n in changed)
    assert {"latents_mean", "latents_std", "observed"} <= changed

    tv.train(tiny_config(tmp_path, **{k: getattr(cfg, k) for k in ("base_dim", "decoder_base_dim", "tiny_widths", "stats_momentum")}, stop_at=6))
    resumed = tv.train(tv.config_from_checkpoint(tv.latest_checkpoint(tmp_path), stop_at=None), resume=True)
    assert resumed.step == STEPS and resumed.vae_dir is not None
    got = torch.load(tv.latest_checkpoint(tmp_path), weights_only=False)["model"]
    for name, tensor in trained.items():
        assert torch.equal(tensor, got[name]), name


def test_a_tiny_decoded_run_saves_its_statistics_and_decoder_which_stream_as_trained(tiny_run):
    from lingbot_ray.models.tiny_decoder import StreamingTinyDecoder

    cfg, result = tiny_run
    out = Path(cfg.out_dir)
    state = torch.load(tv.latest_checkpoint(out), weights_only=False)["model"]
    vae = AutoencoderKLWan.from_pretrained(result.vae_dir).eval()
    assert vae.config.base_dim == 6 and vae.config.decoder_base_dim == 4
    np.testing.assert_allclose(vae.config.latents_mean, state["latents_mean"].numpy(), atol=1e-5)
    np.testing.assert_allclose(vae.config.latents_std, state["latents_std"].numpy(), atol=1e-5)
    report = json.loads((out / "eval.json").read_text())
    assert np.isfinite(report["psnr"]) and report["psnr"] > 8

    # the saved tiny decoder (float16 weights) streaming chunk by chunk == the training model's decode
    model = tv.build_model(cfg)
    model.load_state_dict(state)
    model.eval()
    frames = make_clip(1_000_003, [[], ["w"], ["w"], ["l"], ["l"], ["a"]], 32, 24).frames
    with torch.no_grad():
        mu, _, _ = tv.encode_moments(model.vae, tv.to_pixels(frames)[None])
        trained = frames_to_uint8(model.decode(mu.half().float())[0])
        z = (mu - torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    streaming = StreamingTinyDecoder.from_pretrained(out / "tiny_decoder")
    cache, pieces = streaming.new_decode_cache(), []
    for start in (0, 3):
        chunk, cache = streaming.decode_chunk(z[:, :, start : start + 3], cache)
        pieces.append(frames_to_uint8(chunk))
    streamed = np.concatenate(pieces)
    assert streamed.shape == trained.shape == frames.shape
    assert np.abs(streamed.astype(int) - trained).mean() < 1.0  # float16 weights: within a level on average


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, one_thread):
    cfg = tiny_config(tmp_path_factory.mktemp("teacher"), base_dim=4, decoder_base_dim=4, tiny_widths=(8, 8, 4, 4), stats_momentum=0.2,
                      teacher_steps=6, teacher_clips=3, tiny_skip=True)
    return cfg, tv.train(cfg)


def test_a_taught_run_starts_as_the_linear_code_then_trains_end_to_end_and_resumes_exactly(teacher_run, tmp_path, one_thread):
    cfg, result = teacher_run
    torch.manual_seed(cfg.seed)
    start = tv.build_model(cfg)
    tv.fit_teacher(start, cfg)
    clip = tv.to_pixels(make_clip(1_000_005, [[], ["w"], ["l"]], 32, 24).frames)[None]
    with torch.no_grad():
        code = start.teacher.encode(clip)
        decoded, _ = start.decode(code)
    torch.testing.assert_close(decoded, start.teacher.decode(code).clamp(-1, 1), atol=1e-5, rtol=0)  # step 0: the linear decoder

    log = {r["step"]: r for r in map(json.loads, (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines())}
    assert "latent" in log[4] and "latent" not in log[12]  # steps 1-6 learn from the code, 7-12 end to end
    trained = torch.load(tv.latest_checkpoint(cfg.out_dir), weights_only=False)["model"]
    assert not torch.equal(trained["latents_std"], torch.ones(16))  # the end-to-end steps moved the statistics
    assert json.loads((Path(cfg.out_dir) / "tiny_decoder" / "config.json").read_text())["linear_skip"] is True
    assert np.isfinite(result.eval["psnr"])

    settings = {k: getattr(cfg, k) for k in ("base_dim", "decoder_base_dim", "tiny_widths", "stats_momentum", "teacher_steps", "teacher_clips", "tiny_skip")}
    tv.train(tiny_config(tmp_path, **settings, stop_at=4))
    resumed = tv.train(tv.config_from_checkpoint(tv.latest_checkpoint(tmp_path), stop_at=None), resume=True)
    assert resumed.step == STEPS
    got = torch.load(tv.latest_checkpoint(tmp_path), weights_only=False)["model"]
    for name, tensor in trained.items():
        assert torch.equal(tensor, got[name]), name


def test_the_teacher_phase_weighs_the_encoders_code_error_by_its_pixel_cost(teacher_run, one_thread):
    cfg, _ = teacher_run
    torch.manual_seed(cfg.seed)
    model = tv.build_model(cfg)
    tv.fit_teacher(model, cfg)
    clip = tv.to_pixels(make_clip(1_000_007, [[], ["w"]], 32, 24).frames)[None]
    with torch.no_grad():
        code = model.teacher.encode(clip)
        mu, _, _ = tv.encode_moments(model.vae, clip)
        error = ((mu - code) / model.latents_std.view(1, -1, 1, 1, 1)).square()
        for share in (0.0, 0.5, 1.0):
            terms = tv.loss_terms(model, clip, None, cfg.kl_weight, cfg.edge_weight, 0, cfg.chroma_weight, teach=True, teacher_pixel_share=share)
            weights = model.teacher.pixel_weights(code.shape[2], share=share)
            torch.testing.assert_close(terms["latent"], (error * weights[None, :, :, None, None]).mean())
    with pytest.raises(ValueError, match="teacher_pixel_share=2"):
        tiny_config(Path(cfg.out_dir), teacher_pixel_share=2.0).check()


@pytest.mark.parametrize("changes, named", [({"teacher_steps": 5}, "teacher_steps"), ({"tiny_skip": True}, "tiny_skip")])
def test_a_teacher_or_a_skip_needs_the_tiny_decoder(tmp_path, changes, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(tmp_path, **changes).check()
