"""The tiny random checkpoint builder, and loading the folder it writes through the loaders."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lingbot_ray import checkpoint
from lingbot_ray.models import loading
from lingbot_ray.models.tiny import TINY_SERVED_MODEL_NAME, build_tiny_main, build_tiny_transformer
from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel
from lingbot_ray.models.vae_streaming import StreamingWanVAE
from tests.models.pipeline import load_pipeline

# What the published robbyant/lingbot-world-fast-diffusers model_index.json names (docs/MODEL.md).
PUBLISHED_INDEX = {
    "_class_name": "LingBotWorldCausalDMDPipeline",
    "transformer": ["diffusers", "CausalLingBotWorldTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "ckpt"
    assert build_tiny_main([str(folder), "--seed", "0"]) == 0
    return folder


def copy_of(tiny, tmp_path):
    return shutil.copytree(tiny, tmp_path / "copy")


def test_folder_has_every_component(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert {"model_index.json", "lingbot_ray.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    assert (tiny / "vae" / "config.json").is_file()
    assert (tiny / "text_encoder" / "config.json").is_file()
    assert (tiny / "tokenizer" / "tokenizer.json").is_file()
    assert (tiny / "scheduler" / "scheduler_config.json").is_file()
    assert not [p for p in tiny.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_the_random_checkpoint_is_not_named_like_the_trained_embedded_one(tiny):
    served = checkpoint.read_serving_defaults(tiny).served_model_name
    assert served == TINY_SERVED_MODEL_NAME == "lingbot-world-tiny-random"
    assert served not in checkpoint.embedded_checkpoints()
    embedded = checkpoint.checkpoint_folder("embedded:lingbot-world-tiny")
    assert checkpoint.read_serving_defaults(embedded).served_model_name == "lingbot-world-tiny"


def test_model_index_names_the_real_classes(tiny):
    index = json.loads((tiny / "model_index.json").read_text())
    for key, value in PUBLISHED_INDEX.items():
        assert index[key] == value
    for key in ("transformer_2", "image_encoder", "image_processor"):
        assert index[key] in (None, [None, None])
    assert json.loads((tiny / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKLWan"
    assert json.loads((tiny / "transformer" / "config.json").read_text())["_class_name"] == (
        "CausalLingBotWorldTransformer3DModel"
    )
    assert json.loads((tiny / "text_encoder" / "config.json").read_text())["architectures"] == ["UMT5EncoderModel"]


def test_transformer_is_sharded_with_original_names(tiny):
    folder = tiny / "transformer"
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    shards = sorted({p.name for p in folder.glob("*.safetensors")})
    assert len(shards) >= 2
    assert all(re.fullmatch(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors", s) for s in shards)
    assert sorted(set(weight_map.values())) == shards
    on_disk = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            on_disk.update({name: shard for name in handle.keys()})
    assert on_disk == weight_map
    names = set(weight_map)
    # original Wan names, incl. the norm3 (affine, before cross-attention) trap and the camera tensors
    for name in (
        "blocks.0.self_attn.q.weight",
        "blocks.0.cross_attn.o.bias",
        "blocks.0.norm3.weight",
        "blocks.0.ffn.0.weight",
        "blocks.0.modulation",
        "blocks.1.cam_scale_layer.weight",
        "patch_embedding_wancamctrl.weight",
        "c2ws_hidden_states_layer2.bias",
        "time_projection.1.weight",
        "text_embedding.0.weight",
        "head.head.weight",
        "head.modulation",
    ):
        assert name in names, name
    assert not [n for n in names if "attn1" in n or "attn2" in n or "to_q" in n or "scale_shift_table" in n]


def test_loads_through_pipeline_with_the_built_weights(tiny):
    loaded = load_pipeline(tiny)
    assert isinstance(loaded.transformer, CausalLingBotWorldTransformer3DModel)
    assert isinstance(loaded.vae, StreamingWanVAE)
    assert loaded.prompt_encoder.encode("a street").shape == (1, 512, loaded.transformer.config.text_dim)
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    assert (loaded.defaults.width, loaded.defaults.height) == (160, 96)
    assert loaded.defaults.shift == 10.0 and loaded.defaults.timestep_indices == (0, 179, 358, 679)

    want = build_tiny_transformer(seed=0).state_dict()
    got = loaded.transformer.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    other = build_tiny_transformer(seed=1).state_dict()
    assert not torch.equal(other["proj_out.weight"], got["proj_out.weight"])


def test_engine_runs_at_the_default_size(tiny):
    from lingbot_ray.control.conditions import ChunkConditions
    from lingbot_ray.engine import RealtimeEngine, SessionSpec

    engine = RealtimeEngine.from_pretrained(tiny)
    width, height = engine.defaults.width, engine.defaults.height
    image = np.full((height, width, 3), 128, np.uint8)
    state = engine.new_session(SessionSpec(prompt="a forest", image=image, width=width, height=height))
    out = engine.step(state, ChunkConditions(prompt=None, camera_actions=((),) * 3, event_id=None))
    engine.close(state)
    assert out.frames.shape == (9, height, width, 3)


def test_missing_component_folder_is_named(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    shutil.rmtree(folder / "vae")
    checkpoint.read_model_index(folder)  # the index itself is fine
    with pytest.raises(checkpoint.ComponentMissingError, match="'vae'"):
        load_pipeline(folder, components=("transformer",))
    with pytest.raises(FileNotFoundError, match="'vae'"):
        loading.load_vae(folder)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("_class_name", "WanImageToVideoPipeline", "_class_name='WanImageToVideoPipeline'"),
        ("vae", ["diffusers", "AutoencoderKL"], "vae="),
        ("transformer", None, "transformer=None"),
        ("transformer_2", ["diffusers", "WanTransformer3DModel"], "transformer_2="),
    ],
)
def test_bad_model_index_names_the_key(tiny, tmp_path, key, value, match):
    folder = copy_of(tiny, tmp_path)
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index[key] = value
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(match)):
        checkpoint.read_model_index(folder)


def test_serving_defaults_reject_unknown_keys(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    path = folder / "lingbot_ray.json"
    path.write_text(json.dumps({"width": 160, "heigth": 96}))
    with pytest.raises(ValueError, match="heigth"):
        checkpoint.read_serving_defaults(folder)
    path.unlink()
    assert checkpoint.read_serving_defaults(folder) == checkpoint.ServingDefaults()


def test_cli_refuses_to_overwrite_without_force(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        build_tiny_main([str(tiny)])
    assert exc.value.code == 2
    assert "--force" in capsys.readouterr().err

    stranger = tmp_path / "not-a-checkpoint"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        build_tiny_main([str(stranger), "--force"])
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_cli_force_rebuilds_with_a_new_seed(tiny, tmp_path, capsys):
    folder = copy_of(tiny, tmp_path)
    before = loading.load_dit(folder, dtype=torch.float32).state_dict()["proj_out.weight"]
    assert build_tiny_main([str(folder), "--force", "--seed", "5", "--size", "64x48"]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    after = loading.load_dit(folder, dtype=torch.float32).state_dict()["proj_out.weight"]
    assert not torch.equal(before, after)
    assert (checkpoint.read_serving_defaults(folder).width, checkpoint.read_serving_defaults(folder).height) == (64, 48)
