"""Generate the WebUI's bundled sample first frames (simple procedural scenes) with Pillow.

Run: python tests/webui/make_samples.py  → lingbot_ray/webui/samples/*.png (416x240, deterministic).
"""

from __future__ import annotations

import math
import pathlib
import random

from PIL import Image, ImageDraw, ImageFilter

W, H = 416, 240
OUT = pathlib.Path(__file__).resolve().parents[2] / "lingbot_ray" / "webui" / "samples"


def gradient(top, bottom, height=H):
    image = Image.new("RGB", (W, H))
    draw = ImageDraw.Draw(image)
    for y in range(H):
        t = min(1.0, y / max(1, height - 1))
        draw.line([(0, y), (W, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    return image


def alley(rng):
    image = gradient((40, 46, 70), (20, 22, 30))
    d = ImageDraw.Draw(image)
    vx, vy = W // 2, H // 2 - 10
    d.polygon([(0, 0), (150, 40), (150, 170), (0, H)], fill=(70, 58, 52))
    d.polygon([(W, 0), (W - 150, 40), (W - 150, 170), (W, H)], fill=(60, 52, 58))
    d.polygon([(0, H), (150, 170), (W - 150, 170), (W, H)], fill=(35, 38, 44))
    for i in range(6):  # windows
        for side in (0, 1):
            x = 20 + i * 20 if side == 0 else W - 40 - i * 20
            for j in range(3):
                y = 40 + j * 40 + i * 3
                d.rectangle([x, y, x + 10, y + 18], fill=(230, 190, 90) if rng.random() < 0.5 else (30, 30, 40))
    for k in range(12):  # puddle reflections / lane lines
        t = k / 12
        d.line([(vx + (1 - t) * 0, 170 + t * 70), (vx, 170 + t * 70 + 5)], fill=(200, 180, 120), width=2)
    for _ in range(220):  # rain
        x, y = rng.randrange(W), rng.randrange(H)
        d.line([(x, y), (x - 2, y + 8)], fill=(150, 160, 190))
    d.ellipse([vx - 12, vy - 6, vx + 12, vy + 18], fill=(255, 220, 150))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def mountains(rng):
    image = gradient((110, 160, 225), (235, 200, 170), height=150)
    d = ImageDraw.Draw(image)
    d.ellipse([300, 30, 340, 70], fill=(255, 240, 200))
    for layer, color in enumerate([(90, 100, 130), (60, 80, 90), (40, 70, 50)]):
        base = 110 + layer * 35
        points = [(0, H)]
        for x in range(0, W + 16, 16):
            points.append((x, base - 40 * abs(math.sin(x / (60 + 20 * layer) + layer)) - rng.randrange(12)))
        points.append((W, H))
        d.polygon(points, fill=color)
    d.rectangle([0, 215, W, H], fill=(70, 110, 60))
    return image


def courtyard(rng):
    image = gradient((150, 190, 230), (200, 220, 240), height=100)
    d = ImageDraw.Draw(image)
    horizon = 100
    d.rectangle([0, horizon, W, H], fill=(180, 170, 150))
    for i in range(-12, 13):  # floor tiles in perspective
        d.line([(W / 2 + i * 8, horizon), (W / 2 + i * 60, H)], fill=(120, 110, 95), width=1)
    y = horizon
    step = 4
    while y < H:
        d.line([(0, y), (W, y)], fill=(120, 110, 95))
        y += step
        step *= 1.35
    d.rectangle([40, 40, 120, horizon], fill=(200, 120, 90))
    d.rectangle([290, 30, 380, horizon], fill=(110, 140, 180))
    for x in (60, 95, 305, 340):
        d.rectangle([x, 55, x + 14, 80], fill=(40, 40, 60))
    d.ellipse([180, 60, 240, 110], fill=(60, 130, 70))
    d.rectangle([206, 100, 214, 125], fill=(90, 60, 40))
    return image


def coast(rng):
    image = gradient((250, 170, 120), (120, 90, 160), height=120)
    d = ImageDraw.Draw(image)
    d.ellipse([170, 75, 250, 155], fill=(255, 210, 120))
    d.rectangle([0, 120, W, H], fill=(30, 70, 120))
    for y in range(124, H, 6):
        for _ in range(6):
            x = rng.randrange(W)
            d.line([(x, y), (x + rng.randrange(10, 40), y)], fill=(240, 170, 110) if abs(x - 210) < 60 else (70, 120, 170))
    d.polygon([(0, H), (0, 150), (90, 170), (160, H)], fill=(210, 190, 140))
    d.polygon([(W, 90), (W - 70, 110), (W - 120, 120), (W, 120)], fill=(50, 50, 70))
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in [("alley", alley), ("mountains", mountains), ("courtyard", courtyard), ("coast", coast)]:
        make(random.Random(name)).save(OUT / f"{name}.png", optimize=True)
        print(OUT / f"{name}.png")


if __name__ == "__main__":
    main()
