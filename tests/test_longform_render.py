"""Long renders cut at pauses, rendered in segments side by side, joined with exact A/V sync; CLI for long work."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from broker.longform.render import cut_points
from broker.media import SAMPLE_RATE, Audio, frames_for
from tests.conftest import run_cli


def speechlike(seconds: float) -> np.ndarray:
    """Tone bursts of 3.2 s with 0.8 s pauses, like sentences."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 200 * t) * ((t % 4) < 3.2)).astype(np.float32)


def test_cuts_fall_in_pauses_on_frame_boundaries() -> None:
    samples = speechlike(61.0)
    cuts = cut_points(samples, SAMPLE_RATE, 25, segment_s=8.0)
    assert cuts[0] == 0 and len(cuts) >= 6
    for c in cuts[1:]:
        assert c % 960 == 0  # a whole number of 25 fps frames
        assert (c / SAMPLE_RATE) % 4 >= 3.2 - 0.02  # inside a pause
    with pytest.raises(Exception, match="samples per frame"):
        cut_points(samples, SAMPLE_RATE, 29.97)


@pytest.mark.slow
@pytest.mark.usefixtures("piper_available")
def test_long_render_joins_segments_with_exact_frames_and_continuous_timestamps(tmp_path: Path) -> None:
    import av

    audio = tmp_path / "long.wav"
    sf.write(audio, speechlike(45.5), SAMPLE_RATE)
    out = tmp_path / "long.mp4"
    r = run_cli("render", "--audio", str(audio), "-o", str(out), "--size", "96", "--workers", "2", "--json",
                "--provider", "local", env={"BROKER_LEDGER__PATH": str(tmp_path / "l.sqlite")})
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["segments"] >= 2 and summary["frames"] == frames_for(45.5, 25) == 1138
    data = out.read_bytes()
    with av.open(io.BytesIO(data), "r") as c:
        pts = [f.pts for f in c.decode(video=0)]
    step = pts[1] - pts[0]
    assert len(pts) == 1138 and all(b - a == step for a, b in itertools.pairwise(pts))  # no jump at joins
    with av.open(io.BytesIO(data), "r") as c:
        got = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert abs(len(got) / SAMPLE_RATE - 45.5) < 0.1
    assert data[4:8] == b"ftyp" and b"moof" in data[:200_000]  # fragmented: streamable while written


def test_quote_file_prints_worker_counts_and_the_mix(tmp_path: Path) -> None:
    book = tmp_path / "book.md"
    one, two = "A sentence of some length goes here. " * 300, "More words. " * 200
    book.write_text(f"# One\n\n{one}\n\n# Two\n\n{two}")
    r = run_cli("quote", "--file", str(book), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["chapters"] == 2 and data["pieces"] >= 2
    rows = {(row["workers"], row["mix"]): row for row in data["rows"]}
    assert {(1, False), (4, False), (16, False), (64, False)} <= set(rows)
    assert rows[(4, False)]["wall_s"] <= rows[(1, False)]["wall_s"]
    assert any(row["mix"] for row in data["rows"])


def test_speak_file_json_and_jobs_listing(tmp_path: Path, piper_available: bool) -> None:
    book = tmp_path / "book.txt"
    book.write_text("Chapter 1\n\nThe first part is short.\n\nChapter 2\n\nThe second is shorter.\n")
    env = {"BROKER_LEDGER__PATH": str(tmp_path / "l.sqlite")}
    out = tmp_path / "book.flac"
    r = run_cli("speak", "--file", str(book), "-o", str(out), "--json", env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    for key in ("output", "pieces", "pieces_run", "pieces_reused", "chapters", "audio_seconds", "cost_usd",
                "providers", "attempts"):
        assert key in s
    assert s["chapters"] == 2 and s["pieces_run"] == s["pieces"] and s["providers"] == {"local": s["pieces"]}
    assert Audio.from_file(out).duration_s == pytest.approx(s["audio_seconds"], abs=0.01)
    again = json.loads(run_cli("speak", "--file", str(book), "-o", str(out), "--json", env=env).stdout)
    assert again["pieces_reused"] == s["pieces"] and again["pieces_run"] == 0
    jobs = json.loads(run_cli("jobs", "--json", env=env).stdout)["jobs"]
    assert jobs[0]["status"] == "done" and jobs[0]["pieces_done"] == s["pieces"]
    split = tmp_path / "chapters"
    r = run_cli("speak", "--file", str(book), "--split-chapters", str(split), "-o", str(tmp_path / "b.wav"), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in split.iterdir()) == ["01-chapter-1.wav", "02-chapter-2.wav"]
