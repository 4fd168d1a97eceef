import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lingbot_ray import protocol
from lingbot_ray.control import ChunkConditions, ConditionQueue, StateTransition
from lingbot_ray.protocol import decode_event


def state(*action_lists):
    return [StateTransition(tuple(actions), 10 * i) for i, actions in enumerate(action_lists)]


# -- prompt -------------------------------------------------------------------------------------


def test_prompt_never_applies_to_chunk_zero_and_waits_for_chunk_one():
    q = ConditionQueue()
    q.push_prompt("a red door", event_id=3)
    first = q.sample(3, chunk_index=0)
    assert first.prompt is None and first.event_id is None
    assert q.pending_prompt == "a red door"
    second = q.sample(3, chunk_index=1)
    assert second.prompt == "a red door" and second.event_id == 3
    assert q.pending_prompt is None
    assert q.sample(3, chunk_index=2).prompt is None


def test_latest_prompt_wins():
    q = ConditionQueue()
    q.sample(3, 0)
    q.push_prompt("first", event_id=1)
    q.push_prompt("second", event_id=2)
    out = q.sample(3, 1)
    assert out == ChunkConditions(prompt="second", camera_actions=((),) * 3, event_id=2)


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="prompt"):
        ConditionQueue().push_prompt("   ")


# -- camera script ------------------------------------------------------------------------------


def test_initial_script_is_consumed_per_latent_frame_then_padded_with_empty():
    q = ConditionQueue(initial_script=[["w"], ["w", "l"], ["a"], ["s"]])
    assert q.sample(3, 0).camera_actions == (("w",), ("w", "l"), ("a",))
    assert q.sample(3, 1).camera_actions == (("s",), (), ())
    assert q.sample(3, 2).camera_actions == ((), (), ())
    assert q.event_id is None  # the init carries no event id


def test_new_script_replaces_pending_script():
    q = ConditionQueue(initial_script=[["w"]] * 10)
    q.sample(3, 0)
    q.push_camera_script([["d"], ["d"]], event_id=5)
    assert q.pending_script == (("d",), ("d",))
    out = q.sample(3, 1)
    assert out.camera_actions == (("d",), ("d",), ()) and out.event_id == 5


def test_unknown_tokens_are_dropped():
    q = ConditionQueue()
    q.push_camera_script([["w", "jump", "x"], ["Q"], ["i", "i"]])
    assert q.sample(3, 0).camera_actions == (("w",), (), ("i",))
    q.push_camera_state([StateTransition(("space", "d"))])
    assert q.sample(1, 1).camera_actions == (("d",),)
    assert q.held_state == ("d",)


def test_script_cap_rejects_long_scripts_and_changes_nothing():
    q = ConditionQueue(initial_script=[["w"]])
    q.push_camera_script([["a"]] * 512)
    with pytest.raises(ValueError, match="513"):
        q.push_camera_script([["d"]] * 513, event_id=9)
    assert q.pending_script == (("a",),) * 512
    with pytest.raises(ValueError, match="600"):
        ConditionQueue(initial_script=[[]] * 600)


# -- camera state -------------------------------------------------------------------------------


def test_held_state_repeats_without_new_transitions():
    q = ConditionQueue()
    q.push_camera_state(state(["w"]))
    assert q.sample(3, 0).camera_actions == (("w",),) * 3
    assert q.sample(3, 1).camera_actions == (("w",),) * 3
    q.push_camera_state(state([]))
    assert q.sample(3, 2).camera_actions == ((),) * 3
    assert q.held_state == ()


def test_press_and_release_between_boundaries_is_a_one_frame_pulse():
    q = ConditionQueue()
    q.push_camera_state(state(["l"], []))
    assert q.sample(3, 0).camera_actions == (("l",), (), ())
    assert q.held_state == ()
    assert q.sample(3, 1).camera_actions == ((), (), ())


