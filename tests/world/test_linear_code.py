"""The linear block code (the VAE's teacher): the causal latent grid, unit-spread channels, a
projection that is exact on data it can represent, and the tiny decoder's linear skip started at it."""

import pytest
import torch

from lingbot_ray.models.tiny_decoder import LinearSkip
from lingbot_ray.world import train_vae as tv
from lingbot_ray.world.dataset import make_clip
from lingbot_ray.world.linear_code import LinearBlockCode, blend_with_uniform, blocks, unblocks


def _clips(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Rendered 32x24 clips of 3 latent frames (9 frames), [3, T, H, W] in [-1, 1]."""
    moves = [[], ["w"], ["l"]]
    return [tv.to_pixels(make_clip(seed + i, moves, 32, 24).frames) for i in range(count)]


@pytest.fixture(scope="module")
def code() -> LinearBlockCode:
    return LinearBlockCode().fit(_clips(12))


def test_blocks_and_unblocks_are_inverse():
    x = torch.randn(2, 3, 4, 16, 24)
    b = blocks(x)
    assert b.shape == (2, 2, 3, 4 * 8 * 8 * 3)
    assert torch.equal(b[1, 1, 2].reshape(4, 8, 8, 3), x[1, :, :, 8:16, 16:24].permute(1, 2, 3, 0))
    assert torch.equal(unblocks(b, 4), x)


def test_the_code_lies_on_the_causal_encoders_grid(code):
    clip = _clips(1, seed=100)[0][None]
    assert code.encode(clip).shape == (1, 16, 3, 3, 4)  # frame 0 alone, then 4 frames per latent frame
    assert code.encode(clip[:, :, 1:], fresh=False).shape == (1, 16, 2, 3, 4)
    vae = tv.build_vae(2, 1)
    with torch.no_grad():
        mu, _, _ = tv.encode_moments(vae, clip)
    assert mu.shape == code.encode(clip).shape
    with pytest.raises(ValueError, match="4k"):
        code.encode(clip[:, :, :4])


def test_every_channel_has_unit_spread_on_the_fitted_clips(code):
    clips = torch.stack(_clips(12))
    z = code.encode(clips)
    first, rest = z[:, :, 0], z[:, :, 1:]
    torch.testing.assert_close(rest.transpose(0, 1).reshape(16, -1).std(dim=1), torch.ones(16), atol=0.05, rtol=0)
    # frame 0's basis was fitted on every frame as a single-frame block, so its own frames differ a little
    assert ((first.transpose(0, 1).reshape(16, -1).std(dim=1) - 1).abs() < 0.5).all()


def test_decode_is_a_projection_and_keeps_most_of_the_picture(code):
    clip = _clips(1, seed=200)[0][None]
    z = code.encode(clip)
    recon = code.decode(z)
    torch.testing.assert_close(code.encode(recon), z, atol=1e-4, rtol=0)  # decoding then coding changes nothing
    assert tv.psnr(recon, clip) > 20  # a held-out world: the 16 components carry the picture


def test_a_wider_code_keeps_more_of_the_picture(code):
    wide = LinearBlockCode(48).fit(_clips(12))
    clip = _clips(1, seed=200)[0][None]
    z = wide.encode(clip)
    assert z.shape[1] == 48
    torch.testing.assert_close(wide.encode(wide.decode(z)), z, atol=1e-4, rtol=0)
    assert tv.psnr(wide.decode(z), clip) > tv.psnr(code.decode(code.encode(clip)), clip) + 1


def test_blocks_the_code_can_hold_are_reconstructed_exactly():
    """Clips whose every 8x8 block is one colour (3 values per block) are inside 16 components."""
    g = torch.Generator().manual_seed(0)
    clips = [torch.rand(3, 9, 3, 4, generator=g).mul(2).sub(1).repeat_interleave(8, -1).repeat_interleave(8, -2) for _ in range(6)]
    code = LinearBlockCode().fit(clips)
    for clip in clips[:2]:
        torch.testing.assert_close(code.decode(code.encode(clip[None])), clip[None], atol=1e-4, rtol=0)


def test_fitting_on_too_few_blocks_is_refused():
    with pytest.raises(ValueError, match="blocks"):
        LinearBlockCode().fit([torch.zeros(3, 1, 8, 8)])


def test_a_linear_skip_started_at_the_code_decodes_as_the_code(code):
    skip = LinearSkip(16, 4, 8)
    with torch.no_grad():
        for name in ("first", "rest"):
            weight, bias = code.skip_weights(name)
            getattr(skip, name).weight.copy_(weight[:, :, None, None])
            getattr(skip, name).bias.copy_(bias)
        clip = _clips(1, seed=300)[0][None]
        z = code.encode(clip)
        frames = skip(z.movedim(2, 1), fresh=True)[:, 3:]  # the first latent frame's first 3 frames are dropped
        torch.testing.assert_close(frames.movedim(1, 2) * 2 - 1, code.decode(z), atol=1e-5, rtol=0)
        z_next = code.encode(clip[:, :, 1:], fresh=False)
        later = skip(z_next.movedim(2, 1), fresh=False)
        torch.testing.assert_close(later.movedim(1, 2) * 2 - 1, code.decode(z_next, fresh=False), atol=1e-5, rtol=0)


def test_pixel_weights_are_what_a_code_error_costs_in_pixels(code):
    """An error of one unit in channel c of a latent frame changes the linear decode's pixels by the
    component's variance (summed squares): the weights are those, with mean 1 per basis."""
    clip = _clips(1, seed=400)[0][None]
    z = code.encode(clip)
    weights = code.pixel_weights(z.shape[2])
    assert weights.shape == (16, 3)
    torch.testing.assert_close(weights.mean(dim=0), torch.ones(3), atol=1e-5, rtol=0)
    base = code.decode(z)
    for frame, pixels in enumerate((slice(0, 1), slice(1, 5))):  # the single-frame block, then a four-frame one
        cost = []
        for channel in range(16):
            moved = z.clone()
            moved[:, channel, frame, 1, 2] += 1.0  # one latent: one block
            cost.append(float((code.decode(moved) - base)[:, :, pixels].square().sum()))
        cost = torch.tensor(cost)
        torch.testing.assert_close(cost / cost.mean(), weights[:, frame], atol=1e-4, rtol=1e-4)
    assert weights[0, 1] > 5 * weights[-1, 1]  # the first components carry the picture
    torch.testing.assert_close(weights[:, 2], weights[:, 1])  # every later latent frame: the four-frame basis
    torch.testing.assert_close(code.pixel_weights(3, share=0.0), torch.ones(16, 3))
    torch.testing.assert_close(code.pixel_weights(2, fresh=False), weights[:, 1:])
    with pytest.raises(ValueError, match="share=1.5"):
        blend_with_uniform(torch.ones(4), 1.5)
