"""The DiT training pipeline on a few tiny clips: encode → train (resumable) → assemble → serve."""

import json

import numpy as np
import pytest
import torch

from lingbot_ray.control import ConditionQueue
from lingbot_ray.engine import RealtimeEngine, SessionSpec
from lingbot_ray.models.tiny_components import build_tiny_vae
from lingbot_ray.models.vae_streaming import StreamingWanVAE
from lingbot_ray.world import train_dit
from lingbot_ray.world.dataset import ClipDataset, generate_dataset

SMALL = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "freq_dim": 32}
W, H = 64, 48


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    generate_dataset(root / "data", num_clips=4, num_latent_frames=6, width=W, height=H, seed=0, progress=False)
    build_tiny_vae(root / "vae", base_dim=4, num_res_blocks=1, seed=3)
    # 3 clips per VAE call: the last call holds only one
    train_dit.encode_dataset(root / "data", root / "vae", root / "latents.pt", latent_frames=6, batch_size=3, progress=False)
    return root


def test_encoded_clips_carry_the_engines_condition_and_poses(encoded):
    data = torch.load(encoded / "latents.pt", weights_only=False)
    assert data["latents"].shape == (4, 16, 6, H // 8, W // 8) and data["conditions"].shape == (4, 20, 6, H // 8, W // 8)
    frames, actions, _ = ClipDataset(encoded / "data")[1]
    image = torch.from_numpy(np.asarray(frames[0])).float().div(127.5).sub(1).permute(2, 0, 1)[None]
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(str(encoded / "vae"))
    engine_condition = StreamingWanVAE(vae).encode_condition(image).slice(0, 6)
    # clip 1 shared its VAE call with clips 0 and 2; alone it encodes to the same latents
    video = torch.from_numpy(np.array(frames)).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    alone = (vae.encode(video).latent_dist.mean - mean) / std
    torch.testing.assert_close(data["latents"][1].float(), alone[0], atol=2e-3, rtol=2e-3)  # stored fp16
    torch.testing.assert_close(data["conditions"][1].float(), engine_condition[0], atol=2e-3, rtol=2e-3)  # stored fp16
    assert data["conditions"][1][:4, 0].eq(1).all() and data["conditions"][1][:4, 1:].eq(0).all()  # mask on frame 0 only
    torch.testing.assert_close(data["poses"][1].double(), torch.from_numpy(train_dit.block_poses(actions)).double())


def test_training_lowers_the_loss_and_resumes_exactly(encoded):
    common = dict(steps=8, batch_size=2, lr=3e-3, warmup=2, progress=False, model_overrides=SMALL, checkpoint_every=100)
    straight = train_dit.train(encoded / "latents.pt", encoded / "straight", **common)
    train_dit.train(encoded / "latents.pt", encoded / "resumed", until=4, **common)
    resumed = train_dit.train(encoded / "latents.pt", encoded / "resumed", resume=True, **common)
    assert resumed["losses"] == straight["losses"]
    a = torch.load(encoded / "straight" / "state.pt", weights_only=False)["model"]
    b = torch.load(encoded / "resumed" / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    longer = train_dit.train(encoded / "latents.pt", encoded / "longer", **{**common, "steps": 40})
    assert np.mean(longer["losses"][-8:]) < np.mean(longer["losses"][:8])


def test_own_estimates_see_the_true_history_and_never_their_own_truth(encoded):
    """A block's own estimate is made from noise and the truth before it: changing a block's truth
    moves the later blocks' estimates, never its own or an earlier one's."""
    data = torch.load(encoded / "latents.pt", weights_only=False)
    train_dit.precompute_plucker(data)
    model = train_dit.new_world_transformer(0, **SMALL).eval()
    model.load_state_dict(torch.load(encoded / "longer" / "state.pt", weights_only=False)["model"])  # trained: its output is not zero
    train_dit.silence_text_attention(model)
    clean, condition, plucker = data["latents"][:1].float(), data["conditions"][:1].float(), data["plucker"][:1]
    first_t = torch.tensor(train_dit.DMDSampler().schedule().timesteps[0])
    sink, window = model.config.sink_size, model.config.sliding_window_num_frames

    def estimates(latents):
        return train_dit.own_estimates(model, latents, condition, plucker, first_t, torch.Generator().manual_seed(5), sink_frames=sink, window_frames=window)

    changed = clean.clone()
    changed[:, :, 0:3] += 1.0  # block 0's truth (the clips are 2 blocks long)
    a, b = estimates(clean), estimates(changed)
    torch.testing.assert_close(a[:, :, :3], b[:, :, :3])
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])


