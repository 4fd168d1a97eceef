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
