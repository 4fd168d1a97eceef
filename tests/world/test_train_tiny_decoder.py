"""The tiny decoder stage: training on a few tiny clips (resumable), its report, and the folder the embedded checkpoint ships."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lingbot_ray.checkpoint import checkpoint_folder, read_geometry
from lingbot_ray.models.tiny_decoder import load_tiny_autoencoder
from lingbot_ray.world import train_tiny_decoder
from lingbot_ray.world.dataset import ClipDataset, generate_dataset
from lingbot_ray.world.train_vae import to_pixels
from tests.world.test_train_dit import H, W

CHECKPOINT = checkpoint_folder("embedded:lingbot-world-tiny")
COMMON = dict(clips=2, eval_clips=1, latent_frames=3, widths=(8, 8, 8, 8), batch=1, lr=1e-2, warmup=2, progress=False)


def _stand_in_latents(dataset_dir):
    """Latents that say what the clips show: channels 0-2 the colour of each latent frame's last
    pixel frame, 8x8-averaged, the rest noise (the served DiT's are ``train_decoder.generate_latents``',
    tested beside it)."""
    data = ClipDataset(dataset_dir)
    generator = torch.Generator().manual_seed(0)
    latents = []
    for index in range(len(data)):
        pixels = to_pixels(np.array(data[index][0]))[:, ::4]  # [3, N, H, W]: pixel frames 0, 4, 8, …
        z = 0.5 * torch.randn(16, pixels.shape[1], H // 8, W // 8, generator=generator)
        z[:3] = 3 * F.avg_pool2d(pixels.transpose(0, 1), 8).transpose(0, 1)
        latents.append(z)
    return torch.stack(latents).half()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Stages 1-2 done: two training clips and one held-out clip of one chunk each at W x H, with stand-in latents."""
    root = tmp_path_factory.mktemp("tiny_decoder") / "base"
    for name, count, split in (("", 2, "train"), ("eval_", 1, "eval")):
        generate_dataset(root / f"{name}data", num_clips=count, num_latent_frames=3, width=W, height=H, seed=0, split=split, progress=False)
        torch.save(_stand_in_latents(root / f"{name}data"), root / f"{name}latents.pt")
    return root


def _run_dir(prepared, path):
    """A fresh run folder holding the prepared clips and latents (so the run skips stages 1-2)."""
    import shutil

    shutil.copytree(prepared, path)
    return path


def test_training_lowers_the_loss_resumes_exactly_and_reports_both_decoders(prepared, tmp_path):
    straight = train_tiny_decoder.train(CHECKPOINT, _run_dir(prepared, tmp_path / "straight"), steps=24, **COMMON)
    resumed_dir = _run_dir(prepared, tmp_path / "resumed")
    train_tiny_decoder.train(CHECKPOINT, resumed_dir, steps=24, until=10, **COMMON)
    assert not (resumed_dir / "tiny_decoder").exists()  # an interrupted run leaves no finished decoder
    with pytest.raises(FileExistsError, match="resume"):  # a run is never restarted over its own state by mistake
        train_tiny_decoder.train(CHECKPOINT, resumed_dir, steps=24, **COMMON)
    resumed = train_tiny_decoder.train(CHECKPOINT, resumed_dir, steps=24, resume=True, **COMMON)
    a, b = (torch.load(path.parent / "state.pt", weights_only=False) for path in (straight, resumed))
    assert a["losses"] == b["losses"] and len(a["losses"]) == 24
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert np.mean(a["losses"][-6:]) < 0.8 * np.mean(a["losses"][:6])
    model = load_tiny_autoencoder(straight)
    assert model.config.decoder_widths == (8, 8, 8, 8) and next(model.parameters()).dtype == torch.float32
    torch.testing.assert_close(model.decoder.state_dict(), {k[len("decoder."):]: v.half().float() for k, v in a["model"].items() if k.startswith("decoder.")})
    report = json.loads((straight.parent / "report.json").read_text())
    assert report["frames"] == 9 and 0 < report["psnr_tiny_db"] < 99 and 0 < report["psnr_wan_db"] < 99
    assert set(report["cpu_minutes"]) == {"train", "eval"}  # and the stages 1-2 that ran, none here


