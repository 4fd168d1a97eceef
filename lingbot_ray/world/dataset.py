"""Clips of random keyboard play in seeded worlds, written as deterministic shards, and their loader.

A clip is ``N`` latent frames of actions (latent frame 0's are ``[]``: it is the given first image),
the latent poses :class:`~lingbot_ray.control.camera.CameraTrajectory` integrates from them, and the
``1 + 4(N−1)`` pixel frames rendered at :func:`~lingbot_ray.world.render.pixel_poses`.

On disk (``out_dir``):

* ``meta.json``: sizes, counts, seeds, the split, the camera steps, the format and renderer versions.
* ``shard_00000.npz`` …: uncompressed npz, ``clips_per_shard`` clips each, with ``frames`` uint8
  ``[C, T, H, W, 3]``, ``latent_poses`` float64 ``[C, N, 4, 4]``, ``actions`` uint8 ``[C, N]`` (bit b
  set = key ``ACTION_KEYS[b]`` held: the action table's order, see
  :mod:`lingbot_ray.protocol.actions`) and ``world_seeds`` int64 ``[C]``. Zip entries carry a fixed
  date, so equal arguments give byte-identical files; entries are stored, so :class:`ClipDataset`
  memory-maps ``frames`` straight out of the zip.

**Split**: world seeds in ``[0, EVAL_SEED_START)`` are for training, seeds ``>= EVAL_SEED_START``
are held out for evaluation and never drawn for ``split="train"``.

``python -m lingbot_ray.world.dataset OUT_DIR --clips 256 --latent-frames 12 --size 128x80 --seed 0``
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..control.camera import CameraTrajectory, Intrinsics
from ..protocol.actions import ACTIONS
from .progress import progress_bar
from .render import TEMPORAL_STRIDE, pixel_poses, render, world_intrinsics
from .scene import World

FORMAT_VERSION = 1
RENDERER_VERSION = "world-v1"  # bump when a change to the renderer or the world builder changes pixels
EVAL_SEED_START = 1_000_000
SEED_RANGES = {"train": (0, EVAL_SEED_START), "eval": (EVAL_SEED_START, 2 * EVAL_SEED_START)}
ACTION_KEYS = "".join(ACTIONS.tokens)  # bit b of a mask is ACTION_KEYS[b]
_MASK_DTYPE = np.min_scalar_type((1 << len(ACTION_KEYS)) - 1)  # uint8 for the 8 tokens

# Held-key sets a player uses, with how often a run starts with each: single keys dominate, and
# pitch keys (whose runs are cut short, see random_actions) start more often so they are held about
# as often. Pairs: walking forward or back while turning or strafing (w+j, ..., s+d).
_UP, _DOWN = ACTIONS.select("rotate", "x", 1)[0], ACTIONS.select("rotate", "x", -1)[0]
_SINGLES = [[key] for key in ACTION_KEYS]
_PAIRS = [
    [walk, other]
    for walk in ACTIONS.select("translate", "z")
    for other in (*ACTIONS.select("rotate", "y"), *ACTIONS.select("translate", "x"))
]
ACTION_SETS: list[list[str]] = [[], *_SINGLES, *_PAIRS]
_SINGLE_WEIGHTS = np.array([1.6 if key in (_UP, _DOWN) else 1.0 for key in ACTION_KEYS])
_WEIGHTS = np.concatenate([[0.1], 0.65 * _SINGLE_WEIGHTS / _SINGLE_WEIGHTS.sum(), [0.25 / len(_PAIRS)] * len(_PAIRS)])
MAX_RUN = 8
MAX_PITCH_RUN = 4
MAX_PITCH_STEPS = 6  # |pitch| stays within 6 steps (24° at the default 4° step)

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# ---------------------------------------------------------------------------------------------- clips


def random_actions(rng: np.random.Generator, num_latent_frames: int, *, idle: bool = True) -> list[list[str]]:
    """Actions per latent frame as a player holds keys: runs of 1–8 latent frames of one key set
    (nothing, one key, or a common pair such as w+j). Latent frame 0 gets ``[]``. ``idle=False``
    never draws the empty set after frame 0 (the camera moves all the time).

    Pitch runs are at most 4 frames and never take the pitch past ±``MAX_PITCH_STEPS`` steps (a run
    that would is turned round), so the view does not drift to the sky or the floor.
    """
    if num_latent_frames < 1:
        raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    weights = _WEIGHTS if idle else np.concatenate([[0.0], _WEIGHTS[1:] / _WEIGHTS[1:].sum()])
    actions: list[list[str]] = [[]]
    pitch = 0  # in steps, + is up
    while len(actions) < num_latent_frames:
        keys = list(ACTION_SETS[rng.choice(len(ACTION_SETS), p=weights)])
        run = int(rng.integers(1, MAX_RUN + 1))
        if keys in ([_UP], [_DOWN]):
            run = min(run, MAX_PITCH_RUN)
            step = 1 if keys == [_UP] else -1
            if abs(pitch + step * run) > MAX_PITCH_STEPS:
                step, keys = -step, [_DOWN] if step > 0 else [_UP]
            run = min(run, MAX_PITCH_STEPS - step * pitch)
            pitch += step * run
        actions.extend([list(keys)] * min(run, num_latent_frames - len(actions)))
    return actions


@dataclass(frozen=True, eq=False)
class Clip:
    """One rendered clip: ``frames`` uint8 ``[T, H, W, 3]`` with ``T = 1 + 4(N−1)``, the ``N`` latent
    frames' ``actions`` and camera-to-world ``latent_poses [N, 4, 4]``, and the world's seed."""

    frames: np.ndarray
    actions: list[list[str]]
    latent_poses: np.ndarray
    world_seed: int

    @property
    def pixel_poses(self) -> np.ndarray:
        return pixel_poses(self.latent_poses)


def make_clip(
    world_seed: int, actions: list[list[str]], width: int, height: int, intrinsics: Intrinsics | None = None
) -> Clip:
    """Integrate ``actions`` with :class:`CameraTrajectory` and render the clip in ``World.from_seed(world_seed)``."""
    camera = CameraTrajectory()
    camera.extend(actions)
    latent = camera.poses
    frames = render(World.from_seed(world_seed), pixel_poses(latent), intrinsics, width, height)
    return Clip(frames=frames, actions=[list(a) for a in actions], latent_poses=latent, world_seed=int(world_seed))


def encode_actions(actions: list[list[str]]) -> np.ndarray:
    """Per latent frame, a bit mask (uint8 for the 8 tokens): bit ``ACTIONS.bit(key)`` set when
    ``key`` is held. An unknown key is a ValueError naming it."""
    return np.array([sum(1 << ACTIONS.bit(key) for key in set(keys)) for keys in actions], _MASK_DTYPE)


def decode_actions(masks: np.ndarray) -> list[list[str]]:
    """Inverse of :func:`encode_actions` (keys in table order)."""
    return [[key for key in ACTION_KEYS if int(mask) >> ACTIONS.bit(key) & 1] for mask in masks]


# -------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _ClipSpec:
    index: int
    world_seed: int
    actions: list[list[str]]


def _clip_specs(
    num_clips: int, num_latent_frames: int, seed: int, split: str, num_worlds: int | None
) -> list[_ClipSpec]:
    """World seed and actions of every clip; clip i depends only on (seed, split, i, num_worlds)."""
    lo, hi = SEED_RANGES[split]
    split_salt = list(SEED_RANGES).index(split)
    pool = None
    if num_worlds is not None:
        pool_rng = np.random.default_rng([seed, split_salt, 0xB0A1])
        pool = lo + pool_rng.choice(hi - lo, size=num_worlds, replace=False)
    specs = []
    for i in range(num_clips):
        rng = np.random.default_rng([seed, split_salt, i])
        world_seed = int(pool[rng.integers(len(pool))]) if pool is not None else int(rng.integers(lo, hi))
        specs.append(_ClipSpec(i, world_seed, random_actions(rng, num_latent_frames)))
    return specs


def _render_spec(args: tuple[_ClipSpec, int, int]) -> np.ndarray:
    spec, width, height = args
    return make_clip(spec.world_seed, spec.actions, width, height).frames


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed npz with fixed zip dates (byte-identical for equal arrays), written atomically."""
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