# Reference behaviour (SGLang-diffusion's realtime state queue, ControlStateQueue in
# control_signals.py, used by its LingBot World adapter with one pulse frame): the pulse candidate
# is the latest drained transition that holds any key, and it is used for the first latent frame
# only if it differs from the final state. So a pulse shows only when every key was released by
# the boundary. Each case: transitions drained at one boundary -> the chunk's three frames.
REFERENCE_PULSES = [
    ([["a"], ["w"]], [["w"], ["w"], ["w"]]),  # docs/PROTOCOL.md's example: no [a, w, w]
    ([["a"], []], [["a"], [], []]),
    ([["w"], ["w", "d"], ["w"]], [["w"], ["w"], ["w"]]),  # a tap while holding w is not shown
    ([["a"], ["w"], []], [["w"], [], []]),  # the latest non-empty one, not the first
    ([["i"], [], ["j"], []], [["j"], [], []]),
    ([["w"], [], ["w"]], [["w"], ["w"], ["w"]]),
    ([["d", "w"], ["w", "d"]], [["w", "d"], ["w", "d"], ["w", "d"]]),  # same keys, other order
    ([[], []], [[], [], []]),
]


@pytest.mark.parametrize("transitions, frames", REFERENCE_PULSES)
def test_state_pulses_follow_the_reference_rule(transitions, frames):
    q = ConditionQueue()
    q.push_camera_state(state(*transitions))
    assert q.sample(3, 0).camera_actions == tuple(tuple(f) for f in frames)
    assert q.held_state == tuple(transitions[-1])
    assert q.sample(3, 1).camera_actions == (tuple(transitions[-1]),) * 3


def test_pulse_with_a_single_latent_frame_then_final_state_holds():
    q = ConditionQueue()
    q.push_camera_state(state(["a"], []))
    assert q.sample(1, 0).camera_actions == (("a",),)
    assert q.sample(1, 1).camera_actions == ((),)


def test_transitions_accumulate_across_events_until_drained():
    q = ConditionQueue()
    q.push_camera_state(state(["k"]), event_id=1)
    q.push_camera_state(state([]), event_id=2)
    out = q.sample(2, 0)
    assert out.camera_actions == (("k",), ()) and out.event_id == 2


def test_transition_cap_drops_the_oldest():
    q = ConditionQueue()
    q.push_camera_state(state(*([["i"]] + [["w"]] * 511)))
    q.push_camera_state(state(["d"]))
    pending = q.pending_transitions
    assert len(pending) == 512
    assert pending[0] == StateTransition(actions=("w",), client_ts_ms=10)  # the "i" (ts 0) was dropped
    assert pending[-1].actions == ("d",)
    assert q.sample(2, 0).camera_actions == (("d",), ("d",))


def test_transitions_are_the_protocols_type_cleaned():
    decoded = decode_event(
        {"type": "event", "kind": "camera_actions", "payload": {"mode": "state", "transitions": [
            {"actions": ["w", "w", "zz"], "client_ts_ms": 7}, {"actions": ["a"]}]}}
    )
    q = ConditionQueue()
    q.push_camera_state(decoded.camera_state)
    assert q.pending_transitions == (StateTransition(("w",), 7), StateTransition(("a",), None))
    assert StateTransition is protocol.StateTransition
    for other in ({"actions": ["w"], "client_ts_ms": 1}, SimpleNamespace(actions=("w",), client_ts_ms=1)):
        with pytest.raises(ValueError, match="StateTransition"):
            q.push_camera_state([other])


# -- modes clear each other ---------------------------------------------------------------------


def test_script_event_drops_held_and_pending_state():
    q = ConditionQueue()
    q.push_camera_state(state(["w"]))
    q.sample(3, 0)
    q.push_camera_state(state(["d"]))
    q.push_camera_script([["l"]])
    assert q.held_state == () and q.pending_transitions == ()
    assert q.sample(3, 1).camera_actions == (("l",), (), ())
    assert q.sample(3, 2).camera_actions == ((), (), ())  # the old held "w" does not come back


def test_state_event_drops_the_pending_script():
    q = ConditionQueue(initial_script=[["w"]] * 9)
    q.sample(3, 0)
    q.push_camera_state(state(["a"]))
    assert q.pending_script == ()
    assert q.sample(3, 1).camera_actions == (("a",),) * 3


# -- event_id echo ------------------------------------------------------------------------------


def test_event_id_persists_until_another_event_is_sampled():
    q = ConditionQueue()
    q.push_camera_script([["w"]], event_id=4)
    assert [q.sample(3, i).event_id for i in range(3)] == [4, 4, 4]
    q.push_prompt("dusk", event_id=5)
    assert q.sample(3, 3).event_id == 5
    assert q.sample(3, 4).event_id == 5


