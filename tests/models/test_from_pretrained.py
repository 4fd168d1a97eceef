"""`CausalLingBotWorldTransformer3DModel.from_pretrained` as diffusers users call it: strict, both namings,
local folders only, and the same load path (and fp32-kept modules) as `loading.load_transformer`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lingbot_ray.models import loading
from lingbot_ray.models.strict_load import check_names_and_shapes
from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel
from tests.models.test_loading import tiny  # noqa: F401  (fixture: the same tiny model, inputs and outputs)


SHARD_BYTES = 20_000  # splits the tiny model (~0.1 MB) into several shards



def run(model: CausalLingBotWorldTransformer3DModel, args) -> torch.Tensor:
    with torch.no_grad():
        return model(*args).sample


def assert_fully_loaded(model: torch.nn.Module) -> None:
    meta = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert not meta, f"left on the meta device: {meta}"


def dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {name: t.dtype for name, t in model.state_dict().items()}


@pytest.mark.parametrize("layout", [loading.ORIGINAL, loading.DIFFUSERS])
@pytest.mark.parametrize("sharded", [True, False])
def test_from_pretrained_equals_load_transformer(tmp_path, tiny, layout, sharded):
    model, args, expected = tiny
    transformer = tmp_path / "checkpoint" / "transformer"
    loading.save_transformer(model, transformer, layout=layout, max_shard_bytes=SHARD_BYTES if sharded else 10**9)
    assert (transformer / loading.INDEX_NAME).is_file() == sharded

    reference = loading.load_transformer(transformer, dtype=torch.float32)
    load = CausalLingBotWorldTransformer3DModel.from_pretrained
    via_subfolder = load(tmp_path / "checkpoint", subfolder="transformer")
    direct = load(str(transformer))
    for loaded in (via_subfolder, direct):
        assert type(loaded) is CausalLingBotWorldTransformer3DModel
        assert not loaded.training
        assert_fully_loaded(loaded)
        assert dtypes(loaded) == dtypes(reference) == dict.fromkeys(dtypes(reference), torch.float32)
        assert loaded.config == reference.config
        assert torch.equal(run(loaded, args), run(reference, args))
        assert torch.equal(run(loaded, args), expected)


def test_from_pretrained_does_not_need_accelerate(tmp_path, tiny, monkeypatch):
    """The issue's failure (diffusers without accelerate refuses `_keep_in_fp32_modules`) cannot come back,
    whether or not accelerate happens to be installed."""
    import diffusers.models.modeling_utils as modeling_utils

    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path)
    loaded = CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path)
    assert_fully_loaded(loaded)
    assert torch.equal(run(loaded, args), expected)


@pytest.mark.parametrize("sharded", [True, False])
def test_save_pretrained_round_trip(tmp_path, tiny, sharded):
    model, args, expected = tiny
    model.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "10GB")
    index = tmp_path / loading.INDEX_NAME
    assert index.is_file() == sharded
    names = json.loads(index.read_text())["weight_map"] if sharded else load_file(tmp_path / loading.WEIGHTS_NAME)
    assert loading.detect_layout(names) == loading.DIFFUSERS  # diffusers' save writes diffusers names

    loaded = CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path)
    assert_fully_loaded(loaded)
    assert torch.equal(run(loaded, args), expected)


def test_torch_dtype_keeps_fp32_modules_like_load_transformer(tmp_path, tiny):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path)
    reference = loading.load_transformer(tmp_path, dtype=torch.bfloat16)
    loaded = CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert dtypes(loaded) == dtypes(reference)
    newer_spelling = CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert dtypes(newer_spelling) == dtypes(reference)

    patterns = CausalLingBotWorldTransformer3DModel._keep_in_fp32_modules
    for name, dtype in dtypes(loaded).items():
        assert dtype == (torch.float32 if loading.keeps_fp32(name, patterns) else torch.bfloat16), name
    assert dtypes(loaded)["blocks.0.norm2.weight"] == torch.float32
    assert dtypes(loaded)["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert torch.equal(run(loaded, args), run(reference, args))
    torch.testing.assert_close(run(loaded, args), expected, atol=0.1, rtol=0.05)


def _edit_single_file(folder: Path, problem: str) -> str:
    """Break the one weights file of an original-layout save; returns the tensor name the error must give."""
    path = folder / loading.WEIGHTS_NAME
    tensors = load_file(path)
    if problem == "missing":
        name = "blocks.1.cross_attn.norm_k.weight"
        del tensors[name]
    elif problem == "unexpected":
        name = "blocks.0.cam_extra_layer.weight"
        tensors[name] = torch.zeros(3)
    else:
        name = "head.head.weight"
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path)
    return name


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape mismatch"])
def test_bad_checkpoint_raises_naming_the_tensor(tmp_path, tiny, problem):
    model, _, _ = tiny
    loading.save_transformer(model, tmp_path / "transformer", layout=loading.ORIGINAL)
    name = _edit_single_file(tmp_path / "transformer", problem)
    with pytest.raises(ValueError, match=rf"{problem} 1: {name.replace('.', '[.]')}"):
        CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer")


def test_bad_shard_in_diffusers_layout_raises_naming_the_tensor(tmp_path, tiny):
    model, _, _ = tiny
    loading.save_transformer(model, tmp_path, layout=loading.DIFFUSERS, max_shard_bytes=SHARD_BYTES)
    weight_map = json.loads((tmp_path / loading.INDEX_NAME).read_text())["weight_map"]
    shard = tmp_path / weight_map["proj_out.weight"]
    tensors = load_file(shard)
    del tensors["proj_out.weight"]
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"proj_out\.weight"):
        CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path)


def test_only_local_folders(tmp_path):
    with pytest.raises(ValueError, match=r"'robbyant/lingbot-world-base-cam' is not a local folder.*Hub"):
        CausalLingBotWorldTransformer3DModel.from_pretrained("robbyant/lingbot-world-base-cam")
    with pytest.raises(ValueError, match="is not a local folder"):
        CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match="no config.json"):
        CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path)


def test_keyword_arguments(tmp_path, tiny):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path)
    load = CausalLingBotWorldTransformer3DModel.from_pretrained

    # What a caller passing diffusers' keywords along sends: accepted, changes nothing.
    neutral = dict(
        revision=None, variant=None, cache_dir=None, token=None, device_map=None, use_safetensors=True,
        local_files_only=True, low_cpu_mem_usage=True, output_loading_info=False, subfolder=None, device="cpu",
    )
    assert torch.equal(run(load(tmp_path, **neutral), args), expected)

    refused = {
        "device_map": ("auto", r"device_map='auto'.*device="),
        "revision": ("main", r"revision='main'"),
        "variant": ("fp16", r"variant='fp16'"),
        "use_safetensors": (False, r"use_safetensors=False"),
        "ignore_mismatched_sizes": (True, r"ignore_mismatched_sizes=True"),
        "output_loading_info": (True, r"output_loading_info=True"),
        "unheard_of": (1, r"unsupported keyword arguments: unheard_of"),
        "torch_dtype": ("bfloat16", r"torch_dtype='bfloat16'"),
    }
    for key, (value, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            load(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=r"torch_dtype=torch\.int8"):
        load(tmp_path, torch_dtype=torch.int8)
    with pytest.raises(ValueError, match="disagree"):
        load(tmp_path, torch_dtype=torch.bfloat16, dtype=torch.float16)


def test_one_strict_check_for_every_loader():
    with pytest.raises(ValueError) as info:
        check_names_and_shapes({"a": (2,), "b": (3,), "c": (1,)}, {"a": (2,), "c": (4,), "d": (5,)}, what="weights")
    assert str(info.value).splitlines() == [
        "weights does not match the model:",
        "missing 1: b",
        "unexpected 1: d",
        "shape mismatch 1: c checkpoint [4] vs model [1]",
    ]
    check_names_and_shapes({"a": (2,)}, {"a": [2]}, what="weights")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_from_pretrained_onto_cuda(tmp_path, tiny):
    model, args, expected = tiny
    loading.save_transformer(model, tmp_path, max_shard_bytes=SHARD_BYTES)
    loaded = CausalLingBotWorldTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, device="cuda")
    reference = loading.load_transformer(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert {t.device.type for t in loaded.state_dict().values()} == {"cuda"}
    assert dtypes(loaded) == dtypes(reference)
    cuda_args = [a.cuda() for a in args]
    assert torch.equal(run(loaded, cuda_args), run(reference, cuda_args))
    torch.testing.assert_close(run(loaded, cuda_args).cpu(), expected, atol=0.1, rtol=0.05)