def test_a_fine_tune_starts_from_the_checkpoint_and_trains_on_its_own_history(encoded):
    from lingbot_ray.models.loading import load_transformer

    ckpt = train_dit.assemble(encoded / "straight", encoded / "vae", encoded / "init_ckpt", width=W, height=H)
    common = dict(steps=4, batch_size=2, warmup=2, progress=False, model_overrides=SMALL, checkpoint_every=100, init=ckpt)
    train_dit.train(encoded / "latents.pt", encoded / "frozen", lr=0.0, **common)
    start = load_transformer(ckpt, dtype=torch.float32).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in torch.load(encoded / "frozen" / "state.pt", weights_only=False)["model"].items())
    teacher = train_dit.train(encoded / "latents.pt", encoded / "teacher", lr=1e-3, **common)
    own = train_dit.train(encoded / "latents.pt", encoded / "own", lr=1e-3, own_history=1.0, **common)
    assert own["losses"][0] != teacher["losses"][0]  # the same first batch, another history
    train_dit.train(encoded / "latents.pt", encoded / "own_resumed", lr=1e-3, own_history=1.0, until=2, **common)
    resumed = train_dit.train(encoded / "latents.pt", encoded / "own_resumed", lr=1e-3, own_history=1.0, resume=True, **common)
    assert resumed["losses"] == own["losses"]


def test_assembled_checkpoint_streams_with_the_camera_input_it_was_trained_on(encoded):
    out = train_dit.assemble(encoded / "straight", encoded / "vae", encoded / "ckpt", width=W, height=H)
    engine = RealtimeEngine.from_pretrained(out)
    intrinsics = engine.dit.intrinsics(W, H)
    assert intrinsics.fx == pytest.approx(train_dit.CAMERA_FOCAL_PER_WIDTH * W)  # not the renderer's 500·W/832
    # the Plücker input training saw is the one the engine builds from the checkpoint's intrinsics
    poses = torch.load(encoded / "latents.pt", weights_only=False)["poses"][0]
    from lingbot_ray.engine.plucker import plucker_map

    torch.testing.assert_close(train_dit.clip_plucker(poses, H, W), plucker_map(poses.double().numpy(), H, W, intrinsics))
    state = engine.new_session(SessionSpec(prompt="anything", image=np.zeros((H, W, 3), np.uint8), width=W, height=H))
    queue = ConditionQueue([["w"]] * 6)
    shapes = [engine.step(state, queue.sample(3, i)).frames.shape for i in range(2)]
    assert shapes == [(9, H, W, 3), (12, H, W, 3)]


def test_a_checkpoint_assembled_with_a_tiny_decoder_decodes_with_it(encoded):
    from lingbot_ray.models.tiny_decoder import StreamingTinyDecoder, TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder

    tiny = save_tiny_autoencoder(TinyAutoencoder(TinyDecoderConfig(encoder_width=1, decoder_widths=(8, 8, 4, 4))), encoded / "tiny_decoder")
    out = train_dit.assemble(encoded / "straight", encoded / "vae", encoded / "tiny_ckpt", width=W, height=H, tiny_decoder=tiny)
    assert (out / "tiny_decoder" / "config.json").is_file()
    assert json.loads((out / "lingbot_ray.json").read_text())["decoder"] == "tiny"
    engine = RealtimeEngine.from_pretrained(out)
    assert isinstance(engine.vae.vae_for(torch.float32), StreamingTinyDecoder)
    state = engine.new_session(SessionSpec(prompt="anything", image=np.zeros((H, W, 3), np.uint8), width=W, height=H))
    assert engine.step(state, ConditionQueue([["w"]] * 3).sample(3, 0)).frames.shape == (9, H, W, 3)
    again = train_dit.assemble(encoded / "straight", encoded / "vae", out, width=W, height=H, tiny_decoder=out / "tiny_decoder")
    assert (again / "tiny_decoder" / "config.json").is_file()  # assembling over itself keeps it


