"""Ray-cast a :class:`~lingbot_ray.world.scene.World` from camera-to-world poses (numpy, one core).

Conventions are those of :mod:`lingbot_ray.control.camera` and :func:`lingbot_ray.engine.plucker.plucker_map`:
OpenCV camera axes (x right, y down, z forward), poses are camera-to-world ``[[R, t], [0, 1]]``, and
the ray of pixel (u, v) leaves the camera centre ``t`` along ``normalize(R · ((u+0.5−cx)/fx,
(v+0.5−cy)/fy, 1))`` — exactly the Plücker direction channels, so the picture and the conditioning
agree. Colours are display-referred RGB in [0, 1] until the final uint8 conversion.

Video geometry (:func:`pixel_poses`): latent frame 0 is pixel frame 0 and every later latent frame k
covers pixel frames 4k−3 … 4k, the last of which has exactly latent pose k.

``python -m lingbot_ray.world.render --seed 3 --size 160x96 --actions "w*6,l*6" --out sheet.png``
writes a contact sheet of a rendered trajectory.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np

from ..control.camera import CameraTrajectory, Intrinsics
from .scene import Box, Sky, World
from .textures import floor_color, pattern_color

MODEL_WIDTH = 832
MODEL_FOCAL = 500.0  # the real model's focal length in pixels at 832×480 (≈ 80° horizontal FOV)
TEMPORAL_STRIDE = 4  # pixel frames per latent frame after the first

SKY_ID, FLOOR_ID, FIRST_OBJECT_ID = 0, 1, 2


def world_intrinsics(width: int, height: int) -> Intrinsics:
    """The real model's field of view at any size: ``fx = fy = 500·width/832``, centred principal point."""
    focal = MODEL_FOCAL * width / MODEL_WIDTH
    return Intrinsics(fx=focal, fy=focal, cx=width / 2, cy=height / 2)


# --------------------------------------------------------------------------------------------- poses


