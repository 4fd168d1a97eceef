"""Teacher forcing == the engine's cached inference path, block for block (with eviction)."""

import pytest
import torch

from lingbot_ray.world.teacher_forcing import teacher_forced_flow, teacher_forcing_mask
from tests.models.test_transformer import BLOCK, LATENT_H, LATENT_W, TOKENS, make_model

CAMERA = 384


def test_mask_layout():
    mask = teacher_forcing_mask(6, 3, sink_frames=0, window_frames=None)
    clean, noisy = slice(0, 6), slice(6, 12)
    assert mask[clean, noisy].sum() == 0  # the clean history never sees noise
    assert mask[6:9, 0:3].sum() == 0 and mask[6:9, 6:9].all()  # block 0 noisy: only itself
    assert mask[9:12, 0:3].all() and mask[9:12, 3:6].sum() == 0  # block 1 noisy: clean block 0, not clean block 1
    assert mask[9:12, 9:12].all() and mask[9:12, 6:9].sum() == 0  # nor block 0's noisy copy


@torch.no_grad()
@pytest.mark.parametrize("sink,window", [(3, 12), (3, 9), (0, 6)])
def test_teacher_forcing_equals_cached_inference(sink, window):
    model = make_model()
    frames, batch = 12, 2
    gen = torch.Generator().manual_seed(5)
    clean = torch.randn(batch, 16, frames, LATENT_H, LATENT_W, generator=gen)
    noisy = torch.randn(batch, 16, frames, LATENT_H, LATENT_W, generator=gen)
    condition = torch.randn(batch, 20, frames, LATENT_H, LATENT_W, generator=gen)
    text = torch.randn(batch, 8, 32, generator=gen)
    plucker = torch.randn(batch, CAMERA, frames, LATENT_H, LATENT_W, generator=gen)
    block_t = torch.tensor([[1000.0, 978.7, 947.2, 825.4], [825.4, 1000.0, 978.7, 947.2]])
    frame_t = block_t.repeat_interleave(BLOCK, dim=1)

    trained = teacher_forced_flow(model, clean, noisy, frame_t, condition, text, plucker, sink_frames=sink, window_frames=window)

    cache = model.new_kv_cache(batch_size=batch, tokens_per_frame=TOKENS, sink_frames=sink, window_frames=window)
    text_cache = model.build_text_cache(text)
    expected = []
    for b, start in enumerate(range(0, frames, BLOCK)):
        part = slice(start, start + BLOCK)
        camera = model.build_camera_cache(plucker[:, :, part])
        kwargs = dict(kv_cache=cache, start_frame=start, text_cache=text_cache, camera_cache=camera)
        expected.append(model.forward_block(torch.cat([noisy[:, :, part], condition[:, :, part]], 1), block_t[:, b], update_cache=False, **kwargs))
        model.forward_block(torch.cat([clean[:, :, part], condition[:, :, part]], 1), torch.zeros(batch), update_cache=True, **kwargs)
    torch.testing.assert_close(trained, torch.cat(expected, dim=2), atol=2e-5, rtol=0)
