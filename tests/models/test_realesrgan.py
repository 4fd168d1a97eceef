"""Real-ESRGAN: architecture from keys, strict loading in every layout, nearest identity, tiling, clamping."""

import pytest
import torch
import torch.nn.functional as F

from lingbot_ray.models.realesrgan import RRDBNet, SRVGGNetCompact, load_realesrgan
from tests.models.weights import save_realesrgan

LAYOUTS = ("params_ema", "params", None)


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "srvgg":
        return SRVGGNetCompact(upscale=4, num_feat=8, num_conv=2).eval()
    if kind == "rrdb_x4":
        return RRDBNet(scale=4, num_feat=8, num_block=2, num_grow_ch=4).eval()
    if kind == "rrdb_x4_1":
        return RRDBNet(scale=4, num_feat=8, num_block=1, num_grow_ch=4).eval()
    if kind == "rrdb_x2":
        return RRDBNet(scale=2, num_feat=8, num_block=1, num_grow_ch=4).eval()
    return RRDBNet(scale=1, num_feat=8, num_block=1, num_grow_ch=4).eval()


def _frames(seed, b=2, h=20, w=28):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["srvgg", "rrdb_x4", "rrdb_x2", "rrdb_x1"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_every_layout(tmp_path, kind, layout):
    model = _tiny(kind)
    path = tmp_path / "w.pth"
    save_realesrgan(model, path, key=layout)
    raw = torch.load(path, weights_only=True)
    assert (layout in raw) if layout else ("body.0.weight" in raw or "conv_first.weight" in raw)
    loaded = load_realesrgan(path)
    assert type(loaded) is type(model)
    assert loaded.native_scale == model.native_scale
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _frames(1, b=1, h=12, w=16)
    torch.testing.assert_close(loaded.upscale(x), model.upscale(x), atol=0, rtol=0)


def test_params_ema_preferred_over_params():
    ema, plain = _tiny("srvgg"), SRVGGNetCompact(upscale=4, num_feat=8, num_conv=2)
    loaded = load_realesrgan({"params": plain.state_dict(), "params_ema": ema.state_dict()})
    assert torch.equal(loaded.body[0].weight, ema.body[0].weight)


@pytest.mark.parametrize("num_conv, params", [(16, 621_424), (32, 1_213_296)])
def test_published_compact_shapes(num_conv, params):
    # realesr-animevideov3 (16 convs, 0.62 M) and realesr-general-x4v3 (32 convs, 1.21 M).
    sd = SRVGGNetCompact(upscale=4, num_feat=64, num_conv=num_conv).state_dict()
    assert tuple(sd["body.1.weight"].shape) == (64,)  # PReLU
    assert tuple(sd[f"body.{2 * num_conv + 2}.weight"].shape) == (48, 64, 3, 3)
    model = load_realesrgan({"params": sd})
    assert isinstance(model, SRVGGNetCompact) and model.native_scale == 4
    assert sum(p.numel() for p in model.parameters()) == params


def test_rrdb_key_names_and_unshuffle_width():
    sd = RRDBNet(scale=2, num_feat=8, num_block=2, num_grow_ch=4).state_dict()
    for key in ("conv_first.weight", "body.1.rdb3.conv5.weight", "conv_body.weight", "conv_up1.weight",
                "conv_up2.weight", "conv_hr.weight", "conv_last.weight"):
        assert key in sd, key
    assert sd["conv_first.weight"].shape[1] == 12  # x2plus: pixel-unshuffled by 2
    assert tuple(sd["body.0.rdb1.conv5.weight"].shape) == (8, 8 + 4 * 4, 3, 3)


def test_zeroed_last_conv_is_nearest_upscale():
    model = _tiny("srvgg")
    with torch.no_grad():
        model.body[-1].weight.zero_()
        model.body[-1].bias.zero_()
    model = load_realesrgan({"params_ema": model.state_dict()})
    x = _frames(2)
    expected = F.interpolate(x, scale_factor=4, mode="nearest")
    torch.testing.assert_close(model.upscale(x), expected, atol=0, rtol=0)
    torch.testing.assert_close(model.upscale(x, tile=8, tile_pad=2), expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind, tile, tile_pad, h, w", [
    ("srvgg", 8, 6, 20, 28),  # 4 convs at input resolution: 4 px of context suffice
    ("rrdb_x4_1", 16, 20, 24, 64),  # 17 convs at input resolution + 4 at ×2/×4: < 19 px
    ("rrdb_x2", 16, 40, 24, 112),  # 17 convs after a /2 unshuffle: < 38 px
])
def test_tiled_equals_untiled(kind, tile, tile_pad, h, w):
    # tile_pad covers the receptive field while tile + 2·pad < W, so pieces see only part of the frame.
    model = _tiny(kind)
    assert tile + 2 * tile_pad < w
    x = _frames(3, b=1, h=h, w=w)
    untiled = model.upscale(x)
    tiled = model.upscale(x, tile=tile, tile_pad=tile_pad)
    assert tiled.shape == untiled.shape == (1, 3, h * model.native_scale, w * model.native_scale)
    torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=0)
    # With too little context the pieces differ: proves the test exercises tiling.
    assert not torch.allclose(model.upscale(x, tile=tile, tile_pad=0), untiled, atol=1e-5)


