"""The decoder stage on a tiny trained checkpoint: served latents → decoder fine-tuning (resumable)."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from lingbot_ray.control import ConditionQueue
from lingbot_ray.engine import RealtimeEngine, SessionSpec
from lingbot_ray.models.tiny_components import build_tiny_vae
from lingbot_ray.world import train_decoder, train_dit
from lingbot_ray.world.dataset import ClipDataset, generate_dataset
from tests.world.test_train_dit import H, SMALL, W


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    generate_dataset(root / "data", num_clips=3, num_latent_frames=6, width=W, height=H, seed=0, progress=False)
    build_tiny_vae(root / "vae", base_dim=4, num_res_blocks=1, seed=3)
    train_dit.encode_dataset(root / "data", root / "vae", root / "latents.pt", latent_frames=6, progress=False)
    train_dit.train(root / "latents.pt", root / "dit", steps=4, batch_size=2, warmup=2, progress=False, model_overrides=SMALL)
    train_dit.assemble(root / "dit", root / "vae", root / "checkpoint", width=W, height=H)
    return root


def test_generated_latents_are_the_served_sessions(checkpoint):
    latents = train_decoder.generate_latents(checkpoint / "checkpoint", checkpoint / "data", 2, seed=5, progress=False)
    assert latents.shape == (2, 16, 6, H // 8, W // 8) and latents.dtype == torch.float16
    # clip 1 served as a session with the same seed: its frames are the decode of those latents
    engine = RealtimeEngine.from_pretrained(checkpoint / "checkpoint")
    frames, actions, _ = ClipDataset(checkpoint / "data")[1]
    state = engine.new_session(SessionSpec(prompt="a procedural world", image=np.array(frames[0]), width=W, height=H, seed=6))
    queue = ConditionQueue([list(a) for a in actions])
    served = np.concatenate([engine.step(state, queue.sample(3, c)).frames for c in range(2)])
    replay = engine.new_session(SessionSpec(prompt="x", image=np.array(frames[0]), width=W, height=H, seed=0))
    decoded = np.concatenate([engine.vae.decode(replay.vae, latents[1:2, :, 3 * c : 3 * c + 3].float()) for c in range(2)])
    assert served.shape == (21, H, W, 3)
    assert np.abs(served.astype(int) - decoded.astype(int)).max() <= 1  # latents stored in fp16


def test_fine_tuning_moves_only_the_decoder_lowers_its_loss_and_resumes_exactly(checkpoint):
    common = dict(clips=3, lr=3e-3, batch=2, frames=4, warmup=2, progress=False)
    straight = train_decoder.train(checkpoint / "checkpoint", checkpoint / "data", checkpoint / "straight", steps=6, **common)
    train_decoder.train(checkpoint / "checkpoint", checkpoint / "data", checkpoint / "resumed", steps=6, until=3, **common)
    assert not (checkpoint / "resumed" / "vae").exists()  # an interrupted run leaves no finished VAE
    resumed = train_decoder.train(checkpoint / "checkpoint", checkpoint / "data", checkpoint / "resumed", steps=6, resume=True, **common)
    assert "_name_or_path" not in (straight / "config.json").read_text()  # no machine path in the folder
    a, b = (AutoencoderKLWan.from_pretrained(str(path)).state_dict() for path in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = AutoencoderKLWan.from_pretrained(str(checkpoint / "checkpoint" / "vae")).state_dict()
    for name, tensor in a.items():  # the encoder (and so the latent space) is untouched; the decoder moved
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(tensor, before[name]), name
    assert any(not torch.equal(a[k], before[k]) for k in a if k.startswith("decoder."))
    assert len(torch.load(checkpoint / "straight" / "state.pt", weights_only=False)["losses"]) == 6
    many = train_decoder.train(checkpoint / "checkpoint", checkpoint / "data", checkpoint / "many", steps=40, **common)
    losses = torch.load(many.parent / "state.pt", weights_only=False)["losses"]
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
