"""Shared helpers of the engine tests (fixtures live in conftest.py)."""

from lingbot_ray.control.conditions import ChunkConditions

# Small test frames keep every chunk in the tens of milliseconds; the tiny checkpoint's own default
# size is exercised by tests/models/test_tiny.py and the benchmark.
WIDTH, HEIGHT = 64, 48


def conditions(actions=(), frames=3, prompt=None, event_id=None):
    """Conditions of one chunk: the same action list on each of its ``frames`` latent frames."""
    return ChunkConditions(prompt=prompt, camera_actions=(tuple(actions),) * frames, event_id=event_id)


def run(engine, spec, chunk_conditions):
    """Frames of each chunk of a fresh session, closing it afterwards."""
    state = engine.new_session(spec)
    try:
        return [engine.step(state, c).frames for c in chunk_conditions]
    finally:
        engine.close(state)
