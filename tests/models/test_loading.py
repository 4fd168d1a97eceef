"""Checkpoint loading/saving: both tensor-name layouts, sharded and single file, strict checks, fp32 modules."""

import json

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from lingbot_ray.models import loading
from lingbot_ray.models.transformer_lingbot import CAMERA_CHANNELS, CausalLingBotWorldTransformer3DModel


# ------------------------------------------------------------------ the published checkpoint's names (docs/MODEL.md)

DIM, FFN, TEXT, FREQ, IN, OUT, LAYERS, CAM_IN = 5120, 13824, 4096, 256, 36, 16, 40, 1536


def published_original_shapes() -> dict[str, tuple[int, ...]]:
    """All 1,421 tensors of the real transformer with their shapes, as docs/MODEL.md lists them."""
    shapes = {
        "patch_embedding.weight": (DIM, IN, 1, 2, 2),
        "patch_embedding.bias": (DIM,),
        "patch_embedding_wancamctrl.weight": (DIM, CAM_IN),
        "patch_embedding_wancamctrl.bias": (DIM,),
        "text_embedding.0.weight": (DIM, TEXT),
        "text_embedding.0.bias": (DIM,),
        "text_embedding.2.weight": (DIM, DIM),
        "text_embedding.2.bias": (DIM,),
        "time_embedding.0.weight": (DIM, FREQ),
        "time_embedding.0.bias": (DIM,),
        "time_embedding.2.weight": (DIM, DIM),
        "time_embedding.2.bias": (DIM,),
        "time_projection.1.weight": (6 * DIM, DIM),
        "time_projection.1.bias": (6 * DIM,),
        "head.head.weight": (OUT * 4, DIM),
        "head.head.bias": (OUT * 4,),
        "head.modulation": (1, 2, DIM),
    }
    for layer in (1, 2):
        shapes[f"c2ws_hidden_states_layer{layer}.weight"] = (DIM, DIM)
        shapes[f"c2ws_hidden_states_layer{layer}.bias"] = (DIM,)
    assert len(shapes) == 21
    for n in range(LAYERS):
        p = f"blocks.{n}."
        block = {p + "modulation": (1, 6, DIM), p + "norm3.weight": (DIM,), p + "norm3.bias": (DIM,)}
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                block[f"{p}{attn}.{proj}.weight"] = (DIM, DIM)
                block[f"{p}{attn}.{proj}.bias"] = (DIM,)
            block[f"{p}{attn}.norm_q.weight"] = (DIM,)
            block[f"{p}{attn}.norm_k.weight"] = (DIM,)
        block.update({p + "ffn.0.weight": (FFN, DIM), p + "ffn.0.bias": (FFN,), p + "ffn.2.weight": (DIM, FFN), p + "ffn.2.bias": (DIM,)})
        for layer in ("cam_injector_layer1", "cam_injector_layer2", "cam_scale_layer", "cam_shift_layer"):
            block[f"{p}{layer}.weight"] = (DIM, DIM)
            block[f"{p}{layer}.bias"] = (DIM,)
        assert len(block) == 35
        shapes.update(block)
    assert len(shapes) == 1421
    return shapes


def diffusers_names_by_diffusers(original: dict) -> dict:
    """Original → diffusers names by diffusers' own Wan converter (camera names pass through unchanged)."""
    converted = convert_wan_transformer_to_diffusers({name: torch.empty(0, device="meta") for name in original})
    mapping = dict(zip(original, converted))  # the converter keeps insertion order
    assert len(converted) == len(original)
    return mapping


@pytest.fixture(scope="module")
def full_model():
    with torch.device("meta"):
        return CausalLingBotWorldTransformer3DModel()


def test_full_size_model_accepts_every_published_name_in_both_layouts(full_model):
    original = published_original_shapes()
    to_diffusers = diffusers_names_by_diffusers(original)
    diffusers_layout = {to_diffusers[name]: shape for name, shape in original.items()}
    assert sum("cam" in n or "c2ws" in n for n in diffusers_layout) == 326

    assert loading.check_checkpoint_against_model(full_model, original) == loading.ORIGINAL
    assert loading.check_checkpoint_against_model(full_model, diffusers_layout) == loading.DIFFUSERS
    assert len(full_model.state_dict()) == 1421


def test_name_maps_agree_with_diffusers_converter_and_invert():
    original = published_original_shapes()
    for name, expected in diffusers_names_by_diffusers(original).items():
        assert loading.original_to_diffusers_name(name) == expected
        assert loading.diffusers_to_original_name(expected) == name
    assert loading.original_to_diffusers_name("blocks.7.norm3.weight") == "blocks.7.norm2.weight"
    assert loading.diffusers_to_original_name("blocks.7.norm3.weight") == "blocks.7.norm2.weight"


def test_strict_check_names_every_problem(full_model):
    shapes = published_original_shapes()
    del shapes["blocks.12.cross_attn.norm_k.weight"]
    del shapes["time_projection.1.bias"]
    shapes["blocks.3.img_emb.weight"] = (DIM,)
    shapes["blocks.39.ffn.0.weight"] = (FFN + 1, DIM)
    with pytest.raises(ValueError) as info:
        loading.check_checkpoint_against_model(full_model, shapes)
    message = str(info.value)
    for name in ("blocks.12.cross_attn.norm_k.weight", "time_projection.1.bias", "blocks.3.img_emb.weight", "blocks.39.ffn.0.weight"):
        assert name in message
    assert "missing 2" in message and "unexpected 1" in message and "shape mismatch 1" in message


