"""The camera action table is the one vocabulary: every reader agrees with it, and a token added to
(a copy of) the table reaches every reader without another edit."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import lingbot_ray
from lingbot_ray.client.record import KeyHolds
from lingbot_ray.client.session import parse_actions
from lingbot_ray.control import CameraTrajectory, ConditionQueue, clean_actions
from lingbot_ray.protocol import ACTIONS, ActionTable, Motion, StateTransition, decode_event, decode_init
from lingbot_ray.world import dataset, quality

EVERY_LETTER = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def test_the_table_means_what_the_keyboard_says():
    meaning = {m.token: (m.kind, m.axis, m.sign, m.label) for m in ACTIONS}
    assert meaning == {
        "w": ("translate", "z", 1, "move forward"),
        "s": ("translate", "z", -1, "move back"),
        "a": ("translate", "x", -1, "move left"),
        "d": ("translate", "x", 1, "move right"),
        "i": ("rotate", "x", 1, "look up"),
        "k": ("rotate", "x", -1, "look down"),
        "j": ("rotate", "y", -1, "look left"),
        "l": ("rotate", "y", 1, "look right"),
    }
    assert {key: m.token for m in ACTIONS for key in m.keys} == {
        "arrowup": "i", "arrowdown": "k", "arrowleft": "j", "arrowright": "l",
    }


@pytest.mark.parametrize(
    "motion, match",
    [
        (Motion(token="W", kind="translate", axis="z", sign=1, label="x"), "token='W'"),
        (Motion(token="up", kind="translate", axis="z", sign=1, label="x"), "token='up'"),
        (Motion(token="q", kind="translate", axis="y", sign=1, label="x"), "translate y"),
        (Motion(token="q", kind="rotate", axis="z", sign=1, label="x"), "rotate z"),
        (Motion(token="q", kind="rotate", axis="x", sign=2, label="x"), "sign=2"),
        (Motion(token="w", kind="rotate", axis="x", sign=1, label="x"), "'w' is bound twice"),
        (Motion(token="q", kind="rotate", axis="x", sign=1, label="x", keys=("arrowup",)), "'arrowup' is bound twice"),
    ],
)
def test_a_bad_entry_is_refused_naming_it(motion, match):
    with pytest.raises(ValueError, match=match):
        ActionTable([*ACTIONS, motion])


def test_protocol_validation_keeps_exactly_the_tables_tokens():
    init = decode_init(
        {"type": "init", "prompt": "p", "first_frame": b"x", "condition_inputs": {"camera_actions": [EVERY_LETTER]}},
        served_model="m",
    )
    assert init.camera_script == [sorted(ACTIONS.tokens)]
    payload = {"mode": "state", "transitions": [{"actions": EVERY_LETTER}]}
    event = decode_event({"type": "event", "kind": "camera_actions", "payload": payload})
    assert event.camera_state == [StateTransition(tuple(sorted(ACTIONS.tokens)))]


def test_the_queue_and_the_client_tools_keep_exactly_the_tables_tokens():
    assert clean_actions(EVERY_LETTER) == tuple(sorted(ACTIONS.tokens))
    queue = ConditionQueue([EVERY_LETTER])
    assert queue.sample(1, 0).camera_actions == (tuple(sorted(ACTIONS.tokens)),)
    assert parse_actions("+".join(ACTIONS.tokens)) == [list(ACTIONS.tokens)]
    with pytest.raises(ValueError, match="unknown keys"):
        parse_actions("x")
    holds = KeyHolds()
    assert [holds.press(key, 0.0) is not None for key in EVERY_LETTER] == [key in ACTIONS for key in EVERY_LETTER]
    assert quality.ACTIONS == ACTIONS.tokens


def _rotation(axis: str, degrees: float) -> np.ndarray:
    """Right-hand rotation about a camera axis."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    out = np.eye(3)
    out[i, i], out[i, j], out[j, i], out[j, j] = c, -s, s, c
    return out


