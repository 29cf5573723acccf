"""Test audio shared by the render and start-up tests."""

from __future__ import annotations

import numpy as np

from broker.media import SAMPLE_RATE, Audio


def speechlike(seconds: float, seed: int = 0) -> Audio:
    """Syllable-rate bursts of a voiced buzz with pauses: loud and silent parts, like speech."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    syllables = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 0.5
    buzz = np.sign(np.sin(2 * np.pi * 140 * t)) * 0.25 + rng.normal(0, 0.02, len(t))
    return Audio((buzz * syllables).astype(np.float32))
