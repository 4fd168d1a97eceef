"""``model.path``: a folder, or ``embedded:NAME`` for a checkpoint shipped inside the package."""

from pathlib import Path

import pytest

import lingbot_ray
from lingbot_ray.checkpoint import checkpoint_folder, embedded_checkpoints, ensure_checkpoint
from lingbot_ray.serve.config import load_config


def test_the_world_model_ships_in_the_package():
    assert "lingbot-world-tiny" in embedded_checkpoints()
    folder = checkpoint_folder("embedded:lingbot-world-tiny")
    assert folder == Path(lingbot_ray.__file__).resolve().parent / "checkpoints" / "lingbot-world-tiny"
    assert ensure_checkpoint("embedded:lingbot-world-tiny") == folder


@pytest.mark.parametrize("name", ["nope", "../models", "lingbot-world-tiny/../..", ""])
def test_an_unknown_embedded_name_is_refused_with_the_shipped_list(name):
    with pytest.raises(FileNotFoundError, match=r"model.path='embedded:.*'.*shipped: \['lingbot-world-tiny'"):
        checkpoint_folder(f"embedded:{name}")


def test_plain_paths_stay_paths(tmp_path):
    assert checkpoint_folder(str(tmp_path)) == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        ensure_checkpoint(str(tmp_path / "absent"))


def test_the_served_name_drops_the_prefix():
    assert load_config({"model": {"path": "embedded:lingbot-world-tiny"}}).served_model_name == "lingbot-world-tiny"


def test_checkpoint_settings_lay_a_lingbot_ray_json_over_a_folder_one_cannot_write(tmp_path, monkeypatch):
    """model.checkpoint_settings (e.g. the v2 14B diffusers repo, whose files match v1's): an overlay
    of links with the merged lingbot_ray.json; the folder itself is untouched, its weights load
    through the links, and a bad key is refused by name."""
    import os
    import stat

    from lingbot_ray.checkpoint import SERVING_DEFAULTS_FILE, ensure_checkpoint, read_checkpoint_layout, read_serving_defaults
    from lingbot_ray.engine.stages import DiTStage
    from lingbot_ray.models.tiny import build_tiny_checkpoint

    monkeypatch.setenv("LINGBOT_RAY_CACHE", str(tmp_path / "cache"))
    folder = build_tiny_checkpoint(tmp_path / "tiny")
    before = (folder / SERVING_DEFAULTS_FILE).read_text() if (folder / SERVING_DEFAULTS_FILE).exists() else None
    os.chmod(folder, stat.S_IRUSR | stat.S_IXUSR)  # read-only, as a hub snapshot or a shared volume
    try:
        settings = {"model_version": "v2-14b", "shift": 5.0, "timestep_indices": [0, 250, 500, 750]}
        overlay = ensure_checkpoint(str(folder), settings=settings)
        assert overlay != folder and ensure_checkpoint(str(folder), settings=settings) == overlay
        assert read_checkpoint_layout(overlay).version == "v2-14b" and read_checkpoint_layout(folder).version == "v1"
        defaults = read_serving_defaults(overlay)
        assert (defaults.shift, defaults.timestep_indices) == (5.0, (0, 250, 500, 750))
        assert ((folder / SERVING_DEFAULTS_FILE).read_text() if before is not None else None) == before
        assert DiTStage.from_pretrained(overlay).sampler.shift == 5.0  # the weights load through the links
        assert ensure_checkpoint(str(folder)) == folder  # no settings: the folder itself
        with pytest.raises(ValueError, match="lingbot_ray.json keys=\\['shfit'\\]"):
            ensure_checkpoint(str(folder), settings={"shfit": 5.0})
    finally:
        os.chmod(folder, stat.S_IRWXU)
