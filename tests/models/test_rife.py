"""RIFE v4 IFNet: mean-of-inputs identity, a hand-built flow, padding, and flownet.pkl loading."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lingbot_ray.models.rife import RIFE_CONFIGS, IFNet, detect_rife_version, load_rife
from tests.models.weights import save_rife

VERSIONS = ("4.22.lite", "4.25")  # 4.26 shares 4.25's tensor layout


@pytest.fixture(scope="module")
def models():
    # Random init of ~5 M parameters dominates these tests: build each version once.
    torch.manual_seed(0)
    return {v: IFNet(v).eval() for v in VERSIONS}


@pytest.fixture(params=VERSIONS)
def random_model(request, models):
    return models[request.param]


def _frames(seed, b=2, h=48, w=80):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g), torch.rand(b, 3, h, w, generator=g)


def _zero_last(model):
    with torch.no_grad():
        for block in model.blocks():
            block.lastconv[0].weight.zero_()
            block.lastconv[0].bias.zero_()
    return model


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_zeroed_lastconv_gives_mean_of_inputs(models, version, scale):
    # No refinement net in 4.2x: zero flow and a zero mask logit leave 0.5·img0 + 0.5·img1.
    model = _zero_last(copy.deepcopy(models[version]))
    a, b = _frames(1, b=1, h=32, w=48)
    out = model.interpolate(a, b, timestep=0.3, scale=scale)
    torch.testing.assert_close(out, (a + b) / 2, atol=2e-5, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_constant_flow_shifts_img0(models, version, scale):
    # Block 0 predicts a constant flow t→0 of +2 px in x (its output is in block pixels, ×divisor);
    # the last block's mask logit of +40 selects the warped img0, so out[x] = img0[x + 2].
    model = _zero_last(copy.deepcopy(models[version]))
    shift = 2.0
    d0 = model.config.divisors[0] / scale
    with torch.no_grad():
        # lastconv outputs 4 sub-pixel channels per output channel (pixel shuffle 2): channel c ← 4c..4c+3.
        model.block0.lastconv[0].bias[0:4] = shift / d0
        model.blocks()[-1].lastconv[0].bias[16:20] = 40.0
    a, b = _frames(2, b=1, h=32, w=48)
    out = model.interpolate(a, b, timestep=0.5, scale=scale)
    torch.testing.assert_close(out[..., :-2], a[..., 2:], atol=1e-4, rtol=0)


def test_padding_is_cropped_back(random_model):
    # 48×80 is a multiple of 16 but not of 32/64: the model pads with zeros bottom/right and crops.
    a, b = _frames(3)
    m = random_model.pad_multiple(1.0)
    assert 48 % m or 80 % m
    out = random_model.interpolate(a, b, 0.5, 1.0)
    assert out.shape == a.shape
    pad = (0, -80 % m, 0, -48 % m)
    full = random_model.interpolate(F.pad(a, pad), F.pad(b, pad), 0.5, 1.0)
    torch.testing.assert_close(out, full[:, :, :48, :80], atol=1e-5, rtol=0)


def test_timestep_per_sample_matches_scalar(random_model):
    a, b = _frames(4)
    per_sample = random_model.interpolate(a, b, torch.tensor([0.25, 0.75]), 1.0)
    torch.testing.assert_close(per_sample[:1], random_model.interpolate(a[:1], b[:1], 0.25, 1.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_sample[1:], random_model.interpolate(a[1:], b[1:], 0.75, 1.0), atol=1e-5, rtol=0)
    assert not torch.allclose(per_sample[0], per_sample[1])


@pytest.mark.parametrize("layout", ["module_prefixed_file", "bare_file", "bare_dict", "with_training_keys"])
def test_round_trip(random_model, tmp_path, layout):
    version = random_model.version
    if layout == "module_prefixed_file":
        path = tmp_path / "flownet.pkl"
        save_rife(random_model, path)
        assert all(k.startswith("module.") for k in torch.load(path, weights_only=True))
        source = path
    elif layout == "bare_file":
        path = tmp_path / "flownet.pkl"
        save_rife(random_model, path, data_parallel_prefix=False)
        source = path
    elif layout == "bare_dict":
        source = random_model.state_dict()
    else:
        source = {"module." + k: v for k, v in random_model.state_dict().items()}
        source["module.teacher.conv0.0.0.weight"] = torch.zeros(1)
        source["module.caltime.0.weight"] = torch.zeros(1)
    loaded = load_rife(source)
    assert loaded.version == version
    for k, v in random_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    a, b = _frames(5, b=1, h=32, w=32)
    torch.testing.assert_close(loaded.interpolate(a, b), random_model.interpolate(a, b), atol=0, rtol=0)


def test_explicit_426_uses_425_layout(models):
    assert load_rife(models["4.25"].state_dict(), version="4.26").version == "4.26"


def test_published_key_names(models):
    sd = models["4.25"].state_dict()
    for key in ("block0.conv0.0.0.weight", "block0.conv0.1.0.weight", "block0.convblock.7.conv.weight",
                "block0.convblock.0.beta", "block0.lastconv.0.weight", "block4.lastconv.0.bias",
                "encode.cnn0.weight", "encode.cnn3.weight"):
        assert key in sd, key
    assert tuple(sd["block0.conv0.0.0.weight"].shape) == (96, 15, 3, 3)
    assert tuple(sd["block1.conv0.0.0.weight"].shape) == (64, 28, 3, 3)
    assert tuple(sd["block0.lastconv.0.weight"].shape) == (192, 52, 4, 4)  # ConvTranspose: [in, out, k, k]
    assert tuple(sd["encode.cnn3.weight"].shape) == (16, 4, 4, 4)
    assert "block4.conv0.0.0.weight" not in models["4.22.lite"].state_dict()


def test_detect_version(models):
    assert detect_rife_version(models["4.22.lite"].state_dict()) == "4.22.lite"
    assert detect_rife_version(models["4.25"].state_dict()) == "4.25"
    assert set(RIFE_CONFIGS) == {"4.22.lite", "4.25", "4.26"}


def test_missing_unexpected_and_mismatched_keys_raise(random_model):
    sd = {"module." + k: v for k, v in random_model.state_dict().items()}
    missing = dict(sd)
    del missing["module.block1.convblock.3.beta"]
    with pytest.raises(ValueError, match=r"block1\.convblock\.3\.beta"):
        load_rife(missing)
    extra = dict(sd, **{"module.block0.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"block0\.extra\.weight"):
        load_rife(extra)
    wrong = dict(sd)
    wrong["module.encode.cnn1.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"encode\.cnn1\.bias"):
        load_rife(wrong)
    other = "4.22.lite" if random_model.version == "4.25" else "4.25"
    with pytest.raises(ValueError, match="missing|unexpected|shape"):
        load_rife(sd, version=other)


def test_bad_arguments_raise(random_model):
    a, b = _frames(6, b=1, h=16, w=16)
    with pytest.raises(ValueError, match="scale=3"):
        random_model.interpolate(a, b, 0.5, 3)
    with pytest.raises(ValueError, match="timestep=1.5"):
        random_model.interpolate(a, b, 1.5)
    with pytest.raises(ValueError, match="img1.shape"):
        random_model.interpolate(a, b[:, :, :8])
    with pytest.raises(ValueError, match="version='4.1'"):
        IFNet("4.1")
