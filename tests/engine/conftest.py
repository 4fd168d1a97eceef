import numpy as np
import pytest

from lingbot_ray.engine import RealtimeEngine, SessionSpec
from lingbot_ray.models.tiny import build_tiny_checkpoint

from .helpers import HEIGHT, WIDTH


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def engine(tiny_folder):
    return RealtimeEngine.from_pretrained(tiny_folder)


@pytest.fixture(scope="session")
def other_engine(tiny_folder):
    """A second, separately loaded engine on the same folder."""
    return RealtimeEngine.from_pretrained(tiny_folder)


@pytest.fixture(scope="session")
def image():
    rng = np.random.default_rng(1234)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture
def make_spec(image):
    def make(**changes):
        fields = dict(prompt="a quiet village street at dawn", image=image, width=WIDTH, height=HEIGHT, seed=7)
        fields.update(changes)
        return SessionSpec(**fields)

    return make