def test_output_is_clamped():
    model = _tiny("srvgg")
    with torch.no_grad():
        model.body[-1].bias.fill_(5.0)
    out = model.upscale(_frames(4))
    assert out.max().item() == 1.0 and out.min().item() >= 0.0
    assert model(_frames(4)).max().item() > 1.0


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_requested_scale_resizes_native_output(scale):
    model = _tiny("srvgg")
    x = _frames(5, h=12, w=18)
    out = model.upscale(x, scale)
    assert out.shape == (2, 3, 12 * scale, 18 * scale)
    native = model(x)
    if scale == 4:
        torch.testing.assert_close(out, native.clamp(0, 1), atol=0, rtol=0)
    else:
        expected = F.interpolate(native, size=(12 * scale, 18 * scale), mode="bicubic", align_corners=False,
                                 antialias=True).clamp(0, 1)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_x2_odd_size_is_padded_and_cropped():
    model = _tiny("rrdb_x2")
    out = model.upscale(_frames(6, b=1, h=11, w=13))
    assert out.shape == (1, 3, 22, 26)


def test_missing_unexpected_and_mismatched_keys_raise():
    sd = _tiny("rrdb_x4").state_dict()
    missing = {k: v for k, v in sd.items() if k != "body.1.rdb2.conv3.bias"}
    with pytest.raises(ValueError, match=r"body\.1\.rdb2\.conv3\.bias"):
        load_realesrgan({"params_ema": missing})
    with pytest.raises(ValueError, match=r"conv_extra\.weight"):
        load_realesrgan(dict(sd, **{"conv_extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"conv_hr\.bias"):
        load_realesrgan(dict(sd, **{"conv_hr.bias": torch.zeros(3)}))
    vgg = _tiny("srvgg").state_dict()
    del vgg["body.3.weight"]  # a PReLU slope
    with pytest.raises(ValueError, match=r"body\.3\.weight"):
        load_realesrgan(vgg)
    with pytest.raises(ValueError, match="neither RRDBNet"):
        load_realesrgan({"encoder.weight": torch.zeros(1)})


def test_bad_arguments_raise():
    model = _tiny("srvgg")
    with pytest.raises(ValueError, match="frames.shape"):
        model.upscale(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="scale=0"):
        model.upscale(_frames(7), 0)
    with pytest.raises(ValueError, match="tile=0"):
        model.upscale(_frames(7), tile=0)
    with pytest.raises(ValueError, match="key='ema'"):
        save_realesrgan(model, "unused.pth", key="ema")