def test_a_wider_latent_sets_the_dits_channels_and_serves(encoded):
    """A VAE of 24 latent channels (train_vae's z_dim): the DiT takes 24 noisy ⊕ 4 mask ⊕ 24 condition
    channels in and gives 24 out, and its checkpoint streams through the engine."""
    from lingbot_ray.world.train_vae import build_vae

    torch.manual_seed(0)
    build_vae(2, 1, z_dim=24).save_pretrained(encoded / "vae24")
    train_dit.encode_dataset(encoded / "data", encoded / "vae24", encoded / "latents24.pt", latent_frames=6, progress=False)
    train_dit.train(encoded / "latents24.pt", encoded / "wide", steps=2, batch_size=2, warmup=1, progress=False, model_overrides=SMALL, checkpoint_every=100)
    out = train_dit.assemble(encoded / "wide", encoded / "vae24", encoded / "wide_ckpt", width=W, height=H)
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["in_channels"], config["out_channels"]) == (52, 24)
    engine = RealtimeEngine.from_pretrained(out)
    state = engine.new_session(SessionSpec(prompt="anything", image=np.zeros((H, W, 3), np.uint8), width=W, height=H))
    assert engine.step(state, ConditionQueue([["w"]] * 3).sample(3, 0)).frames.shape == (9, H, W, 3)


def test_a_weighted_run_resumes_with_the_weights_it_started_with(encoded):
    from lingbot_ray.models.tiny_decoder import TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder

    torch.manual_seed(0)
    tiny = save_tiny_autoencoder(TinyAutoencoder(TinyDecoderConfig(encoder_width=1, decoder_widths=(8, 8, 4, 4), linear_skip=True)), encoded / "tiny16")
    weights = train_dit.pixel_weights_for(encoded / "latents.pt", tiny)
    assert weights.shape == (16,) and weights.mean().item() == pytest.approx(1.0) and weights.std() > 0
    common = dict(steps=4, batch_size=2, warmup=2, progress=False, model_overrides=SMALL, checkpoint_every=100)
    straight = train_dit.train(encoded / "latents.pt", encoded / "weighted", channel_weights=weights, **common)
    plain = train_dit.train(encoded / "latents.pt", encoded / "unweighted", **common)
    assert straight["losses"][0] != plain["losses"][0]
    train_dit.train(encoded / "latents.pt", encoded / "weighted_resumed", channel_weights=weights, until=2, **common)
    resumed = train_dit.train(encoded / "latents.pt", encoded / "weighted_resumed", resume=True, **common)  # weights from the run
    assert resumed["losses"] == straight["losses"]


def test_channel_weights_weigh_each_channels_error():
    clean = torch.zeros(1, 2, 1, 4, 4)
    clean[:, 0] = 1.0  # the estimate (zeros) misses channel 0 only
    estimate = torch.zeros_like(clean)
    assert train_dit.x0_loss(estimate, clean).item() == pytest.approx(0.5)
    assert train_dit.x0_loss(estimate, clean, channel_weights=torch.tensor([2.0, 0.0])).item() == pytest.approx(1.0)
    assert train_dit.x0_loss(estimate, clean, channel_weights=torch.tensor([0.0, 2.0])).item() == 0.0
    # the pooled terms are weighed the same way (a constant channel pools to itself)
    assert train_dit.x0_loss(estimate, clean, 4.0, torch.tensor([2.0, 0.0])).item() == pytest.approx(9.0)