def test_detect_layout_needs_a_probe_key():
    with pytest.raises(ValueError, match="blocks.0.self_attn.q.weight"):
        loading.detect_layout(["patch_embedding.weight"])
    assert loading.detect_layout(["blocks.0.attn1.to_q.weight"]) == loading.DIFFUSERS


# ------------------------------------------------------------------ tiny round trips through files

TINY = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, ffn_dim=64, text_dim=32, freq_dim=32)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CausalLingBotWorldTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    gen = torch.Generator().manual_seed(1)
    args = (
        torch.randn(1, 36, 3, 4, 4, generator=gen),
        torch.tensor([700.0]),
        torch.randn(1, 8, TINY["text_dim"], generator=gen),
        torch.randn(1, CAMERA_CHANNELS, 3, 4, 4, generator=gen),
    )
    with torch.no_grad():
        expected = model(*args).sample
    return model, args, expected


@pytest.mark.parametrize("layout", [loading.ORIGINAL, loading.DIFFUSERS])
@pytest.mark.parametrize("sharded", [True, False])
def test_round_trip_gives_identical_outputs(tmp_path, tiny, layout, sharded):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path, layout=layout, max_shard_bytes=20_000 if sharded else 10**9)

    index_path = tmp_path / loading.INDEX_NAME
    assert index_path.is_file() == sharded
    if sharded:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1
        assert loading.PROBE_KEYS[layout] in weight_map
    else:
        assert loading.PROBE_KEYS[layout] in load_file(tmp_path / loading.WEIGHTS_NAME)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "CausalLingBotWorldTransformer3DModel"

    loaded = loading.load_transformer(tmp_path, dtype=torch.float32)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(*args).sample, expected)


def test_resave_replaces_old_weight_files(tmp_path, tiny):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path, max_shard_bytes=20_000)
    loading.save_transformer(model, tmp_path, layout=loading.DIFFUSERS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", loading.WEIGHTS_NAME]
    with torch.no_grad():
        assert torch.equal(loading.load_transformer(tmp_path, dtype=torch.float32)(*args).sample, expected)


def test_pipeline_folder_resolves_transformer_subfolder(tmp_path, tiny):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path / "transformer")
    with torch.no_grad():
        assert torch.equal(loading.load_transformer(tmp_path, dtype=torch.float32)(*args).sample, expected)


@pytest.mark.parametrize("problem", ["missing", "unexpected"])
def test_file_with_missing_or_unexpected_tensor_raises_naming_it(tmp_path, tiny, problem):
    model, _, _ = tiny
    loading.save_transformer(model, tmp_path)
    path = tmp_path / loading.WEIGHTS_NAME
    tensors = load_file(path)
    if problem == "missing":
        name = "blocks.1.cross_attn.norm_k.weight"
        del tensors[name]
    else:
        name = "blocks.0.cam_extra_layer.weight"
        tensors[name] = torch.zeros(3)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=f"{problem} 1: {name}"):
        loading.load_transformer(tmp_path)


def test_shape_mismatch_in_a_shard_raises(tmp_path, tiny):
    model, _, _ = tiny
    loading.save_transformer(model, tmp_path, max_shard_bytes=20_000)
    weight_map = json.loads((tmp_path / loading.INDEX_NAME).read_text())["weight_map"]
    shard = tmp_path / weight_map["head.head.weight"]
    tensors = load_file(shard)
    tensors["head.head.weight"] = tensors["head.head.weight"][:-1].clone()
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"shape mismatch 1: head.head.weight \(model: proj_out.weight\)"):
        loading.load_transformer(tmp_path)


def test_bf16_load_keeps_fp32_modules(tmp_path, tiny):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path)
    loaded = loading.load_transformer(tmp_path, dtype=torch.bfloat16)
    fp32 = {name for name, p in loaded.named_parameters() if p.dtype == torch.float32}
    bf16 = {name for name, p in loaded.named_parameters() if p.dtype == torch.bfloat16}
    assert fp32 | bf16 == {name for name, _ in loaded.named_parameters()}
    for name in (
        "condition_embedder.time_embedder.linear_1.weight",
        "condition_embedder.time_proj.weight",
        "scale_shift_table",
        "blocks.1.scale_shift_table",
        "blocks.0.norm2.weight",
        "blocks.0.attn1.norm_q.weight",
    ):
        assert name in fp32
    for name in ("blocks.0.attn1.to_q.weight", "blocks.1.cam_scale_layer.weight", "patch_embedding_wancamctrl.weight", "proj_out.weight"):
        assert name in bf16
    with torch.no_grad():
        out = loaded(*args).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.1, rtol=0.05)

    # The causal path runs in bf16 too (bf16 KV cache, fp32 modulation and residual).
    latents, t, text, plucker = args
    cache = loaded.new_kv_cache(tokens_per_frame=loaded.tokens_per_frame(4, 4))
    assert cache.dtype == torch.bfloat16
    with torch.no_grad():
        block = loaded.forward_block(
            latents, t, kv_cache=cache, start_frame=0, text_cache=loaded.build_text_cache(text),
            camera_cache=loaded.build_camera_cache(plucker), update_cache=True,
        )
    torch.testing.assert_close(block, expected, atol=0.1, rtol=0.05)
