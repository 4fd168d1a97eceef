"""LingBot World 2.0 checkpoints (docs/MODEL.md, "LingBot World 2.0"): the version is told from a
folder's files, both v2 models load strictly through the same `from_pretrained` in every published
layout (and both tensor namings where both exist), a DiT-only release takes its text encoder and VAE
from `shared_components`, and each model serves with its own defaults."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lingbot_ray import checkpoint
from lingbot_ray.engine.stages import DiTStage
from lingbot_ray.models import loading
from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel
from tests.models.v2_layouts import (
    NATIVE_SIDE_FILES,
    build_shared,
    build_v2_14b_diffusers,
    build_v2_14b_native,
    build_v2_1p3b,
    flow,
    model_inputs,
    write_settings,
)

load = CausalLingBotWorldTransformer3DModel.from_pretrained


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return build_shared(tmp_path_factory.mktemp("v2") / "shared")


def build(kind: str, folder, shared=None, **settings):
    """One tiny checkpoint of ``kind``; returns the DiT written into it."""
    if kind == "v2-1.3b":
        return build_v2_1p3b(folder, shared=shared, **settings)
    if kind == "v2-1.3b diffusers names":
        return build_v2_1p3b(folder, shared=shared, naming=loading.DIFFUSERS, **settings)
    if kind == "v2-14b native":
        return build_v2_14b_native(folder, shared=shared, **settings)
    if kind == "v2-14b diffusers":
        return build_v2_14b_diffusers(folder, **settings)
    if kind == "v2-14b diffusers, diffusers names":
        return build_v2_14b_diffusers(folder, naming=loading.DIFFUSERS, **settings)
    raise AssertionError(kind)


KINDS = ["v2-1.3b", "v2-1.3b diffusers names", "v2-14b native", "v2-14b diffusers", "v2-14b diffusers, diffusers names"]


# ------------------------------------------------------------------------------------ detection


@pytest.mark.parametrize(
    "kind, layout, version",
    [
        ("v2-1.3b", checkpoint.LAYOUT_DIT_ONLY, checkpoint.V2_1P3B),
        ("v2-14b native", checkpoint.LAYOUT_NATIVE, checkpoint.V2_14B),
        ("v2-14b diffusers", checkpoint.LAYOUT_DIFFUSERS, checkpoint.V2_14B),
    ],
)
def test_each_v2_layout_is_detected_from_its_files(tmp_path, kind, layout, version):
    build(kind, tmp_path / "ckpt")
    found = checkpoint.read_checkpoint_layout(tmp_path / "ckpt")
    assert (found.layout, found.version) == (layout, version)


def test_v1_is_the_default_of_a_diffusers_folder(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "ckpt")
    found = checkpoint.read_checkpoint_layout(folder)
    assert (found.layout, found.version) == (checkpoint.LAYOUT_DIFFUSERS, checkpoint.V1)
    assert "cannot tell v1 from v2 14B" in found.version_source


def test_the_folder_name_never_decides(tmp_path):
    # each built under the other's published name
    build_v2_1p3b(tmp_path / "lingbot-world-fast-diffusers")
    build_tiny_checkpoint(tmp_path / "lingbot-world-v2-1.3b-causal-fast")
    build_v2_14b_native(tmp_path / "lingbot-world-fast")
    assert checkpoint.read_checkpoint_layout(tmp_path / "lingbot-world-fast-diffusers").version == checkpoint.V2_1P3B
    assert checkpoint.read_checkpoint_layout(tmp_path / "lingbot-world-v2-1.3b-causal-fast").version == checkpoint.V1
    assert checkpoint.read_checkpoint_layout(tmp_path / "lingbot-world-fast").version == checkpoint.V2_14B


def test_a_transformer_folder_is_v1_unless_lingbot_ray_json_says(tmp_path):
    model = build_v2_1p3b(tmp_path / "small")
    loading.save_transformer(model, tmp_path / "folder")
    assert checkpoint.read_checkpoint_layout(tmp_path / "folder").layout == checkpoint.LAYOUT_TRANSFORMER
    assert checkpoint.read_checkpoint_layout(tmp_path / "folder").version == checkpoint.V1
    write_settings(tmp_path / "folder", model_version="v2-1.3b")
    assert checkpoint.read_checkpoint_layout(tmp_path / "folder").version == checkpoint.V2_1P3B


@pytest.mark.parametrize("kind, wrong", [("v2-1.3b", "v2-14b"), ("v2-14b native", "v1"), ("v2-14b native", "v2-1.3b")])
def test_a_model_version_the_files_contradict_is_an_error(tmp_path, kind, wrong):
    build(kind, tmp_path / "ckpt", model_version=wrong)
    with pytest.raises(ValueError, match=rf"model_version='{wrong}': .* layout, which is 'v2-"):
        checkpoint.read_checkpoint_layout(tmp_path / "ckpt")


def test_an_unknown_model_version_is_named(tmp_path):
    build_v2_14b_diffusers(tmp_path / "ckpt", model_version="v3")
    with pytest.raises(ValueError, match=r"model_version='v3': must be one of \['v1', 'v2-14b', 'v2-1.3b'\]"):
        checkpoint.read_serving_defaults(tmp_path / "ckpt")


def test_a_folder_of_no_known_layout_gets_one_error_naming_what_it_holds(tmp_path):
    folder = tmp_path / "stranger"
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    (folder / "model.bin").write_bytes(b"")
    (folder / "notes.txt").write_text("")
    with pytest.raises(checkpoint.CheckpointLayoutError) as info:
        checkpoint.read_checkpoint_layout(folder)
    message = str(info.value)
    assert "it holds model.bin, notes.txt, weights/" in message
    for expected in ("no model_index.json", "no transformers/", "no config.json", "model.safetensors"):
        assert expected in message
    # the same one error from every entry point that is given the folder
    for entry in (checkpoint.read_model_index, checkpoint.read_serving_defaults, load):
        with pytest.raises(checkpoint.CheckpointLayoutError, match="it holds model.bin"):
            entry(folder)
    with pytest.raises(checkpoint.CheckpointLayoutError, match="it holds model.bin"):
        checkpoint.ensure_checkpoint(str(folder))


def test_diffusers_weights_without_a_config_are_not_taken_for_the_1p3b(tmp_path):
    model = build_v2_1p3b(tmp_path / "small")
    loading.save_transformer(model, tmp_path / "bare", config_format=None)
    with pytest.raises(checkpoint.CheckpointLayoutError, match="no config.json"):
        checkpoint.read_checkpoint_layout(tmp_path / "bare")


# ------------------------------------------------------------------------------ strict loading


@pytest.mark.parametrize("kind", KINDS)
def test_every_v2_layout_loads_strictly_through_from_pretrained(tmp_path, shared, kind):
    built = build(kind, tmp_path / "ckpt", shared=shared)
    inputs = model_inputs(built)
    expected = flow(built, inputs)
    for loaded in (
        load(tmp_path / "ckpt"),
        loading.load_transformer(tmp_path / "ckpt", dtype=torch.float32),
        loading.load_dit(tmp_path / "ckpt", dtype=torch.float32),
    ):
        assert not [n for n, t in loaded.state_dict().items() if t.is_meta]
        assert loaded.state_dict().keys() == built.state_dict().keys()
        assert torch.equal(flow(loaded, inputs), expected)


def test_the_1p3b_config_comes_from_its_tensor_shapes(tmp_path):
    built = build_v2_1p3b(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "config.json").exists()
    files = checkpoint.transformer_files(tmp_path / "ckpt")
    assert "num_attention_heads 12 assumed" in files.config_source
    for key in (
        "patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
        "freq_dim", "ffn_dim", "num_layers", "num_frames_per_block", "sink_size", "sliding_window_num_frames",
    ):  # fmt: skip
        assert files.config[key] == built.config[key], key
    assert (files.config["num_frames_per_block"], files.config["sink_size"], files.config["sliding_window_num_frames"]) == (4, 6, 18)


def test_the_1p3b_head_count_is_a_setting(tmp_path):
    built = build_v2_1p3b(tmp_path / "ckpt", num_attention_heads=6)
    loaded = load(tmp_path / "ckpt")
    assert (loaded.config.num_attention_heads, loaded.config.attention_head_dim) == (6, 16)
    # the same weights, split into other heads: a different model
    inputs = model_inputs(built)
    assert not torch.allclose(flow(loaded, inputs), flow(built, inputs))
    write_settings(tmp_path / "ckpt", num_attention_heads=7)
    with pytest.raises(ValueError, match=r"num_attention_heads=7: must divide the model width 96"):
        load(tmp_path / "ckpt")


def test_a_head_count_beside_a_config_that_says_otherwise_is_an_error(tmp_path):
    build_v2_14b_diffusers(tmp_path / "ckpt", num_attention_heads=12)
    with pytest.raises(ValueError, match=r"num_attention_heads=12: transformer/config.json says 2"):
        loading.load_dit(tmp_path / "ckpt", dtype=torch.float32)


def _shard_of(folder, name):
    index = next(p for p in folder.iterdir() if p.name.endswith(".safetensors.index.json"))
    return folder / json.loads(index.read_text())["weight_map"][name]


def _break(folder, name, problem):
    shard = _shard_of(folder, name)
    tensors = load_file(shard)
    if problem == "missing":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, shard)
    if problem == "missing":  # the index must agree with the shards, or that is the (different) error
        index = next(p for p in folder.iterdir() if p.name.endswith(".safetensors.index.json"))
        data = json.loads(index.read_text())
        del data["weight_map"][name]
        index.write_text(json.dumps(data))


@pytest.mark.parametrize("problem", ["missing", "shape mismatch"])
@pytest.mark.parametrize(
    "kind, dit, name",
    [
        ("v2-1.3b", ".", "blocks.1.cam_scale_layer.weight"),
        ("v2-1.3b", ".", "blocks.1.ffn.2.weight"),
        ("v2-14b native", "transformers", "blocks.1.cross_attn.k.weight"),
        ("v2-14b diffusers", "transformer", "blocks.1.self_attn.norm_q.weight"),
    ],
)
def test_a_missing_or_misshapen_tensor_is_an_error_naming_it(tmp_path, kind, dit, name, problem):
    build(kind, tmp_path / "ckpt")
    _break(tmp_path / "ckpt" / dit, name, problem)
    with pytest.raises(ValueError, match=rf"{problem} 1: {name.replace('.', '[.]')}"):
        load(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=rf"{problem} 1: {name.replace('.', '[.]')}"):
        loading.load_dit(tmp_path / "ckpt", dtype=torch.float32)


def test_a_tensor_the_1p3b_config_is_derived_from_is_named_when_missing(tmp_path):
    build_v2_1p3b(tmp_path / "ckpt")
    _break(tmp_path / "ckpt", "head.head.weight", "missing")
    with pytest.raises(ValueError, match=r"cannot derive the transformer config .*: head[.]head[.]weight is missing"):
        load(tmp_path / "ckpt")


def test_a_native_config_that_disagrees_with_the_tensors_is_named(tmp_path):
    build_v2_14b_native(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "transformers" / "config.json"
    native = json.loads(path.read_text())
    assert native["_class_name"] == "WanModelFast" and "patch_size" not in native and "text_dim" not in native
    native["ffn_dim"] += 1
    path.write_text(json.dumps(native))
    with pytest.raises(ValueError, match=rf"transformers/config.json ffn_dim={native['ffn_dim']}: the tensors say {native['ffn_dim'] - 1}"):
        load(tmp_path / "ckpt")


# --------------------------------------------------------------------------- shared components


def test_a_dit_only_release_needs_shared_components_for_everything_but_the_dit(tmp_path, shared):
    build_v2_1p3b(tmp_path / "ckpt")
    loading.load_dit(tmp_path / "ckpt", dtype=torch.float32)  # the DiT alone loads
    for loader in (loading.load_vae, loading.load_prompt_encoder, loading.load_scheduler_config):
        with pytest.raises(checkpoint.ComponentMissingError, match="set shared_components in its lingbot_ray.json"):
            loader(tmp_path / "ckpt")
    with pytest.raises(checkpoint.ComponentMissingError, match="'vae'"):
        checkpoint.CheckpointFacts.read(tmp_path / "ckpt")

    write_settings(tmp_path / "ckpt", shared_components=str(shared))  # absolute, or relative as in the builders
    facts = checkpoint.CheckpointFacts.read(tmp_path / "ckpt")
    assert (facts.geometry.num_frames_per_block, facts.geometry.vae_scale_spatial) == (4, 8)
    assert loading.load_scheduler_config(tmp_path / "ckpt")["num_train_timesteps"] == 1000
    assert loading.load_vae(tmp_path / "ckpt") is not None
    assert loading.load_prompt_encoder(tmp_path / "ckpt").encode("a street").shape[-1] == 32


def test_shared_components_must_be_a_diffusers_checkpoint(tmp_path, shared):
    build_v2_14b_native(tmp_path / "ckpt", shared_components="../nowhere")
    with pytest.raises(checkpoint.ComponentMissingError, match=r"shared_components='../nowhere'.*has no model_index.json"):
        checkpoint.read_model_index(tmp_path / "ckpt")
    partial = shutil.copytree(shared, tmp_path / "partial")
    shutil.rmtree(partial / "vae")
    write_settings(tmp_path / "ckpt", shared_components="../partial")
    with pytest.raises(checkpoint.ComponentMissingError, match=r"has no 'vae' folder.*shared_components of"):
        loading.load_vae(tmp_path / "ckpt")


def test_shared_components_are_refused_beside_a_checkpoints_own(tmp_path, shared):
    build_v2_14b_diffusers(tmp_path / "ckpt", shared_components=str(shared))
    with pytest.raises(ValueError, match=r"shared_components=.*has its own model_index.json"):
        checkpoint.read_model_index(tmp_path / "ckpt")


def test_the_native_side_files_are_not_read(tmp_path, shared):
    build_v2_14b_native(tmp_path / "ckpt", shared=shared)
    for name in NATIVE_SIDE_FILES:  # empty stand-ins: reading any of them would fail
        assert (tmp_path / "ckpt" / name).stat().st_size == 0
    index = checkpoint.read_model_index(tmp_path / "ckpt")
    assert index.component_folder("vae") == shared.resolve() / "vae"
    assert index.component_folder("transformer") == tmp_path / "ckpt" / "transformers"


def test_ensure_checkpoint_takes_every_v2_layout(tmp_path, shared):
    for kind in ("v2-1.3b", "v2-14b native", "v2-14b diffusers"):
        build(kind, tmp_path / kind, shared=shared)
        assert checkpoint.ensure_checkpoint(str(tmp_path / kind)) == (tmp_path / kind).resolve()
        # an existing v2 folder is served, never replaced by a tiny v1 one
        assert checkpoint.ensure_checkpoint(str(tmp_path / kind), build_tiny_if_missing=True) == (tmp_path / kind).resolve()
        assert checkpoint.read_checkpoint_layout(tmp_path / kind).version != checkpoint.V1


# -------------------------------------------------------------------------- serving defaults


def test_each_model_has_its_own_serving_defaults(tmp_path, shared):
    build_tiny_checkpoint(tmp_path / "v1")
    (tmp_path / "v1" / "lingbot_ray.json").unlink()
    build_v2_14b_native(tmp_path / "v2-14b", shared=shared)
    build_v2_1p3b(tmp_path / "v2-1.3b", shared=shared)
    v1, big, small = (checkpoint.read_serving_defaults(tmp_path / name) for name in ("v1", "v2-14b", "v2-1.3b"))
    assert v1 == checkpoint.ServingDefaults()
    assert (v1.timestep_indices, v1.shift) == ((0, 179, 358, 679), 10.0)
    # the reference server's v2 schedule (SGLang LingBotWorldV2CausalDMDConfig: labels [1000, 750, 500, 250], shift 5)
    for v2 in (big, small):
        assert (v2.timestep_indices, v2.shift, v2.timestep_format) == ((0, 250, 500, 750), 5.0, "float")
        assert (v2.width, v2.height, v2.fps) == (832, 480, 16.0)
    assert (big.num_frames, small.num_frames) == (12, 16)
    big_geometry, small_geometry = (checkpoint.read_geometry(tmp_path / name) for name in ("v2-14b", "v2-1.3b"))
    assert (big_geometry.num_frames_per_block, big_geometry.default_sink_size, big_geometry.default_window_frames) == (3, 9, 18)
    assert (small_geometry.num_frames_per_block, small_geometry.default_sink_size, small_geometry.default_window_frames) == (4, 6, 18)
    session = checkpoint.CheckpointFacts.read(tmp_path / "v2-1.3b").session_defaults()
    assert (session.size, session.num_frames, session.sink_size, session.window_frames) == ("832x480", 16, 6, 18)


def test_the_v2_timesteps_are_the_reference_servers(tmp_path):
    """Fixed vectors: SGLang warps its labels [1000, 750, 500, 250] through the shift-5 flow schedule
    (float): 1000, 937.5, 833.33, 625; the authors' script feeds int64 timesteps of a shift-10 grid
    from 0.999: 999, 967, 908, 768 (docs/MODEL.md, "LingBot World 2.0")."""
    build_v2_14b_diffusers(tmp_path / "ckpt")
    schedule = DiTStage.from_pretrained(tmp_path / "ckpt").sampler.schedule()
    assert schedule.timesteps == pytest.approx((1000.0, 937.5, 833.3333, 625.0), abs=1e-4)
    write_settings(tmp_path / "ckpt", model_version="v2-14b", shift=10.0, timestep_format="int")
    assert DiTStage.from_pretrained(tmp_path / "ckpt").sampler.schedule().timesteps == (999.0, 967.0, 908.0, 768.0)
    write_settings(tmp_path / "ckpt", model_version="v2-14b", timestep_format="int")
    assert DiTStage.from_pretrained(tmp_path / "ckpt").sampler.schedule().timesteps == (999.0, 937.0, 833.0, 624.0)


def test_the_authors_streaming_settings_are_settings(tmp_path):
    """The authors' script runs the 14B with blocks of 4, sink 6, window 18; lingbot_ray.json selects them."""
    build_v2_14b_diffusers(tmp_path / "ckpt", num_frames_per_block=4, sink_size=6, window_frames=18)
    geometry = checkpoint.read_geometry(tmp_path / "ckpt")
    assert (geometry.num_frames_per_block, geometry.default_sink_size, geometry.default_window_frames) == (4, 6, 18)
    model = loading.load_dit(tmp_path / "ckpt", dtype=torch.float32)
    assert (model.config.num_frames_per_block, model.config.sink_size, model.config.sliding_window_num_frames) == (4, 6, 18)
    write_settings(tmp_path / "ckpt", model_version="v2-14b", sink_size=-1)
    with pytest.raises(ValueError, match=r"sink_size=-1: must be an integer >= 0 or null"):
        checkpoint.read_geometry(tmp_path / "ckpt")
