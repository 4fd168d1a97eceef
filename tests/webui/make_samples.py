"""Generate the WebUI's and the tools' bundled sample first frames: views of the procedural world.

They are rendered at the embedded world model's 160x96 from held-out world seeds (never trained on),
so a session started from one shows a world the model has not memorised.

Run: python tests/webui/make_samples.py  → lingbot_ray/webui/samples/world-*.png (deterministic).
"""

from __future__ import annotations

import pathlib

from PIL import Image

from lingbot_ray.world.dataset import EVAL_SEED_START, make_clip

OUT = pathlib.Path(__file__).resolve().parents[2] / "lingbot_ray" / "webui" / "samples"
SAMPLES = {"world-plaza": 101, "world-pillars": 105, "world-bricks": 106, "world-dusk": 108}  # offset from EVAL_SEED_START


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, offset in SAMPLES.items():
        frame = make_clip(EVAL_SEED_START + offset, [[]], 160, 96).frames[0]
        Image.fromarray(frame).save(OUT / f"{name}.png", optimize=True)
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()
