"""The recipe's command, stage by stage, on two clips and a few steps of each stage: the DiT stage, the
decoder stage and the last stage (the DiT fine-tuned with its loss weighed by the served decoder's
pixels, in two rounds of its schedule) chain into a checkpoint that serves, and ``--resume`` rebuilds
the same checkpoint."""

import functools
import shutil

import numpy as np
import pytest
import torch

from lingbot_ray.control import ConditionQueue
from lingbot_ray.engine import RealtimeEngine, SessionSpec
from lingbot_ray.models.loading import load_transformer
from lingbot_ray.models.tiny_components import build_tiny_vae
from lingbot_ray.models.tiny_decoder import TinyAutoencoder, TinyDecoderConfig, save_tiny_autoencoder
from lingbot_ray.world import train_dit, train_tiny_decoder, train_world
from lingbot_ray.world.dataset import generate_dataset

# a DiT of one 32-channel head; a tiny decoder of the recipe's layout, narrower
STAGES = ["--dit-steps", "3", "--dit-heads", "1", "--tiny-decoder-steps", "2", "--tiny-decoder-clips", "1", "--decoder-steps", "0"]
ARGS = [*STAGES, "--dit-tune-steps", "3", "--until", "tune"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A run folder whose data and VAE stages are done (small stand-ins), so the command starts at encode."""
    out = tmp_path_factory.mktemp("world")
    generate_dataset(out / "data", num_clips=2, num_latent_frames=train_dit.TRAIN_LATENT_FRAMES, width=160, height=96, seed=0, progress=False)
    build_tiny_vae(out / "vae_run" / "vae", base_dim=4, num_res_blocks=1, seed=3)
    torch.manual_seed(0)
    save_tiny_autoencoder(TinyAutoencoder(TinyDecoderConfig(encoder_width=1, decoder_widths=(8, 8, 4, 4), linear_skip=True)),
                          out / "vae_run" / "tiny_decoder")
    with pytest.MonkeyPatch.context() as patch:  # one held-out clip for the tiny decoder's eval, not 16
        patch.setattr(train_tiny_decoder, "train", functools.partial(train_tiny_decoder.train, eval_clips=1))
        assert train_world.main([str(out), *ARGS]) == 0
    return out


def weights(folder):
    return load_transformer(folder, dtype=torch.float32).state_dict()


def copy_run(recipe, out, names):
    """The named outputs of the recipe's run folder, copied into ``out`` (a run to go on from there)."""
    for name in names:
        (shutil.copytree if (recipe / name).is_dir() else shutil.copy)(recipe / name, out / name)


def test_the_last_stage_fine_tunes_the_dit_the_decoders_were_trained_on(recipe):
    tuned = torch.load(recipe / "dit_tune_run" / "state.pt", weights_only=False)
    assert tuned["step"] == 3
    # its loss is weighed by what each channel does to the fine-tuned tiny decoder's pixels
    torch.testing.assert_close(tuned["channel_weights"], train_dit.pixel_weights_for(recipe / "latents.pt", recipe / "tiny_decoder_run" / "tiny_decoder"))
    # it starts from the DiT stage's weights: 3 warm-up steps at a small rate move them only a little
    trained = torch.load(recipe / "dit_run" / "state.pt", weights_only=False)["model"]
    moved = max((tuned["model"][k] - v).abs().max().item() for k, v in trained.items())
    assert 0 < moved < 1e-3
    # the second round runs the same schedule from the first round's weights, with the next seed
    second = torch.load(recipe / "dit_tune_run_2" / "state.pt", weights_only=False)
    assert second["step"] == 3 and second["fine_tuned"]
    torch.testing.assert_close(second["channel_weights"], tuned["channel_weights"])
    moved = max((second["model"][k] - v).abs().max().item() for k, v in tuned["model"].items())
    assert 0 < moved < 1e-3
    assert not torch.equal(second["generator"], tuned["generator"])
    # the checkpoint serves the last round's DiT with the fine-tuned decoder
    served = weights(recipe / "checkpoint")
    assert all(torch.equal(served[k], v) for k, v in second["model"].items())
    engine = RealtimeEngine.from_pretrained(recipe / "checkpoint")
    state = engine.new_session(SessionSpec(prompt="anything", image=np.zeros((96, 160, 3), np.uint8), width=160, height=96))
    assert engine.step(state, ConditionQueue([["w"]] * 3).sample(3, 0)).frames.shape == (9, 96, 160, 3)


def test_resuming_a_finished_run_rebuilds_the_same_checkpoint(recipe):
    before = weights(recipe / "checkpoint")
    tiny = (recipe / "checkpoint" / "tiny_decoder" / "model.safetensors").read_bytes()
    assert train_world.main([str(recipe), *ARGS, "--resume"]) == 0
    after = weights(recipe / "checkpoint")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (recipe / "checkpoint" / "tiny_decoder" / "model.safetensors").read_bytes() == tiny


def test_one_round_serves_the_first_rounds_weights(recipe, tmp_path):
    """``--dit-tune-rounds 1``: the checkpoint is the first round's (the recipe before the second)."""
    copy_run(recipe, tmp_path, ("data", "vae_run", "latents.pt", "dit_run", "tiny_decoder_run", "dit_tune_run"))
    assert train_world.main([str(tmp_path), *ARGS, "--dit-tune-rounds", "1", "--resume"]) == 0
    served = weights(tmp_path / "checkpoint")
    first = torch.load(recipe / "dit_tune_run" / "state.pt", weights_only=False)["model"]
    assert not (tmp_path / "dit_tune_run_2").exists()
    assert all(torch.equal(served[k], v) for k, v in first.items())


def test_no_tuning_serves_the_dit_stages_weights(recipe, tmp_path):
    """``--dit-tune-steps 0``: the checkpoint is the DiT stage's (the recipe before the last stage)."""
    copy_run(recipe, tmp_path, ("data", "vae_run", "latents.pt", "dit_run", "tiny_decoder_run"))
    assert train_world.main([str(tmp_path), *STAGES, "--dit-tune-steps", "0", "--until", "tune", "--resume"]) == 0
    served = weights(tmp_path / "checkpoint")
    trained = torch.load(recipe / "dit_run" / "state.pt", weights_only=False)["model"]
    assert not (tmp_path / "dit_tune_run").exists()
    assert all(torch.equal(served[k], v) for k, v in trained.items())
