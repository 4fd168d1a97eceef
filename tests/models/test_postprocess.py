"""Per-session post-processing: chunked stream == whole video, frame counts, boundary pairing, order."""

import copy

import numpy as np
import pytest
import torch

from lingbot_ray.models.postprocess import PostProcessor, PostProcessSession, output_fps, output_frame_count
from lingbot_ray.models.realesrgan import SRVGGNetCompact
from lingbot_ray.models.rife import IFNet

H, W = 32, 32  # 4.22.lite pads to multiples of 32: no wasted work


@pytest.fixture(scope="module")
def rife():
    torch.manual_seed(0)
    return IFNet("4.22.lite").eval()


@pytest.fixture(scope="module")
def mean_rife(rife):
    # Zeroed lastconv: every interpolated frame is the mean of its two neighbours.
    model = copy.deepcopy(rife)
    with torch.no_grad():
        for block in model.blocks():
            block.lastconv[0].weight.zero_()
            block.lastconv[0].bias.zero_()
    return model


@pytest.fixture(scope="module")
def nearest_esrgan():
    torch.manual_seed(0)
    model = SRVGGNetCompact(upscale=4, num_feat=8, num_conv=2).eval()
    with torch.no_grad():
        model.body[-1].weight.zero_()
        model.body[-1].bias.zero_()
    return model


def _video(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, H, W, 3), dtype=np.uint8)


@pytest.mark.parametrize("exp", [1, 2])
def test_chunked_stream_equals_whole_video(rife, exp):
    video = _video(7)
    proc = PostProcessor(rife=rife)
    whole = proc.process(proc.new_session(), video, exp=exp)
    session = proc.new_session()
    parts = [proc.process(session, chunk, exp=exp) for chunk in (video[:3], video[3:5], video[5:])]
    streamed = np.concatenate(parts)
    assert streamed.shape == whole.shape == (6 * 2**exp + 1, H, W, 3)
    # Batch composition may change float rounding in the last bit: allow one uint8 step.
    assert np.abs(streamed.astype(int) - whole.astype(int)).max() <= 1
    # Inputs pass through unchanged every 2^exp frames.
    np.testing.assert_array_equal(streamed[:: 2**exp], video)


@pytest.mark.parametrize("exp", [0, 1, 3])
@pytest.mark.parametrize("n", [1, 3])
def test_frame_counts(rife, exp, n):
    proc = PostProcessor(rife=rife)
    session = proc.new_session()
    first = proc.process(session, _video(n, 1), exp=exp)
    later = proc.process(session, _video(n, 2), exp=exp)
    assert len(first) == output_frame_count(n, exp, has_previous=False) == (n - 1) * 2**exp + 1
    assert len(later) == output_frame_count(n, exp, has_previous=True) == n * 2**exp
    assert output_fps(16.0, exp) == 16.0 * 2**exp


def test_first_frame_of_later_chunk_pairs_with_previous_last(mean_rife):
    proc = PostProcessor(rife=mean_rife)
    session = proc.new_session()
    a, b = _video(3, 3), _video(3, 4)
    proc.process(session, a, exp=1)
    out = proc.process(session, b, exp=1)
    expected = (a[-1].astype(float) + b[0].astype(float)) / 2
    assert np.abs(out[0].astype(float) - expected).max() <= 1.0
    np.testing.assert_array_equal(out[1], b[0])
    # After reset nothing is paired backwards.
    session.reset()
    again = proc.process(session, b, exp=1)
    np.testing.assert_array_equal(again[0], b[0])
    assert len(again) == 5


def test_interpolation_then_upscaling(mean_rife, nearest_esrgan):
    proc = PostProcessor(rife=mean_rife, esrgan=nearest_esrgan)
    video = _video(3, 5)
    out = proc.process(proc.new_session(), video, exp=1, upscale=4)
    small = PostProcessor(rife=mean_rife).process(proc.new_session(), video, exp=1)
    assert out.shape == (5, 4 * H, 4 * W, 3)
    # Nearest ×4 of the interpolated frames: upscaling saw every output frame, interpolated ones included.
    np.testing.assert_array_equal(out, small.repeat(4, axis=1).repeat(4, axis=2))


def test_max_batch_splits_without_changing_results(rife, nearest_esrgan):
    video = _video(3, 9)
    whole = PostProcessor(rife=rife, esrgan=nearest_esrgan).process(PostProcessSession(), video, exp=2, upscale=4)
    split = PostProcessor(rife=rife, esrgan=nearest_esrgan, max_batch=2).process(
        PostProcessSession(), video, exp=2, upscale=4
    )
    assert split.shape == whole.shape == (9, 4 * H, 4 * W, 3)
    assert np.abs(split.astype(int) - whole.astype(int)).max() <= 1


def test_upscale_other_than_native_and_tiling(nearest_esrgan):
    proc = PostProcessor(esrgan=nearest_esrgan, tile=16, tile_pad=4)
    out = proc.process(proc.new_session(), _video(2, 6), upscale=2)
    assert out.shape == (2, 2 * H, 2 * W, 3)


def test_state_survives_a_failed_call(rife):
    proc = PostProcessor(rife=rife)
    session = PostProcessSession()
    proc.process(session, _video(2, 7), exp=1)
    kept = session.previous_last.clone()
    with pytest.raises(ValueError, match="upscale=2"):
        proc.process(session, _video(2, 8), exp=1, upscale=2)
    assert torch.equal(session.previous_last, kept) and session.chunks == 1


def test_bad_input_raises(rife):
    proc = PostProcessor(rife=rife)
    session = proc.new_session()
    with pytest.raises(ValueError, match="float32"):
        proc.process(session, _video(2).astype(np.float32), exp=1)
    with pytest.raises(ValueError, match="exp=5"):
        proc.process(session, _video(2), exp=5)
    with pytest.raises(ValueError, match="exp=1"):
        PostProcessor().process(session, _video(2), exp=1)
    with pytest.raises(ValueError, match="float64"):
        PostProcessor(rife=rife, esrgan=SRVGGNetCompact(num_feat=4, num_conv=1).double())
    with pytest.raises(ValueError, match="max_batch=0"):
        PostProcessor(rife=rife, max_batch=0)
    proc.process(session, _video(2), exp=1)
    with pytest.raises(ValueError, match="reset the session"):
        proc.process(session, np.zeros((2, H + 16, W, 3), np.uint8), exp=1)
