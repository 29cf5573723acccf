"""The audio writer's WAV path (the standard library's ``wave``) writes what libsndfile writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from broker.longform.writer import AudioWriter


def test_wav_is_byte_identical_to_libsndfile_pcm16(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    # beyond full scale both ways (the writer clips), the rounding edges, and silence
    edges = np.array([0.5 / 32768, 1.5 / 32768, -0.5 / 32768, -1.5 / 32768, 1.0, -1.0, 0.99999, 0.0], np.float32)
    samples = np.concatenate([rng.uniform(-1.3, 1.3, 30_000).astype(np.float32), edges])
    writer = AudioWriter(tmp_path / "ours.wav", 24_000)
    for piece in np.array_split(samples, 7):  # written piece by piece, as a long job does
        writer.write(piece)
    writer.finish()
    sf.write(tmp_path / "libsndfile.wav", np.clip(samples, -1.0, 1.0), 24_000, subtype="PCM_16")
    assert (tmp_path / "ours.wav").read_bytes() == (tmp_path / "libsndfile.wav").read_bytes()
    info = sf.info(tmp_path / "ours.wav")
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (24_000, 1, "PCM_16", len(samples))