def test_pixel_weights_are_what_a_channel_does_to_the_decoded_frames(tmp_path):
    """A decoder whose pixels are a linear skip with gains 2, 1 and 0 per channel: the pixel change of
    a step in channel c is its gain squared, so the weights are (4, 1, 0) over their mean."""
    from lingbot_ray.models.tiny_decoder import TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder

    model = TinyAutoencoder(TinyDecoderConfig(latent_channels=3, encoder_width=1, decoder_widths=(8, 8, 4, 4), linear_skip=True))
    with torch.no_grad():
        last = model.decoder[-1]
        last.weight.zero_()
        last.bias.zero_()
        for conv in (model.skip.first, model.skip.rest):
            direction = torch.randn(conv.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 0.05
            conv.weight.copy_(torch.stack([2 * direction, direction, 0 * direction], dim=1)[:, :, None, None])
            conv.bias.fill_(0.5)
    folder = save_tiny_autoencoder(model, tmp_path / "tiny")
    latents = torch.zeros(2, 3, 3, 2, 3)
    torch.testing.assert_close(train_dit.pixel_channel_weights(folder, latents), torch.tensor([2.4, 0.6, 0.0]), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(train_dit.pixel_channel_weights(folder, latents, share=0.5), torch.tensor([1.7, 0.8, 0.5]), atol=1e-3, rtol=1e-3)


def test_a_truncated_condition_is_trained_on_and_served_as_the_checkpoints(encoded):
    """condition_frames: the clips' conditions are the first frames' latents repeated, the DiT run and
    its checkpoint carry the setting, and the engine's sessions get exactly the trained condition."""
    data = train_dit.encode_dataset(encoded / "data", encoded / "vae", encoded / "latents1.pt", latent_frames=6, batch_size=3,
                                      condition_frames=1, progress=False)
    assert data["meta"]["condition_frames"] == 1
    full = torch.load(encoded / "latents.pt", weights_only=False)["conditions"]
    assert torch.equal(data["conditions"][:, :, 0], full[:, :, 0])  # frame 0 as before, the mask on it only
    assert all(torch.equal(data["conditions"][:, 4:, t], full[:, 4:, 0]) for t in range(1, 6))
    assert data["conditions"][:, :4, 1:].eq(0).all()
    train_dit.train(encoded / "latents1.pt", encoded / "cond1", steps=2, batch_size=2, warmup=1, progress=False, model_overrides=SMALL, checkpoint_every=100)
    out = train_dit.assemble(encoded / "cond1", encoded / "vae", encoded / "cond1_ckpt", width=W, height=H)
    assert json.loads((out / "lingbot_ray.json").read_text())["condition_frames"] == 1
    frames, _, _ = ClipDataset(encoded / "data")[2]
    served = RealtimeEngine.from_pretrained(out).vae.encode_condition(np.asarray(frames[0])).slice(0, 6)
    torch.testing.assert_close(served[0].half().float(), data["conditions"][2].float(), atol=2e-3, rtol=2e-3)


def test_a_run_keeps_the_camera_focal_it_started_with(encoded):
    common = dict(steps=4, batch_size=2, warmup=2, progress=False, model_overrides=SMALL, checkpoint_every=100)
    train_dit.train(encoded / "latents.pt", encoded / "focal", until=2, focal_per_width=0.6, **common)
    train_dit.train(encoded / "latents.pt", encoded / "focal", resume=True, **common)  # default focal asked: the run's kept
    state = torch.load(encoded / "focal" / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["focal_per_width"] == 0.6
    out = train_dit.assemble(encoded / "focal", encoded / "vae", encoded / "focal_ckpt", width=W, height=H)
    assert RealtimeEngine.from_pretrained(out).dit.intrinsics(W, H).fx == pytest.approx(0.6 * W)
    del state["focal_per_width"]  # a run saved before the key existed used the renderer's focal
    torch.save(state, encoded / "focal" / "state.pt")
    out = train_dit.assemble(encoded / "focal", encoded / "vae", encoded / "old_ckpt", width=W, height=H)
    assert RealtimeEngine.from_pretrained(out).dit.intrinsics(W, H).fx == pytest.approx(500 * W / 832)


def test_a_run_keeps_the_width_it_started_with(encoded):
    """``--heads`` sets the DiT's width (FFN 4x); a resumed run rebuilds the model it saved, whatever
    width the resuming call asks for, and continues it exactly."""
    wide = {**SMALL, **train_dit.width_overrides(3)}
    assert (wide["num_attention_heads"], wide["ffn_dim"]) == (3, 3 * 32 * 4)
    common = dict(steps=4, batch_size=2, warmup=2, progress=False, checkpoint_every=100)
    straight = train_dit.train(encoded / "latents.pt", encoded / "wide3", model_overrides=wide, **common)
    train_dit.train(encoded / "latents.pt", encoded / "wide3_resumed", model_overrides=wide, until=2, **common)
    resumed = train_dit.train(encoded / "latents.pt", encoded / "wide3_resumed", model_overrides=SMALL, resume=True, **common)
    assert resumed["losses"] == straight["losses"]
    out = train_dit.assemble(encoded / "wide3_resumed", encoded / "vae", encoded / "wide3_ckpt", width=W, height=H)
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["ffn_dim"]) == (3, 384)
    with pytest.raises(ValueError, match="heads: 0"):
        train_dit.width_overrides(0)


def test_a_diverged_run_stops_and_keeps_its_last_good_checkpoint(encoded, monkeypatch):
    real, calls = train_dit.x0_loss, []

    def diverging(*args, **kwargs):  # finite for 3 steps, then NaN
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) > 3 else 1.0)

    monkeypatch.setattr(train_dit, "x0_loss", diverging)
    common = dict(steps=6, batch_size=2, warmup=2, progress=False, model_overrides=SMALL, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"train DiT: loss nan at step 4: .*lower --lr"):
        train_dit.train(encoded / "latents.pt", encoded / "diverged", **common)
    kept = torch.load(encoded / "diverged" / "state.pt", weights_only=False)
    assert kept["step"] == 2 and all(torch.isfinite(t).all() for t in kept["model"].values())