def generate_dataset(
    out_dir: str | Path,
    num_clips: int,
    num_latent_frames: int,
    width: int,
    height: int,
    seed: int,
    workers: int = 1,
    *,
    clips_per_shard: int = 64,
    split: str = "train",
    num_worlds: int | None = None,
    progress: bool = True,
) -> dict:
    """Render ``num_clips`` random clips into shards under ``out_dir`` and write ``meta.json``.

    World seeds come from the ``split``'s range (train: ``[0, EVAL_SEED_START)``; eval: from
    ``EVAL_SEED_START`` on), drawn per clip, or from a pool of ``num_worlds`` seeds when given (fewer
    worlds, each seen in many clips). Equal arguments give byte-identical files whatever ``workers``.
    Returns the metadata.
    """
    if split not in SEED_RANGES:
        raise ValueError(f"split must be one of {list(SEED_RANGES)}, got {split!r}")
    if num_clips < 1 or num_latent_frames < 1 or clips_per_shard < 1:
        raise ValueError("num_clips, num_latent_frames and clips_per_shard must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = _clip_specs(num_clips, num_latent_frames, seed, split, num_worlds)
    jobs = [(spec, width, height) for spec in specs]

    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    frames_iter: Iterator[np.ndarray] = pool.imap(_render_spec, jobs, chunksize=2) if pool else map(_render_spec, jobs)
    shards = []
    try:
        with progress_bar(total=num_clips, unit="clip", enabled=progress, desc="rendering") as bar:
            for start in range(0, num_clips, clips_per_shard):
                batch = specs[start : start + clips_per_shard]
                frames = []
                for _ in batch:
                    frames.append(next(frames_iter))
                    bar.update(1)
                latent = []
                for spec in batch:
                    camera = CameraTrajectory()
                    camera.extend(spec.actions)
                    latent.append(camera.poses)
                name = f"shard_{start // clips_per_shard:05d}.npz"
                _write_npz(
                    out / name,
                    {
                        "frames": np.stack(frames),
                        "latent_poses": np.stack(latent),
                        "actions": np.stack([encode_actions(spec.actions) for spec in batch]),
                        "world_seeds": np.array([spec.world_seed for spec in batch], np.int64),
                    },
                )
                shards.append({"file": name, "num_clips": len(batch)})
    finally:
        if pool:
            pool.close()
            pool.join()

    camera = CameraTrajectory()
    intrinsics = world_intrinsics(width, height)
    meta = {
        "format": "lingbot_ray.world.dataset",
        "format_version": FORMAT_VERSION,
        "renderer_version": RENDERER_VERSION,
        "width": width,
        "height": height,
        "num_clips": num_clips,
        "num_latent_frames": num_latent_frames,
        "num_pixel_frames": 1 + TEMPORAL_STRIDE * (num_latent_frames - 1),
        "clips_per_shard": clips_per_shard,
        "shards": shards,
        "seed": seed,
        "split": split,
        "world_seed_range": list(SEED_RANGES[split]),
        "eval_seed_start": EVAL_SEED_START,
        "num_worlds": num_worlds,
        "action_keys": ACTION_KEYS,
        "intrinsics": {"fx": intrinsics.fx, "fy": intrinsics.fy, "cx": intrinsics.cx, "cy": intrinsics.cy},
        "camera": {
            "yaw_step_deg": camera.yaw_step_deg,
            "pitch_step_deg": camera.pitch_step_deg,
            "move_step": camera.move_step,
            "pitch_limit_deg": camera.pitch_limit_deg,
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


# -------------------------------------------------------------------------------------------- reading


def _memmap_npz_member(path: Path, name: str) -> np.ndarray:
    """A read-only memory map of the stored (uncompressed) array ``name`` inside the npz at ``path``."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}:{name} is compressed; cannot memory-map it")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: bad local zip header for {name}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


class ClipDataset:
    """Clips written by :func:`generate_dataset`; ``ds[i]`` is ``(frames uint8 [T, H, W, 3], actions,
    latent_poses [N, 4, 4])``. Frames are memory-mapped from the shards on first use (and the maps are
    dropped when the dataset is pickled, e.g. into loader worker processes)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.meta = json.loads((self.root / "meta.json").read_text())
        if self.meta.get("format") != "lingbot_ray.world.dataset":
            raise ValueError(f"{self.root} is not a world dataset")
        keys = self.meta.get("action_keys", "")
        if not ACTION_KEYS.startswith(keys):
            raise ValueError(f"{self.root}: action_keys={keys!r} is not a prefix of the action table's {ACTION_KEYS!r}")
        self._shard_files = [self.root / shard["file"] for shard in self.meta["shards"]]
        counts = [shard["num_clips"] for shard in self.meta["shards"]]
        self._starts = np.cumsum([0, *counts])
        self._small = [self._load_small(path) for path in self._shard_files]
        self._frames: dict[int, np.ndarray] = {}

    @staticmethod
    def _load_small(path: Path) -> dict[str, np.ndarray]:
        with np.load(path) as npz:
            return {key: npz[key] for key in ("latent_poses", "actions", "world_seeds")}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip {index} out of range for {len(self)} clips")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _shard_frames(self, shard: int) -> np.ndarray:
        if shard not in self._frames:
            self._frames[shard] = _memmap_npz_member(self._shard_files[shard], "frames")
        return self._frames[shard]

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[list[str]], np.ndarray]:
        shard, row = self._locate(index)
        small = self._small[shard]
        return self._shard_frames(shard)[row], decode_actions(small["actions"][row]), small["latent_poses"][row]

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[list[str]], np.ndarray]]:
        return (self[i] for i in range(len(self)))

    def clip(self, index: int) -> Clip:
        """Clip ``index`` with its frames read into memory."""
        frames, actions, poses = self[index]
        return Clip(np.array(frames), actions, poses, self.world_seed(index))

    def world_seed(self, index: int) -> int:
        shard, row = self._locate(index)
        return int(self._small[shard]["world_seeds"][row])

    @property
    def world_seeds(self) -> np.ndarray:
        """World seed of every clip, ``[len(self)]``."""
        return np.concatenate([small["world_seeds"] for small in self._small])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_frames"] = {}
        return state


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render a dataset of random-play clips in seeded worlds.")
    parser.add_argument("out_dir")
    parser.add_argument("--clips", type=int, required=True, help="number of clips")
    parser.add_argument("--latent-frames", type=int, default=12, help="latent frames per clip (N; T = 1 + 4(N-1))")
    parser.add_argument("--size", default="128x80", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clips-per-shard", type=int, default=64)
    parser.add_argument("--split", choices=list(SEED_RANGES), default="train")
    parser.add_argument("--worlds", type=int, default=None, help="draw worlds from a pool of this many seeds")
    args = parser.parse_args(argv)
    width, height = (int(n) for n in args.size.lower().split("x"))
    meta = generate_dataset(
        args.out_dir,
        args.clips,
        args.latent_frames,
        width,
        height,
        args.seed,
        args.workers,
        clips_per_shard=args.clips_per_shard,
        split=args.split,
        num_worlds=args.worlds,
    )
    print(f"wrote {meta['num_clips']} clips in {len(meta['shards'])} shards to {args.out_dir}")


if __name__ == "__main__":
    main()