@pytest.mark.parametrize("motion", list(ACTIONS), ids=ACTIONS.tokens)
def test_the_camera_moves_as_the_table_says(motion):
    camera = CameraTrajectory()
    camera.extend([[], [motion.token]])
    pose = camera.poses[1]
    if motion.kind == "translate":
        step = np.zeros(3)
        step["xyz".index(motion.axis)] = motion.sign * camera.move_step
        np.testing.assert_allclose(pose[:3, 3], step, atol=1e-12)
        np.testing.assert_array_equal(pose[:3, :3], np.eye(3))
    else:
        degrees = {"x": camera.pitch_step_deg, "y": camera.yaw_step_deg}[motion.axis]
        np.testing.assert_allclose(pose[:3, :3], _rotation(motion.axis, motion.sign * degrees), atol=1e-12)
        np.testing.assert_array_equal(pose[:3, 3], np.zeros(3))


def test_the_dataset_bits_are_the_tables_and_stay_what_is_on_disk():
    # datasets on disk were written with these bits: they must never change
    on_disk = {"w": 0, "s": 1, "a": 2, "d": 3, "i": 4, "k": 5, "j": 6, "l": 7}
    assert {token: ACTIONS.bit(token) for token in ACTIONS.tokens} == on_disk
    masks = dataset.encode_actions([[token] for token in ACTIONS.tokens] + [list(ACTIONS.tokens)])
    assert masks.dtype == np.uint8 and masks.tolist() == [1 << bit for bit in on_disk.values()] + [255]
    assert dataset.ACTION_KEYS == "wsadikjl"
    with pytest.raises(ValueError, match="'x'"):
        dataset.encode_actions([["x"]])


def test_the_description_is_json_in_table_order_with_bits():
    described = json.loads(json.dumps(ACTIONS.describe()))
    assert [(m["token"], m["bit"]) for m in described["actions"]] == [(t, ACTIONS.bit(t)) for t in ACTIONS.tokens]
    assert described["actions"][4] == {
        "token": "i", "kind": "rotate", "axis": "x", "sign": 1, "label": "look up", "keys": ["arrowup"], "bit": 4,
    }


FLOW_THROUGH = """
import numpy as np, lingbot_ray
from lingbot_ray.protocol import ACTIONS, decode_event, decode_init
from lingbot_ray.control import CameraTrajectory, ConditionQueue
from lingbot_ray.client.session import parse_actions
from lingbot_ray.client.record import KeyHolds
from lingbot_ray.world import dataset, quality

assert lingbot_ray.__file__.startswith(ROOT), lingbot_ray.__file__
assert ACTIONS.tokens[-1] == "u" and ACTIONS.describe()["actions"][-1]["bit"] == 8
init = decode_init({"type": "init", "prompt": "p", "first_frame": b"x",
                    "condition_inputs": {"camera_actions": [["u", "q"]]}}, served_model="m")
assert init.camera_script == [["u"]]
event = decode_event({"type": "event", "kind": "camera_actions", "payload": {"mode": "state", "transitions": [{"actions": ["u"]}]}})
queue = ConditionQueue()
queue.push_camera_state(event.camera_state)
assert queue.sample(1, 0).camera_actions == (("u",),)
alternate, walk = CameraTrajectory(), CameraTrajectory()
alternate.extend([[], ["u"]])
walk.extend([[], ["w"]])
assert np.array_equal(alternate.poses, walk.poses)
masks = dataset.encode_actions([["u"], ["w", "u"]])
assert masks.dtype == np.uint16 and masks.tolist() == [256, 257]
assert dataset.decode_actions(masks) == [["u"], ["w", "u"]] and dataset.ACTION_KEYS.endswith("u")
assert ["u"] in dataset.ACTION_SETS and ["u", "j"] in dataset.ACTION_SETS
assert parse_actions("u*2") == [["u"], ["u"]] and KeyHolds().press("u", 0.0) == ["u"]
assert quality.ACTIONS[-1] == "u"
print("flowed through")
"""


def test_a_token_added_to_a_copy_of_the_table_reaches_every_reader(tmp_path):
    package = Path(lingbot_ray.__file__).parent
    copy = tmp_path / "lingbot_ray"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("checkpoints", "webui", "__pycache__", "*.json"))
    with open(copy / "protocol" / "actions.py", "a") as table:
        table.write('\nACTIONS = ActionTable([*ACTIONS, Motion(token="u", kind="translate", axis="z", sign=1, label="walk")])\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    code = f"ROOT = {str(tmp_path)!r}\n" + textwrap.dedent(FLOW_THROUGH)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "flowed through"
