"""The Piper speakers side by side: how far apart the per-speaker voice transforms put them.

    PYTHONPATH=. python scripts/voices.py [--runs 3]

For each speaker id of the embedded default engine, the same two sentences are spoken ``--runs`` times;
the table shows median F0 (autocorrelation) and spectral centroid (their spread over the runs), the
ratio to speaker 0, the length, and the real-time factor. Piper samples noise inside its model, so runs
differ a little sample by sample; the voice of a speaker id does not.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import engines
from broker.engines.voices import median_f0, spectral_centroid
from broker.media import SAMPLE_RATE
from broker.types import SpeechRequest

TEXT = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    engines.configure(device="cpu")
    names = engines.speech_engine("piper").speakers()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; no GPU used; {args.runs} runs per speaker")
    print("| id | speaker | median F0 (Hz) | × id 0 | centroid (Hz) | × id 0 | length (s) | RTF |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base: tuple[float, float] | None = None
    for speaker, name in enumerate(names):
        f0s, centroids, lengths, rtfs = [], [], [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            audio = engines.synthesize(SpeechRequest(text=TEXT, speaker=speaker))
            rtfs.append((time.perf_counter() - started) / audio.duration_s)
            f0s.append(median_f0(audio.samples, SAMPLE_RATE))
            centroids.append(spectral_centroid(audio.samples, SAMPLE_RATE))
            lengths.append(audio.duration_s)
        f0, centroid = statistics.median(f0s), statistics.median(centroids)
        base = base or (f0, centroid)
        print(f"| {speaker} | {name} | {f0:.0f} ({min(f0s):.0f}–{max(f0s):.0f}) | {f0 / base[0]:.2f} | "
              f"{centroid:.0f} ({min(centroids):.0f}–{max(centroids):.0f}) | {centroid / base[1]:.2f} | "
              f"{statistics.median(lengths):.2f} | {min(rtfs):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