def test_camera_sampling_overrides_prompt_sampling_in_one_chunk():
    q = ConditionQueue()
    q.sample(3, 0)
    q.push_camera_state(state(["w"]), event_id=10)
    q.push_prompt("snow", event_id=11)  # pushed later, but camera wins within the chunk
    out = q.sample(3, 1)
    assert out.prompt == "snow" and out.event_id == 10


def test_events_without_id_do_not_change_the_echo():
    q = ConditionQueue()
    q.push_camera_script([["w"]], event_id=1)
    q.sample(3, 0)
    q.push_prompt("rain")
    q.push_camera_state(state(["d"]))
    out = q.sample(3, 1)
    assert out.prompt == "rain" and out.camera_actions == (("d",),) * 3 and out.event_id == 1


def test_dropped_events_are_never_echoed():
    q = ConditionQueue()
    q.push_camera_script([["w"]], event_id=1)
    q.push_camera_script([["a"]])  # replaces 1 before it was sampled
    q.push_prompt("x", event_id=2)
    q.push_prompt("y")  # replaces 2
    q.sample(3, 0)
    assert q.sample(3, 1).event_id is None
    q.push_camera_state(state(["d"]), event_id=3)
    q.push_camera_script([["s"]])  # drops the transitions of 3
    assert q.sample(3, 2).event_id is None


def test_empty_script_event_is_still_echoed():
    q = ConditionQueue()
    q.push_camera_script([], event_id=8)
    assert q.sample(3, 0).event_id == 8


def test_held_state_repeat_does_not_resample_the_event():
    q = ConditionQueue()
    q.push_camera_state(state(["w"]), event_id=1)
    q.sample(3, 0)
    q.push_prompt("fog", event_id=2)
    assert q.sample(3, 1).event_id == 2  # repeating the held state is not sampling event 1 again


def test_composite_pushes_each_part_with_the_same_id():
    q = ConditionQueue()
    q.push_composite(["prompt", "camera_actions"], prompt="night", camera_state=state(["j"]), event_id=21)
    chunk0 = q.sample(3, 0)
    assert chunk0.prompt is None and chunk0.camera_actions == (("j",),) * 3 and chunk0.event_id == 21
    chunk1 = q.sample(3, 1)
    assert chunk1.prompt == "night" and chunk1.event_id == 21

    q.push_composite(["camera_actions"], prompt="ignored", camera_script=[["k"]], event_id=22)
    out = q.sample(3, 2)
    assert out.prompt is None and out.camera_actions == (("k",), (), ()) and out.event_id == 22


def test_composite_validates_every_part_before_applying_any():
    q = ConditionQueue()
    with pytest.raises(ValueError, match="513"):
        q.push_composite(["prompt", "camera_actions"], prompt="ok", camera_script=[[]] * 513, event_id=1)
    assert q.pending_prompt is None
    with pytest.raises(ValueError, match="camera_script"):
        q.push_composite(["camera_actions"], event_id=1)
    with pytest.raises(ValueError, match="input_types"):
        q.push_composite(["teleport"], event_id=1)
    with pytest.raises(ValueError, match="prompt"):
        q.push_composite(["prompt", "camera_actions"], prompt="", camera_state=state(["w"]))
    assert q.pending_transitions == ()


def test_sample_rejects_bad_arguments():
    q = ConditionQueue()
    with pytest.raises(ValueError, match="num_latent_frames"):
        q.sample(0, 0)
    with pytest.raises(ValueError, match="chunk_index"):
        q.sample(3, -1)


tokens = st.lists(st.sampled_from(list("wsadikjl") + ["x", "up"]), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.lists(tokens, min_size=1, max_size=8), st.integers(1, 4))
def test_drained_state_is_final_state_with_at_most_a_leading_pulse(action_lists, frames):
    q = ConditionQueue()
    q.push_camera_state([StateTransition(tuple(a)) for a in action_lists])
    out = q.sample(frames, 0).camera_actions
    final = tuple(dict.fromkeys(t for t in action_lists[-1] if t in "wsadikjl"))
    assert len(out) == frames and q.held_state == final
    assert all(frame == final for frame in out[1:])
    held = [set(a) & set("wsadikjl") for a in action_lists if set(a) & set("wsadikjl")]
    if out[0] != final:  # a pulse: only after a release, and it is the latest transition with keys
        assert not final and set(out[0]) == held[-1]
    else:
        assert final or not held


def test_conditions_module_imports_neither_torch_nor_numpy():
    code = (
        "import sys, lingbot_ray.control.conditions; "
        "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