def _yaw_pitch(rotation: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in radians of ``R = Ry(yaw)·Rx(pitch)``, the form every trajectory pose has."""
    forward = rotation[:, 2]
    yaw = math.atan2(forward[0], forward[2])
    pitch = math.atan2(-forward[1], math.hypot(forward[0], forward[2]))
    return yaw, pitch


def _yaw_pitch_matrix(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    return ry @ rx


def pixel_poses(latent_poses: np.ndarray) -> np.ndarray:
    """Per-pixel-frame poses ``[1 + 4(N−1), 4, 4]`` from latent poses ``[N, 4, 4]``.

    Pixel frame 4k is latent pose k (copied exactly); pixel frame 4(k−1)+j, j = 1…3, sits at fraction
    j/4 between latent poses k−1 and k: position linearly, yaw and pitch angles linearly (yaw along the
    shorter way round). Poses must be roll-free ``Ry(yaw)·Rx(pitch)`` as :class:`CameraTrajectory`
    makes them; anything else raises ``ValueError``.
    """
    latent_poses = np.asarray(latent_poses, np.float64)
    if latent_poses.ndim != 3 or latent_poses.shape[1:] != (4, 4) or len(latent_poses) == 0:
        raise ValueError(f"latent_poses must have shape [N>=1, 4, 4], got {latent_poses.shape}")
    angles = []
    for pose in latent_poses:
        yaw, pitch = _yaw_pitch(pose[:3, :3])
        if not np.allclose(_yaw_pitch_matrix(yaw, pitch), pose[:3, :3], atol=1e-6):
            raise ValueError("pixel_poses needs roll-free rotations Ry(yaw)·Rx(pitch)")
        angles.append((yaw, pitch))
    out = [latent_poses[0]]
    for k in range(1, len(latent_poses)):
        (yaw0, pitch0), (yaw1, pitch1) = angles[k - 1], angles[k]
        yaw_delta = (yaw1 - yaw0 + math.pi) % (2 * math.pi) - math.pi
        t0, t1 = latent_poses[k - 1, :3, 3], latent_poses[k, :3, 3]
        for j in range(1, TEMPORAL_STRIDE):
            a = j / TEMPORAL_STRIDE
            pose = np.eye(4)
            pose[:3, :3] = _yaw_pitch_matrix(yaw0 + a * yaw_delta, pitch0 + a * (pitch1 - pitch0))
            pose[:3, 3] = (1 - a) * t0 + a * t1
            out.append(pose)
        out.append(latent_poses[k])
    return np.stack(out)


def trajectory_poses(actions: list[list[str]]) -> np.ndarray:
    """Latent poses ``[N, 4, 4]`` of an action script integrated by :class:`CameraTrajectory`."""
    camera = CameraTrajectory()
    camera.extend(actions)
    return camera.poses


# ------------------------------------------------------------------------------------------- tracing


@dataclass(frozen=True)
class RenderBuffers:
    """What :func:`render_buffers` returns: colour, ray distance to the hit (``inf`` for sky) and the
    hit id per pixel (0 sky, 1 floor, 2+i ``world.objects[i]``)."""

    rgb: np.ndarray  # uint8 [N, H, W, 3]
    depth: np.ndarray  # float32 [N, H, W]
    ids: np.ndarray  # int16 [N, H, W]


def camera_rays(intrinsics: Intrinsics, width: int, height: int) -> np.ndarray:
    """Camera-space rays ``[H, W, 3]`` (z = 1, not normalised) through the pixel centres."""
    u = (np.arange(width, dtype=np.float64) + 0.5 - intrinsics.cx) / intrinsics.fx
    v = (np.arange(height, dtype=np.float64) + 0.5 - intrinsics.cy) / intrinsics.fy
    rays = np.ones((height, width, 3), np.float32)
    rays[..., 0] = u[None, :]
    rays[..., 1] = v[:, None]
    return rays


def ray_directions(c2w: np.ndarray, intrinsics: Intrinsics, width: int, height: int) -> np.ndarray:
    """Unit world-space ray directions ``[H, W, 3]`` (float32) of one pose."""
    dirs = camera_rays(intrinsics, width, height) @ np.asarray(c2w, np.float32)[:3, :3].T
    return dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


_CORNER_BITS = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], bool)


def _screen_rects(
    lo: np.ndarray, hi: np.ndarray, c2w: np.ndarray, intrinsics: Intrinsics, width: int, height: int
) -> np.ndarray:
    """Pixel rectangles ``[K, 4]`` as ``(y0, y1, x0, x1)`` containing the projections of the boxes
    ``[lo_k, hi_k]``: the whole image for a box that straddles the camera plane, empty (y0 = y1) for
    one that cannot be seen."""
    corners = np.where(_CORNER_BITS, hi[:, None, :], lo[:, None, :]).astype(np.float64)
    cam = (corners - c2w[:3, 3]) @ c2w[:3, :3]  # world → camera: R^T (p − t), row-vector form
    z = cam[..., 2]
    in_front = z > 1e-3
    z = np.where(in_front, z, 1.0)
    u = intrinsics.fx * cam[..., 0] / z + intrinsics.cx
    v = intrinsics.fy * cam[..., 1] / z + intrinsics.cy
    rects = np.stack(
        [
            np.floor(v.min(axis=1)) - 1,
            np.ceil(v.max(axis=1)) + 1,
            np.floor(u.min(axis=1)) - 1,
            np.ceil(u.max(axis=1)) + 1,
        ],
        axis=1,
    )
    rects = np.clip(rects, 0, [height, height, width, width]).astype(np.int64)
    straddles = in_front.any(axis=1) & ~in_front.all(axis=1)
    rects[straddles] = (0, height, 0, width)
    hidden = ~in_front.any(axis=1) | (rects[:, 0] >= rects[:, 1]) | (rects[:, 2] >= rects[:, 3])
    rects[hidden] = 0
    return rects


def _sky_color(sky: Sky, dirs: np.ndarray) -> np.ndarray:
    """Colour ``[M, 3]`` of the sky along unit directions ``[M, 3]``."""
    up = -dirs[:, 1]
    gradient = np.sqrt(np.clip(up, 0, 1))[:, None]
    rgb = sky.horizon + gradient * (sky.zenith - sky.horizon)

    # Sun glow and disc.
    facing = dirs @ sky.sun_dir
    glow = 0.35 * np.exp((facing - 1) * 40) + (facing > 0.9985)
    rgb = rgb + np.clip(glow, 0, 1)[:, None] * (sky.sun_color - rgb)

    # Clouds on a plane far above, thinning towards the horizon.
    lift = np.maximum(up, 0.02)
    qx = dirs[:, 0] / lift * sky.cloud_scale
    qz = dirs[:, 2] / lift * sky.cloud_scale
    p = sky.cloud_phases
    density = (
        np.sin(qx * 1.3 + p[0]) * np.sin(qz * 1.1 + p[1])
        + 0.5 * np.sin(qx * 2.9 - qz * 2.3 + p[2])
        + 0.25 * np.sin(qx * 5.3 + qz * 6.1 + p[3])
    )
    cover = np.clip((density - (0.9 - 1.4 * sky.cloud_cover)) * 2.5, 0, 1) * np.clip(up * 6, 0, 1)
    rgb = rgb + (0.85 * cover)[:, None] * (sky.cloud_color - rgb)

    # Two ranges of mountains on the horizon, the near one drawn over the far one.
    azimuth = np.arctan2(dirs[:, 0], dirs[:, 2])
    elevation = np.arcsin(np.clip(up, -1, 1))
    for colour, waves, base in zip(sky.mountain_colors, sky.mountain_waves, sky.mountain_base, strict=True):
        ridge = base + (waves[:, 1] * np.sin(np.outer(azimuth, waves[:, 0]) + waves[:, 2])).sum(axis=1)
        inside = elevation < ridge
        haze = np.clip(1 - elevation[inside] / np.maximum(ridge[inside], 1e-3), 0, 1)[:, None] * 0.4
        rgb[inside] = colour + haze * (sky.horizon - colour)
    return rgb


def _shadow_reach(world: World) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per object: the horizontal offset of its contact shadow away from the sun ``[K, 2]`` (x, z),
    its softness ``[K]`` and whether it is round ``[K]``."""
    lo, _ = world.object_bounds
    height = np.minimum(world.eye_height - lo[:, 1], 1.0)
    sun = world.sky.sun_dir
    away = -np.array([sun[0], sun[2]], np.float32) / max(math.hypot(sun[0], sun[2]), 1e-6)
    round_ = np.array([not isinstance(obj, Box) for obj in world.objects], bool)
    return away * 0.2 * height[:, None], 0.12 + 0.2 * height, round_


def _apply_shadows(
    world: World, shade: np.ndarray, px: np.ndarray, pz: np.ndarray, c2w: np.ndarray, intrinsics: Intrinsics
) -> None:
    """Multiply ``shade [H, W]`` (in place) by the soft contact shadow of every solid whose shadow area
    is on screen; ``px, pz [H, W]`` are the floor points seen by each pixel."""
    if not world.objects:
        return
    lo, hi = world.object_bounds
    shift, soft, round_ = _shadow_reach(world)
    reach = np.abs(shift).max(axis=1) + soft
    floor_y = np.float32(world.eye_height)
    area_lo = np.stack([lo[:, 0] - reach, np.full_like(reach, floor_y - 1e-3), lo[:, 2] - reach], axis=1)
    area_hi = np.stack([hi[:, 0] + reach, np.full_like(reach, floor_y), hi[:, 2] + reach], axis=1)
    centre = (lo + hi) / 2 + np.stack([shift[:, 0], np.zeros_like(reach), shift[:, 1]], axis=1)
    half = (hi - lo) / 2
    height, width = shade.shape
    for k, (y0, y1, x0, x1) in enumerate(_screen_rects(area_lo, area_hi, c2w, intrinsics, width, height)):
        if y0 == y1:
            continue
        dx = np.abs(px[y0:y1, x0:x1] - centre[k, 0])
        dz = np.abs(pz[y0:y1, x0:x1] - centre[k, 2])
        if round_[k]:
            dist = np.sqrt(dx * dx + dz * dz) - half[k, 0]
        else:
            qx, qz = dx - half[k, 0], dz - half[k, 2]
            ox, oz = np.maximum(qx, 0), np.maximum(qz, 0)
            dist = np.sqrt(ox * ox + oz * oz) + np.minimum(np.maximum(qx, qz), 0)
        darkness = np.clip(1 - dist / soft[k], 0, 1)
        shade[y0:y1, x0:x1] *= 1 - 0.45 * darkness * darkness


def _shade(world: World, albedo: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Lambert sun plus a sky fill that is brighter on upward faces."""
    sky = world.sky
    diffuse = np.maximum(normals @ sky.sun_dir, 0)[:, None]
    fill = world.ambient * (0.75 - 0.25 * normals[:, 1:2])
    return albedo * (fill + (1 - world.ambient) * diffuse * sky.sun_color)


def _trace(
    world: World, c2w: np.ndarray, intrinsics: Intrinsics, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One frame: (rgb float32 [H, W, 3] in [0, 1], depth [H, W], ids [H, W]).

    Ray directions are kept planar (one contiguous [H, W] array per component): numpy is much faster
    on those than on the strided components of an [H, W, 3] array.
    """
    origin = np.asarray(c2w[:3, 3], np.float32)
    rot = np.asarray(c2w[:3, :3], np.float32)
    cam_x = ((np.arange(width, dtype=np.float64) + 0.5 - intrinsics.cx) / intrinsics.fx).astype(np.float32)[None, :]
    cam_y = ((np.arange(height, dtype=np.float64) + 0.5 - intrinsics.cy) / intrinsics.fy).astype(np.float32)[:, None]
    dirs = [rot[a, 0] * cam_x + rot[a, 1] * cam_y + rot[a, 2] for a in range(3)]
    scale = np.float32(1) / np.sqrt(dirs[0] * dirs[0] + dirs[1] * dirs[1] + dirs[2] * dirs[2])
    dirs = [d * scale for d in dirs]
    inv_dirs = [np.float32(1) / np.where(np.abs(d) < 1e-9, np.float32(1e-9), d) for d in dirs]
    dx, down, dz = dirs

    # Nearest hit: the floor plane first, then each solid inside its screen rectangle.
    drop = np.float32(world.eye_height) - origin[1]
    floor_hit = (down > 1e-6) & (drop > 0)
    depth = np.full((height, width), np.inf, np.float32)
    np.divide(drop, down, out=depth, where=floor_hit)
    ids = np.where(floor_hit, FLOOR_ID, SKY_ID).astype(np.int16)
    rects = _screen_rects(*world.object_bounds, c2w, intrinsics, width, height)
    for i, obj in enumerate(world.objects):
        y0, y1, x0, x1 = rects[i]
        if y0 == y1:
            continue
        window = np.s_[y0:y1, x0:x1]
        t = obj.intersect(origin, [d[window] for d in dirs], [d[window] for d in inv_dirs])
        closer = t < depth[window]
        np.copyto(depth[window], t, where=closer)
        np.copyto(ids[window], np.int16(FIRST_OBJECT_ID + i), where=closer)

    rgb = np.empty((height, width, 3), np.float32)
    fx = np.float32(intrinsics.fx)

    sky = ids == SKY_ID
    rgb[sky] = _sky_color(world.sky, np.stack([d[sky] for d in dirs], axis=1))

    floor = ids == FLOOR_ID
    if floor.any():
        floor_depth = np.where(floor, depth, 0)
        px = origin[0] + floor_depth * dx
        pz = origin[2] + floor_depth * dz
        shade = np.ones((height, width), np.float32)
        _apply_shadows(world, shade, px, pz, c2w, intrinsics)
        footprint = depth[floor] / (fx * np.maximum(down[floor], 1e-3))
        albedo = floor_color(
            px[floor], pz[floor], world.floor_tile, world.floor_colors, world.grout_color, footprint, world.seed
        )
        normals = np.broadcast_to(np.array([0, -1, 0], np.float32), albedo.shape)
        rgb[floor] = _shade(world, albedo, normals) * shade[floor][:, None]

    for i, obj in enumerate(world.objects):
        y0, y1, x0, x1 = rects[i]
        if y0 == y1:
            continue
        window = np.s_[y0:y1, x0:x1]
        mine = ids[window] == FIRST_OBJECT_ID + i
        if not mine.any():
            continue
        d = np.stack([c[window][mine] for c in dirs], axis=1)
        t = depth[window][mine]
        points = origin + t[:, None] * d
        normals = obj.normal(points)
        facing = np.einsum("ij,ij->i", normals, d)
        normals[facing > 0] *= -1  # seen from inside: light the side we look at
        u, v = obj.surface_uv(points, normals)
        footprint = t / (fx * np.maximum(np.abs(facing), 0.05))
        m = obj.material
        albedo = pattern_color(m.pattern, u, v, m.scale, m.colors, footprint, world.seed * 131 + i)
        rgb[window][mine] = _shade(world, albedo, normals)

    # Distance fog towards the horizon colour (the sky already is "at infinity").
    solid = ~sky
    fog = 1 - np.exp(-depth[solid] / world.fog_distance)
    rgb[solid] += fog[:, None] * (world.sky.horizon - rgb[solid])
    return rgb, depth, ids


def _as_pose_stack(c2w: np.ndarray) -> tuple[np.ndarray, bool]:
    poses = np.asarray(c2w, np.float64)
    if poses.shape == (4, 4):
        return poses[None], True
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"c2w must have shape [4, 4] or [N, 4, 4], got {poses.shape}")
    return poses, False


def render_buffers(
    world: World, c2w: np.ndarray, intrinsics: Intrinsics | None = None, width: int = 160, height: int = 96
) -> RenderBuffers:
    """Colour, depth and hit ids of ``c2w [N, 4, 4]`` (or ``[4, 4]``, giving N = 1), one ray per pixel
    centre. ``intrinsics`` defaults to :func:`world_intrinsics`."""
    poses, _ = _as_pose_stack(c2w)
    intrinsics = intrinsics or world_intrinsics(width, height)
    out = [_trace(world, pose, intrinsics, width, height) for pose in poses]
    return RenderBuffers(
        rgb=np.stack([_to_uint8(rgb) for rgb, _, _ in out]),
        depth=np.stack([depth for _, depth, _ in out]),
        ids=np.stack([ids for _, _, ids in out]),
    )


def render(
    world: World,
    c2w: np.ndarray,
    intrinsics: Intrinsics | None = None,
    width: int = 160,
    height: int = 96,
    *,
    supersample: int = 1,
) -> np.ndarray:
    """RGB uint8 ``[N, H, W, 3]`` of ``world`` from poses ``c2w [N, 4, 4]`` (``[H, W, 3]`` for one
    ``[4, 4]`` pose). ``intrinsics`` defaults to :func:`world_intrinsics`.

    ``supersample = s > 1`` averages s×s rays per pixel (s² times the cost): the sub-pixel grid at s×
    resolution with s× intrinsics has the same field of view and pixel centres.
    """
    poses, single = _as_pose_stack(c2w)
    intrinsics = intrinsics or world_intrinsics(width, height)
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    fine = Intrinsics(fx=intrinsics.fx * s, fy=intrinsics.fy * s, cx=intrinsics.cx * s, cy=intrinsics.cy * s)
    frames = []
    for pose in poses:
        rgb, _, _ = _trace(world, pose, fine, width * s, height * s)
        if s > 1:
            rgb = rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3))
        frames.append(_to_uint8(rgb))
    out = np.stack(frames)
    return out[0] if single else out


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ CLI


