"""`broker speak` and `broker render`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from broker.cli.common import atomic_output, err, fail, guarded, interactive, out, print_json
from broker.errors import InvalidRequest
from broker.media import Audio, Video
from broker.types import RenderRequest, SpeechRequest, build


def _manager(provider: str | None) -> Any:
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings

    settings = Settings()
    if provider:
        # An explicit provider means that provider only: no silent fallback elsewhere.
        settings.manager.fallback_local = provider == "local"
        return CloudGPUManager([provider], settings=settings)
    return CloudGPUManager(settings=settings)


def _speaker(value: str) -> int | str:
    return int(value) if value.strip().lstrip("-").isdigit() else value


def _result_json(output: Audio | Video, path: Path, elapsed: float) -> dict[str, Any]:
    report = output.report
    data: dict[str, Any] = {
        "ok": True,
        "output": str(path.expanduser().resolve()),
        "provider": report.provider if report else None,
        "attempts": [a.model_dump() for a in report.attempts] if report else [],
        "cost_usd": round(report.cost_usd, 8) if report else 0.0,
        "wall_seconds": round(elapsed, 3),
    }
    if isinstance(output, Audio):
        data.update(audio_seconds=round(output.duration_s, 3), sample_rate=output.sample_rate)
    else:
        data.update(
            audio_seconds=round(output.audio_seconds, 3), frames=output.frames, fps=output.fps,
            width=output.width, height=output.height, bytes=len(output.data),
        )
    return data


def speak(
    text: Annotated[str, typer.Argument(help="What to say.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="WAV (or .flac) file to write "
                                                "(default: out.wav here).")] = None,
    speaker: Annotated[str, typer.Option("--speaker", "-s", help="Speaker id or voice name.")] = "0",
    provider: Annotated[str | None, typer.Option("--provider", "-p", help="Run on this provider only.")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="piper | csm (default: configured)")] = None,
    max_length_ms: Annotated[float | None, typer.Option("--max-length-ms")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Synthesise TEXT to an audio file."""

    path = output or Path("out.wav")

    def run() -> None:
        request = build(SpeechRequest, text=text, speaker=_speaker(speaker), engine=engine,
                        max_length_ms=max_length_ms)
        if path.suffix.lower() not in (".wav", ".flac"):
            raise InvalidRequest("output", "must end in .wav or .flac")
        started = time.perf_counter()
        manager = _manager(provider)
        with atomic_output(path) as tmp:
            if interactive() and not as_json:
                with err.status(f"speaking {request.words()} words…"):
                    audio = manager.run_request(request)
            else:
                audio = manager.run_request(request)
            assert isinstance(audio, Audio)
            audio.save(tmp)
        elapsed = time.perf_counter() - started
        if as_json:
            print_json(_result_json(audio, path, elapsed))
        else:
            report = audio.report
            out.print(
                f"wrote {_where(path, output is None)} · {audio.duration_s:.2f} s of audio · "
                f"{escape(report.provider or '?') if report else '?'} · ${report.cost_usd if report else 0:.5f} · "
                f"{elapsed:.2f} s", highlight=False, soft_wrap=True,
            )

    guarded(run, as_json=as_json)


def render(
    output: Annotated[Path | None, typer.Option("-o", "--output", help="MP4 file to write "
                                                "(default: out.mp4 here).")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Speak this text (Piper) and render it.")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="Render this WAV/FLAC file.")] = None,
    avatar: Annotated[Path | None, typer.Option("--avatar", help="Portrait image (default: packaged).")] = None,
    fps: Annotated[float, typer.Option("--fps")] = 25.0,
    size: Annotated[int, typer.Option("--size", help="Output width and height in pixels.")] = 512,
    speaker: Annotated[str, typer.Option("--speaker", "-s")] = "0",
    provider: Annotated[str | None, typer.Option("--provider", "-p")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Render a talking-head MP4 from --text or --audio."""
    path = output or Path("out.mp4")

    def run() -> None:
        if (text is None) == (audio is None):
            raise InvalidRequest("input", "give exactly one of --text or --audio")
        if path.suffix.lower() != ".mp4":
            raise InvalidRequest("output", "must end in .mp4")
        fields: dict[str, Any] = {"fps": fps, "size": size, "speaker": _speaker(speaker)}
        if text is not None:
            fields["text"] = text
        if audio is not None:
            try:
                fields["audio"] = Audio.from_file(audio)
            except (OSError, ValueError) as exc:
                raise InvalidRequest("audio", f"cannot read {audio}: {exc}") from None
        if avatar is not None:
            try:
                fields["avatar"] = avatar.read_bytes()
            except OSError as exc:
                raise InvalidRequest("avatar", f"cannot read {avatar}: {exc.strerror}") from None
        request = build(RenderRequest, **fields)
        started = time.perf_counter()
        manager = _manager(provider)
        with atomic_output(path) as tmp:
            if interactive() and not as_json:
                with err.status("rendering…"):
                    video = manager.run_request(request)
            else:
                video = manager.run_request(request)
            assert isinstance(video, Video)
            video.save(tmp)
        elapsed = time.perf_counter() - started
        if as_json:
            print_json(_result_json(video, path, elapsed))
        else:
            report = video.report
            out.print(
                f"wrote {_where(path, output is None)} · {video.frames} frames @ {video.fps:g} fps "
                f"({video.audio_seconds:.2f} s) · {escape(report.provider or '?') if report else '?'} · "
                f"{elapsed:.2f} s",
                highlight=False, soft_wrap=True,
            )

    guarded(run, as_json=as_json)


def _where(path: Path, defaulted: bool) -> str:
    """The file written as a full path (rich markup, the path escaped); says so when -o was not given."""
    full = f"[bold]{escape(str(path.expanduser().resolve()))}[/]"
    return f"{full} (no -o given)" if defaulted else full


def register(app: typer.Typer) -> None:
    app.command("speak")(speak)
    app.command("render")(render)


__all__ = ["fail", "register"]
