"""FP8 DiT matmuls (lingbot_ray/models/fp8.py): what is converted, what is kept, and how close the
converted model stays to the unconverted one."""

import numpy as np
import pytest
import torch
from torch import nn

from lingbot_ray.engine import RealtimeEngine, SessionSpec
from lingbot_ray.engine.fastpath import use_fp8
from lingbot_ray.models.fp8 import CONVERTED_IN_BLOCK, FP8_DTYPE, Float8Linear, check_fp8_device, convert_to_fp8
from lingbot_ray.models.tiny import build_tiny_checkpoint
from tests.engine.helpers import HEIGHT, WIDTH, conditions, run


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def test_a_float8_linear_is_close_to_the_linear_and_rowwise_scaling_survives_an_outlier_token():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).to(torch.bfloat16)
    x = torch.randn(4, 16, 256, dtype=torch.bfloat16)
    # one loud token: a single tensor-wide scale pushes every other token into e4m3's subnormals
    x[0, 0] *= 1e5
    with torch.no_grad():
        ref = linear(x)
    rowwise, tensorwise = Float8Linear(linear, "rowwise"), Float8Linear(linear, "tensorwise")
    assert rowwise.weight.dtype == FP8_DTYPE and rowwise.weight_scale.shape == (128, 1)
    assert tensorwise.weight_scale.shape == () and rowwise.bias.dtype == torch.bfloat16
    with torch.no_grad():
        out_row, out_tensor = rowwise(x), tensorwise(x)
    assert out_row.shape == ref.shape and out_row.dtype == torch.bfloat16
    quiet = (slice(1, None),)  # every token but the loud one
    assert _relative_error(out_row[quiet], ref[quiet]) < 0.05
    assert _relative_error(out_tensor[quiet], ref[quiet]) > 2 * _relative_error(out_row[quiet], ref[quiet])
    # an all-zero input row quantises to zeros, not NaN
    with torch.no_grad():
        assert torch.equal(rowwise(torch.zeros(2, 256, dtype=torch.bfloat16)), linear.bias.expand(2, -1))
    with pytest.raises(ValueError, match=r"scaling='channel'"):
        Float8Linear(linear, "channel")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "tiny", seed=0)


def test_conversion_swaps_the_block_matmuls_and_keeps_norms_modulation_and_embeddings(folder):
    engine = RealtimeEngine.from_pretrained(folder, dtype=torch.bfloat16)
    model = engine.dit.model
    before = {name: p.dtype for name, p in model.named_parameters()}
    converted = use_fp8(engine.dit, "rowwise")
    assert converted == len(model.blocks) * len(CONVERTED_IN_BLOCK)
    for block in model.blocks:
        for path in CONVERTED_IN_BLOCK:
            assert isinstance(block.get_submodule(path), Float8Linear), path
    kept = {name: p.dtype for name, p in model.named_parameters()}
    assert set(kept) == {n for n in before if not any(f".{p}." in n for p in CONVERTED_IN_BLOCK)}
    assert kept == {n: before[n] for n in kept}  # every other parameter has the dtype it had
    # the named kinds, explicitly: embeddings, modulation tables and layers, norms, output projection
    for name in ("patch_embedding.weight", "condition_embedder.time_proj.weight", "scale_shift_table",
                 "blocks.0.scale_shift_table", "blocks.0.cam_scale_layer.weight", "blocks.0.norm2.weight",
                 "blocks.0.attn1.norm_q.weight", "proj_out.weight"):  # fmt: skip
        assert kept[name] == before[name], name
    assert convert_to_fp8(model, "rowwise") == 0  # already converted: nothing twice


def test_the_fp8_model_stays_within_its_stated_distance_of_the_bf16_model(folder):
    """Tolerance, over 3 chunks of one session against the fp32 model's frames: FP8 (rowwise) within
    3.5x the mean uint8 distance that bf16 itself has, and under 1 level on average per chunk
    (measured: bf16 0.07-0.16, rowwise 0.13-0.34, tensorwise 0.19-0.44)."""
    image = np.random.default_rng(1234).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    spec = SessionSpec(prompt="a quiet village street", image=image, width=WIDTH, height=HEIGHT, seed=7)
    chunks = [conditions(["w"]), conditions(["l"]), conditions([])]
    reference = run(RealtimeEngine.from_pretrained(folder), spec, chunks)

    def distance(mode: str) -> list[float]:
        engine = RealtimeEngine.from_pretrained(folder, dtype=torch.bfloat16)
        use_fp8(engine.dit, mode)
        return [float(np.abs(a.astype(int) - b.astype(int)).mean()) for a, b in zip(reference, run(engine, spec, chunks))]

    bf16 = distance("none")
    for mode in ("rowwise", "tensorwise"):
        fp8 = distance(mode)
        assert all(d < 1.0 for d in fp8), (mode, fp8)
        assert sum(fp8) <= 3.5 * sum(bf16), (mode, fp8, bf16)


def test_fp8_settings_are_checked_by_name(folder, monkeypatch):
    engine = RealtimeEngine.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"dit.fp8='e5m2'"):
        use_fp8(engine.dit, "e5m2")
    assert use_fp8(engine.dit, "none") == 0
    # a GPU older than Ada/Hopper is refused by name, before anything is converted
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"dit.fp8='rowwise': needs a GPU with FP8 matmuls .* NVIDIA A100, 8.0"):
        check_fp8_device("cuda:0", "rowwise")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device("cuda:0", "rowwise")  # Hopper passes


def test_the_serve_config_names_a_bad_fp8_setting():
    from lingbot_ray.engine.fastpath import FP8_MODES
    from lingbot_ray.models.fp8 import SCALINGS
    from lingbot_ray.serve.config import load_config

    assert FP8_MODES == ("none", *SCALINGS)  # the setting's names, kept torch-free, match the module's

    with pytest.raises(ValueError, match=r"dit.fp8='fp4'"):
        load_config({"dit": {"fp8": "fp4"}})
    assert load_config({"dit": {"fp8": "rowwise"}}).dit.fp8 == "rowwise"