def test_minutes_plan_the_schedule_from_the_measured_speed(encoded):
    common = dict(batch_size=2, warmup=2, progress=False, model_overrides=SMALL, checkpoint_every=1000)
    summary = train_dit.train(encoded / "latents.pt", encoded / "timed", minutes=0.15, **common)
    state = torch.load(encoded / "timed" / "state.pt", weights_only=False)
    assert state["total"] > train_dit.SPEED_PROBE_STEPS and summary["steps"] == state["step"] <= state["total"]
    assert abs(summary["steps"] - state["total"]) <= 0.25 * state["total"]  # the plan fills the time
    with pytest.raises(ValueError, match="steps or minutes"):
        train_dit.train(encoded / "latents.pt", encoded / "none", **common)


def test_the_camera_probe_sees_shuffled_cameras(encoded):
    data = torch.load(encoded / "latents.pt", weights_only=False)
    model = train_dit.new_world_transformer(0, **SMALL)
    sampler_t = torch.tensor(train_dit.DMDSampler().schedule().timesteps)
    fresh = train_dit.camera_gain(model, data, sampler_t, clips=4)
    assert fresh["gain"] == 0.0 and fresh["gain_coarse"] == 0.0  # camera scale/shift start at zero
    for block in model.blocks:
        torch.nn.init.normal_(block.cam_shift_layer.weight, std=0.5)
    used = train_dit.camera_gain(model, data, sampler_t, clips=4)
    assert used["gain"] != 0.0 and used["own"] != fresh["own"]


def test_silenced_text_attention_changes_no_output_and_refuses_a_live_projection():
    torch.manual_seed(0)
    model = train_dit.new_world_transformer(0, **SMALL).eval()
    for block in model.blocks:  # the rest of the block trained away from its init
        for p in block.attn2.to_q.parameters():
            p.data.normal_()
    hidden, t = torch.randn(2, 36, 6, 4, 6), torch.rand(2, 6) * 1000
    text, plucker = torch.randn(2, 4, model.config.text_dim), torch.randn(2, 384, 6, 4, 6)
    with torch.no_grad():
        before = model(hidden, t, text, plucker).sample
        train_dit.silence_text_attention(model)
        after = model(hidden, t, text, plucker).sample
    assert torch.equal(before, after)
    live = train_dit.new_world_transformer(0, **SMALL)
    torch.nn.init.ones_(live.blocks[0].attn2.to_out[0].bias)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn2\.to_out"):
        train_dit.silence_text_attention(live)
