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


def test_a_compiling_dit_replica_warms_up_before_it_is_ready_and_compiles_nothing_for_a_session(tmp_path):
    import numpy as np
    from torch._dynamo.utils import counters

    from lingbot_ray.control.conditions import ChunkConditions
    from lingbot_ray.engine import RealtimeEngine, SessionSpec
    from lingbot_ray.serve.dit_group import RankGroup

    folder = build_tiny_checkpoint(tmp_path / "tiny")
    config = load_config({"model": {"path": str(folder)}, "dit": {"compile": "default"}})
    group = RankGroup(config, run_local=None)  # builds rank 0 and warms it up
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    # a session at the checkpoint's default size runs on the warmed graphs
    loaded = RealtimeEngine.from_pretrained(folder)
    engine = RealtimeEngine(loaded.text, group.local.stage, loaded.vae)
    defaults = group.local.defaults

    def session():
        image = np.zeros((defaults.height, defaults.width, 3), np.uint8)
        state = engine.new_session(SessionSpec(prompt="x", image=image, width=defaults.width, height=defaults.height))
        for _ in range(4):
            engine.step(state, ChunkConditions(prompt=None, camera_actions=((),) * 3, event_id=None))
        engine.close(state)

    assert all(block._compiled_call_impl is not None for block in group.local.stage.model.blocks)
    session()
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(ValueError, match=r"dit.compile='jit'"):
        load_config({"dit": {"compile": "jit"}})