def parse_actions(text: str) -> list[list[str]]:
    """Latent-frame actions from ``"w*6,l*6,wj*2,-*3"``: comma-separated key sets (``-`` for none,
    ``+`` optional between keys), each repeated ``*n`` times; latent frame 0 (``[]``) is prepended."""
    actions: list[list[str]] = [[]]
    for item in filter(None, (part.strip() for part in text.split(","))):
        keys, _, count = item.partition("*")
        keys = keys.replace("+", "").replace("-", "")
        if set(keys) - set("wsadikjl"):
            raise ValueError(f"unknown keys in {item!r}; use w s a d i k j l")
        actions.extend([list(dict.fromkeys(keys))] * int(count or 1))
    return actions


def contact_sheet(frames: np.ndarray, columns: int, labels: list[str] | None = None) -> np.ndarray:
    """Tile frames ``[T, H, W, 3]`` into one image, row-major, with a 2-pixel gap (and labels)."""
    from PIL import Image, ImageDraw

    count, height, width, _ = frames.shape
    rows = -(-count // columns)
    label_h = 12 if labels else 0
    cell_w, cell_h = width + 2, height + 2 + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, frame in enumerate(frames):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(Image.fromarray(frame), (x + 1, y + 1 + label_h))
        if labels:
            draw.text((x + 2, y), labels[i], fill=(230, 230, 230))
    return np.asarray(sheet)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a contact sheet of a camera trajectory in a seeded world.")
    parser.add_argument("--seed", type=int, default=0, help="world seed")
    parser.add_argument("--size", default="160x96", help="WIDTHxHEIGHT")
    parser.add_argument("--actions", default="w*6,l*6", help='latent-frame actions, e.g. "w*6,l*6,wj*3,-*2"')
    parser.add_argument("--out", default="world.png", help="output PNG")
    parser.add_argument("--columns", type=int, default=9)
    parser.add_argument("--latent-only", action="store_true", help="only the latent frames (pixel frames 4k)")
    parser.add_argument("--supersample", type=int, default=1)
    args = parser.parse_args(argv)

    from PIL import Image

    width, height = (int(n) for n in args.size.lower().split("x"))
    actions = parse_actions(args.actions)
    poses = pixel_poses(trajectory_poses(actions))
    labels = [f"{t} {''.join(actions[-(-t // TEMPORAL_STRIDE)]) or '-'}" for t in range(len(poses))]
    if args.latent_only:
        poses, labels = poses[::TEMPORAL_STRIDE], labels[::TEMPORAL_STRIDE]
    frames = render(World.from_seed(args.seed), poses, None, width, height, supersample=args.supersample)
    Image.fromarray(contact_sheet(frames, args.columns, labels)).save(args.out)
    print(f"wrote {args.out}: {len(frames)} frames of {width}x{height}")


if __name__ == "__main__":
    main()
