"""The faster Wan VAE RMS norm: same outputs as diffusers' own, same weights and files."""

import copy

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

from lingbot_ray.models.tiny_components import build_tiny_vae
from lingbot_ray.models.vae_streaming import StreamingWanVAE
from lingbot_ray.models.wan_norm import ChannelRMSNorm, use_fast_norms


def _norm_classes(module):
    return {type(m) for m in module.modules() if isinstance(m, WanRMS_norm)}


def test_norm_matches_diffusers_for_both_layouts_dtypes_and_zero_vectors():
    g = torch.Generator().manual_seed(0)
    for channel_first, shape in ((True, (2, 8, 3, 5, 7)), (False, (2, 5, 8))):
        norm = WanRMS_norm(8, channel_first=channel_first, images=False, bias=True)
        with torch.no_grad():
            norm.gamma.copy_(torch.randn(norm.gamma.shape, generator=g))
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=g))
        fast = use_fast_norms(copy.deepcopy(norm))
        assert type(fast) is ChannelRMSNorm
        x = torch.randn(shape, generator=g)
        x[0, ..., 0] = 0.0  # all-zero channel vectors: both give the bias, no NaN
        torch.testing.assert_close(fast(x), norm(x), rtol=1e-5, atol=1e-6)
        half = x.bfloat16()
        torch.testing.assert_close(fast(half), norm(half), rtol=0, atol=0)
        assert fast(half).dtype == norm(half).dtype


def test_fast_vae_encodes_and_decodes_as_diffusers_and_saves_the_same_files(tmp_path):
    build_tiny_vae(tmp_path / "vae", base_dim=8, seed=0)
    reference = AutoencoderKLWan.from_pretrained(tmp_path / "vae").eval()
    assert _norm_classes(reference) == {WanRMS_norm}
    fast = use_fast_norms(copy.deepcopy(reference))
    assert _norm_classes(fast) == {ChannelRMSNorm}

    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        latents_ref = reference.encode(video).latent_dist.mean
        latents_fast = fast.encode(video).latent_dist.mean
        torch.testing.assert_close(latents_fast, latents_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.decode(latents_ref).sample, reference.decode(latents_ref).sample, rtol=1e-4, atol=1e-5)

    assert fast.state_dict().keys() == reference.state_dict().keys()
    fast.save_pretrained(tmp_path / "saved")
    reloaded = AutoencoderKLWan.from_pretrained(tmp_path / "saved")
    assert _norm_classes(reloaded) == {WanRMS_norm}  # the files know nothing of the swap
    for key, value in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_streaming_vae_uses_the_fast_norms(tmp_path):
    build_tiny_vae(tmp_path / "vae", base_dim=8, seed=0)
    streaming = StreamingWanVAE.from_pretrained(tmp_path)
    assert _norm_classes(streaming.vae) == {ChannelRMSNorm}
