"""Small synthetic datasets with checkable answers, shared by e2e and GPU tests."""

from __future__ import annotations

import json
import random

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "ocean", "maple", "robot",
         "candle", "forest", "silver", "garden", "pencil", "rocket", "window", "bridge", "yellow", "castle"]


def reverse_dataset(n: int, seed: int = 0, words: list[str] = WORDS) -> str:
    """A task with a checkable answer: spell a word backwards."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        w = rng.choice(words)
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": "You reverse words."},
            {"role": "user", "content": f"Reverse: {w}"},
            {"role": "assistant", "content": w[::-1]},
        ]}))
    return "\n".join(lines) + "\n"
