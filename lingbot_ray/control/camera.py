"""Camera actions → camera-to-world poses (docs/MODEL.md, "Camera actions → Plücker map").

Conventions: OpenCV camera axes (x right, y down, z forward), poses are camera-to-world 4×4
matrices ``[[R, t], [0, 1]]`` in float64.

Decisions where the spec leaves room:

* **Every latent frame's actions move the camera**, latent frame 0's included: the path starts at
  identity and frame k's pose is that start moved by the actions of frames 0…k, as the reference
  server integrates it (docs/MODEL.md, "Camera actions → Plücker map"). The conditioning is relative
  to frame 0's pose, so a first move or yaw cancels out there; a first pitch does not (it tilts the
  axes the later steps are seen in, and counts towards the pitch limit).
* **Within one latent frame** the tokens are a set of held keys (duplicates count once, opposite
  keys cancel); the rotation is applied first, then the translation along the *new* heading. What
  each token does comes from :data:`lingbot_ray.protocol.actions.ACTIONS`: rotate x is pitch (about
  the camera's own x axis), rotate y is yaw (about the world vertical), translate z and x move
  forward and right, kept horizontal.
* **Frame-to-frame deltas** (docs/MODEL.md, "Conditioning poses"): ``pose_0 = I`` and ``pose_k =
  inv(rel_{k−1})·rel_k`` with ``rel_k = inv(c2w_0)·c2w_k``, translations divided by the largest
  translation norm *of those deltas*. That is the default (``framewise=True``); ``framewise=False``
  gives the plain relative-to-first poses instead. "The history" is every latent frame of the
  session so far, up to and including the chunk's last.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..protocol.actions import ACTIONS

# Focal length in pixels at every frame size, as the reference server sets it (docs/MODEL.md).
REFERENCE_FOCAL = 500.0


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels of the generated frame."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError(f"focal lengths must be positive, got fx={self.fx}, fy={self.fy}")

    @classmethod
    def default(cls, width: int, height: int, focal: float = REFERENCE_FOCAL) -> Intrinsics:
        """fx = fy = ``focal``, principal point at the image centre."""
        return cls(fx=focal, fy=focal, cx=width / 2, cy=height / 2)

    @classmethod
    def for_frame(cls, width: int, height: int, focal: tuple[float, int, int] | None = None) -> Intrinsics:
        """The camera input's intrinsics for a ``width`` x ``height`` session (docs/MODEL.md,
        "Camera actions → Plücker map", step 3).

        ``focal`` None: the reference server's 500 px at every size. ``(f, w0, h0)``: ``f`` px at
        ``w0`` x ``h0``, resized per axis to the session size (``fx = f·width/w0``, ``fy =
        f·height/h0``), as the authors' script resizes its intrinsics.
        """
        if focal is None:
            return cls.default(width, height)
        f, at_width, at_height = focal
        return cls(fx=f * width / at_width, fy=f * height / at_height, cx=width / 2, cy=height / 2)


def _rot_x(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _horizontal(v: np.ndarray) -> np.ndarray:
    """``v`` projected to the x-z plane and normalised (zero if it has no horizontal part)."""
    flat = np.array([v[0], 0.0, v[2]])
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 1e-12 else np.zeros(3)


def se3_inverse(poses: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms ``[..., 4, 4]`` (exact transpose, no general inversion)."""
    rot_t = np.swapaxes(poses[..., :3, :3], -1, -2)
    out = np.zeros_like(poses)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rot_t, poses[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


class CameraTrajectory:
    """One session's camera path, integrated from identity one latent frame at a time.

    ``max_history`` bounds the poses kept (the first one and the most recent ``max_history``): a
    served session runs for as long as its client stays, so its state must not grow with its
    length. :meth:`chunk_c2w` of ``F`` frames needs ``F + 1`` recent poses when ``framewise``.
    ``None`` keeps every pose (the world tools read whole trajectories through :attr:`poses`).
    """

    def __init__(
        self,
        *,
        pitch_step_deg: float = 4.0,
        yaw_step_deg: float = 6.0,
        move_step: float = 0.05,
        pitch_limit_deg: float = 85.0,
        framewise: bool = True,
        max_history: int | None = None,
    ) -> None:
        if not 0 <= pitch_limit_deg < 90:
            raise ValueError(f"pitch_limit_deg must be in [0, 90), got {pitch_limit_deg}")
        if max_history is not None and max_history < 2:
            raise ValueError(f"max_history must be >= 2 or None, got {max_history}")
        self.pitch_step_deg = pitch_step_deg
        self.yaw_step_deg = yaw_step_deg
        self.move_step = move_step
        self.pitch_limit_deg = pitch_limit_deg
        self.framewise = framewise
        self._rotation = np.eye(3)
        self._position = np.zeros(3)
        self._pitch_deg = 0.0
        self._first: np.ndarray | None = None
        self._poses: deque[np.ndarray] = deque(maxlen=max_history)
        self._count = 0
        # Running max of the conditioning translations' norms, so a chunk needs no full rescan.
        self._max_translation = 0.0

    @property
    def num_frames(self) -> int:
        return self._count

    @property
    def pitch_deg(self) -> float:
        return self._pitch_deg

    @property
    def poses(self) -> np.ndarray:
        """Absolute camera-to-world poses of the kept latent frames, ``[N, 4, 4]``: every frame so far
        unless ``max_history`` bounds them."""
        return np.stack(self._poses) if self._poses else np.zeros((0, 4, 4))

    def advance(self, actions: Iterable[str]) -> np.ndarray:
        """Add the next latent frame, moved by ``actions``; returns its absolute pose."""
        self._step(set(actions))
        pose = np.eye(4)
        pose[:3, :3] = self._rotation
        pose[:3, 3] = self._position
        if self._poses:
            reference = self._poses[-1] if self.framewise else self._first
            moved = np.linalg.norm(pose[:3, 3] - reference[:3, 3])
            self._max_translation = max(self._max_translation, float(moved))
        if self._first is None:
            self._first = pose
        self._poses.append(pose)
        self._count += 1
        return pose.copy()

    def extend(self, actions_per_frame: Iterable[Iterable[str]]) -> None:
        for actions in actions_per_frame:
            self.advance(actions)

    def _step(self, keys: set[str]) -> None:
        pitch = self.pitch_step_deg * ACTIONS.step(keys, "rotate", "x")
        if pitch and abs(self._pitch_deg + pitch) > self.pitch_limit_deg + 1e-9:
            pitch = 0.0  # a step that would pass the limit is skipped, not clipped
        yaw = self.yaw_step_deg * ACTIONS.step(keys, "rotate", "y")
        if pitch or yaw:
            self._pitch_deg += pitch
            # Yaw about the world vertical, pitch about the camera's own x axis: no roll builds up.
            self._rotation = _rot_y(yaw) @ self._rotation @ _rot_x(pitch)
        forward = ACTIONS.step(keys, "translate", "z")
        right = ACTIONS.step(keys, "translate", "x")
        if forward or right:
            self._position = self._position + self.move_step * (
                forward * _horizontal(self._rotation[:, 2]) + right * _horizontal(self._rotation[:, 0])
            )

    def chunk_c2w(self, num_frames: int) -> np.ndarray:
        """Conditioning poses ``[F, 4, 4]`` (float64) for the last ``num_frames`` latent frames.

        Relative to the first frame, frame-to-frame deltas when ``framewise``, translations divided
        by the largest translation norm of the session's history (unchanged when nothing moved).
        """
        if not 1 <= num_frames <= self._count:
            raise ValueError(f"num_frames {num_frames} must be in [1, {self._count}] (frames so far)")
        start = self._count - num_frames
        needed = self._count - (max(start - 1, 0) if self.framewise else start)
        if needed > len(self._poses):
            raise ValueError(f"num_frames {num_frames} needs {needed} recent poses; max_history keeps {len(self._poses)}")
        recent = list(self._poses)[len(self._poses) - needed :]
        relative = se3_inverse(self._first) @ np.stack(recent)
        if needed == self._count:
            relative[0] = np.eye(4)  # frame 0 relative to itself, without rounding residue
        if self.framewise:
            deltas = se3_inverse(relative[:-1]) @ relative[1:]
            out = deltas if start > 0 else np.concatenate([np.eye(4)[None], deltas])
        else:
            out = relative
        if self._max_translation > 0:
            out[:, :3, 3] /= self._max_translation
        return out
