"""The CLI as a user runs it: outputs, --json, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from tests.conftest import run_cli


@pytest.mark.usefixtures("piper_available")
def test_speak_writes_wav_and_json(tmp_path: Path) -> None:
    out = tmp_path / "hello.wav"
    text = "Hello from broker. This should take a couple of seconds to say."
    proc = run_cli("speak", text, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["provider"] == "local"
    assert data["attempts"][0]["provider"] == "local" and data["attempts"][0]["outcome"] == "succeeded"
    assert data["cost_usd"] >= 0
    samples, rate = sf.read(out)
    assert rate == 24_000
    assert abs(len(samples) / rate - data["audio_seconds"]) < 0.01
    assert samples.std() > 0.01


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("speak", "   ",), "text"),
        (("speak", "hi", "--max-length-ms", "-3"), "max_length_ms"),
        (("speak", "hi", "--speaker", "42"), "speaker"),
        (("render", "--text", "hi", "--audio", "x.wav"), "exactly one"),
        (("render", "--audio", "missing.wav"), "audio"),
        (("render", "--text", "hi", "--avatar", "AVATAR_NOT_IMAGE"), "avatar"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args: tuple[str, ...],
                                                         needle: str) -> None:
    (tmp_path / "AVATAR_NOT_IMAGE").write_text("this is text, not a picture")
    suffix = ".mp4" if args[0] == "render" else ".wav"
    out = tmp_path / f"out{suffix}"
    proc = run_cli(*args, "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir()), "temp file left behind"