def test_fine_tuning_starts_from_the_given_decoder_and_keeps_its_widths(prepared, tmp_path):
    first = train_tiny_decoder.train(CHECKPOINT, _run_dir(prepared, tmp_path / "first"), steps=12, **COMMON)
    settings = {**COMMON, "widths": (4, 4, 4, 4), "lr": 1e-3}  # widths come from the decoder given, not these
    tuned = train_tiny_decoder.train(CHECKPOINT, _run_dir(prepared, tmp_path / "tuned"), steps=2, init=first, edge_weight=0.5, **settings)
    start, end = load_tiny_autoencoder(first), load_tiny_autoencoder(tuned)
    assert end.config.decoder_widths == (8, 8, 8, 8)
    losses = torch.load(tuned.parent / "state.pt", weights_only=False)["losses"]
    first_losses = torch.load(first.parent / "state.pt", weights_only=False)["losses"]
    assert losses[0] < np.mean(first_losses[:3])  # it starts trained
    moved = [not torch.equal(a, b) for a, b in zip(start.decoder.state_dict().values(), end.decoder.state_dict().values())]
    assert any(moved)


def test_the_linear_skip_trains_only_when_asked(prepared, tmp_path):
    shipped = load_tiny_autoencoder(CHECKPOINT / "tiny_decoder")
    assert shipped.config.linear_skip
    settings = {**COMMON, "lr": 1e-3}
    for train_skip, name in ((False, "kept"), (True, "trained")):
        tuned = load_tiny_autoencoder(train_tiny_decoder.train(CHECKPOINT, _run_dir(prepared, tmp_path / name), steps=2,
                                                               init=CHECKPOINT / "tiny_decoder", train_skip=train_skip, **settings))
        skip_moved = [not torch.equal(a, b) for a, b in zip(shipped.skip.state_dict().values(), tuned.skip.state_dict().values())]
        assert any(skip_moved) == train_skip, name
        assert any(not torch.equal(a, b) for a, b in zip(shipped.decoder.state_dict().values(), tuned.decoder.state_dict().values()))


def test_a_run_with_a_patch_discriminator_resumes_exactly_and_it_tells_truth_from_decoded(prepared, tmp_path):
    settings = {**COMMON, "adversarial_weight": 0.1}
    straight = train_tiny_decoder.train(CHECKPOINT, _run_dir(prepared, tmp_path / "straight"), steps=10, **settings)
    parts = _run_dir(prepared, tmp_path / "parts")
    train_tiny_decoder.train(CHECKPOINT, parts, steps=10, until=4, **settings)
    resumed = train_tiny_decoder.train(CHECKPOINT, parts, steps=10, resume=True, **settings)
    a, b = (torch.load(path.parent / "state.pt", weights_only=False) for path in (straight, resumed))
    assert a["losses"] == b["losses"]
    for part in ("model", "critic"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    critic = train_tiny_decoder.PatchDiscriminator()
    critic.load_state_dict(a["critic"])
    data = ClipDataset(prepared / "data")
    real = to_pixels(np.array(data[0][0]))[None]
    decoded = train_tiny_decoder.decode(load_tiny_autoencoder(straight), torch.load(prepared / "latents.pt")[:1].float())
    with torch.no_grad():
        scores = [critic(train_tiny_decoder._frames_of(v, 1)).mean().item() for v in (real, decoded)]
    assert scores[0] > scores[1]


def test_the_shipped_tiny_decoder_decodes_the_checkpoints_latents():
    geometry = read_geometry(CHECKPOINT)
    model = load_tiny_autoencoder(CHECKPOINT / "tiny_decoder")
    config = model.config
    assert (config.latent_channels, config.spatial_scale, config.t_upscale) == (
        geometry.latent_channels, geometry.vae_scale_spatial, geometry.vae_scale_temporal)
    assert sum(p.stat().st_size for p in (CHECKPOINT / "tiny_decoder").iterdir()) < 4 * 2**20  # 1.45 M float16 parameters: 2.9 MB
    with torch.no_grad():
        frames = model.decode_video(torch.zeros(1, 3, geometry.latent_channels, 12, 20))
    assert frames.shape == (1, 9, 3, 96, 160)
