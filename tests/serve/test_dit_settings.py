"""The DiT replica applies the model section's speed settings when it starts."""

import pytest

from lingbot_ray.models.tiny import build_tiny_checkpoint
from lingbot_ray.serve.config import load_config
from lingbot_ray.serve.dit_group import DiTRank


def test_the_dit_replica_takes_its_attention_backend_from_the_config_and_refuses_a_missing_kernel(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "tiny")
    rank = DiTRank(load_config({"model": {"path": str(folder), "attention_backend": "native"}}))
    backends = {str(getattr(m.processor._attention_backend, "value", None)) for m in rank.stage.model.modules() if hasattr(m, "processor")}
    assert backends == {"native"}
    with pytest.raises(ValueError, match=r"model.attention_backend='xformers': "):
        DiTRank(load_config({"model": {"path": str(folder), "attention_backend": "xformers"}}))
