"""The text encoder's memory and time on multi-MB prompts (what a prompt-event flood once cost).

    python -m benchmarks.bench_prompt_memory [--events 8] [--checkpoint embedded:lingbot-world-tiny]

Feeds ``--events`` prompts of 1, 2 or 4 MB of random letters (seeded) straight to the checkpoint's
``PromptEncoder`` and prints, per prompt, the encoding time and the process's resident memory. On a
server such prompts are refused before the encoder (``limits.max_prompt_chars``); this measures the
encoder's own bound behind that.
"""

from __future__ import annotations

import argparse
import os
import random
import string
import time

from lingbot_ray.checkpoint import checkpoint_folder
from lingbot_ray.models.text_encoder import PromptEncoder


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=8)
    parser.add_argument("--checkpoint", default="embedded:lingbot-world-tiny")
    args = parser.parse_args()
    encoder = PromptEncoder.from_pretrained(checkpoint_folder(args.checkpoint))
    encoder.encode("warm up")
    print(f"start: {rss_mb():.0f} MB")
    rng = random.Random(0)
    for i in range(args.events):
        size = rng.choice([1, 2, 4]) * 2**20
        prompt = "".join(rng.choices(string.ascii_letters + " ", k=size))
        start = time.perf_counter()
        encoder.encode(prompt)
        print(f"prompt {i}: {size >> 20} MB, encoded in {time.perf_counter() - start:.1f} s, RSS {rss_mb():.0f} MB", flush=True)


if __name__ == "__main__":
    main()
