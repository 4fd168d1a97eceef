"""The DiT's opt-in speed settings (lingbot_ray/engine/fastpath.py)."""

import numpy as np
import pytest

from lingbot_ray.engine import RealtimeEngine
from lingbot_ray.engine.fastpath import use_attention_backend

from .helpers import conditions, run


def test_the_native_attention_backend_gives_the_default_frames_and_a_missing_kernel_is_named(tiny_folder, make_spec):
    default = RealtimeEngine.from_pretrained(tiny_folder)
    native = RealtimeEngine.from_pretrained(tiny_folder)
    use_attention_backend(native.dit, "native")
    processors = {type(m.processor).__name__: m.processor._attention_backend for m in native.dit.model.modules() if hasattr(m, "processor")}
    assert processors and all(str(getattr(b, "value", b)) == "native" for b in processors.values()), processors
    chunks = [conditions(["w"]), conditions(["l"]), conditions([])]
    for a, b in zip(run(default, make_spec(), chunks), run(native, make_spec(), chunks)):
        assert np.array_equal(a, b)
    # flash-attn is not installed here (and needs CUDA): the setting is refused by name, at start
    with pytest.raises(ValueError, match=r"model.attention_backend='flash': .*flash-attn"):
        use_attention_backend(native.dit, "flash")
    with pytest.raises(ValueError, match=r"model.attention_backend='fastest': .*must be one of"):
        use_attention_backend(native.dit, "fastest")
