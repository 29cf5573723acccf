"""`broker speak` and `broker render`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from broker.cli.common import (
    MAX_AUDIO_FILE_BYTES,
    atomic_output,
    check_engine,
    check_output,
    err,
    fail,
    interactive,
    out,
    print_json,
    read_input,
)
from broker.cli.signals import run_job_command
from broker.errors import InvalidRequest
from broker.media import Audio, Video
from broker.types import RenderRequest, SpeechRequest, build


def _manager(provider: str | None) -> Any:
    from broker.providers import endpoints
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings

    settings = Settings()
    if provider:
        # An explicit endpoint means that endpoint only: no silent fallback elsewhere. One that does not
        # exist or is not configured is a configuration error (exit 2) saying which and what is missing.
        endpoints.require(settings, provider)
        settings.manager.local = "ranked" if endpoints.norm(provider) == "local" else "off"
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
    text: Annotated[str | None, typer.Argument(help="What to say (or use --file).")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="Audio file: .wav .flac .mp3 .m4a .aac .m4b (default out.wav).")] = None,
    speaker: Annotated[str, typer.Option("--speaker", "-s", help="Speaker id or voice name.")] = "0",
    provider: Annotated[str | None, typer.Option("--provider", "-p", help="Run on this provider only.")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="piper | csm (default: configured)")] = None,
    max_length_ms: Annotated[float | None, typer.Option("--max-length-ms")] = None,
    file: Annotated[str | None, typer.Option(
        "--file", "-f", help="A book: .txt, .md or .epub (- = stdin), split across many workers.")] = None,
    split_chapters: Annotated[Path | None, typer.Option(
        "--split-chapters", help="With --file: one audio file per chapter in this directory.")] = None,
    workers: Annotated[int | None, typer.Option("--workers", help="With --file: at most this many at once.")] = None,
    deadline: Annotated[float | None, typer.Option(
        "--deadline", help="With --file: seconds the book may take (picks the cheapest parallelism).")] = None,
    max_usd: Annotated[float | None, typer.Option(
        "--max-usd", help="With --file: stop cleanly (resumable) before this run spends more.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Synthesise TEXT (or a whole --file) to an audio file, written as it is made."""

    path = output or Path("out.wav")

    def run() -> None:
        if (text is None) == (file is None):
            raise InvalidRequest("text", "give TEXT or --file PATH (not both)")
        check_engine(engine)
        if file is not None:
            from broker.cli.longform import speak_file

            speak_file(_manager(provider), file, output=output, split_dir=split_chapters, as_json=as_json,
                       speaker=_speaker(speaker), engine=engine, workers=workers, deadline_s=deadline,
                       max_usd=max_usd)
            return
        if split_chapters is not None or workers is not None or deadline is not None or max_usd is not None:
            raise InvalidRequest("file", "--split-chapters, --workers, --deadline and --max-usd need --file")
        if len((text or "").split()) > LONG_TEXT_WORDS and max_length_ms is None:
            # long text goes the long way: pieces side by side, journaled, memory flat in its length
            from broker.cli.longform import speak_text_long

            speak_text_long(_manager(provider), text or "", output=path, as_json=as_json,
                            speaker=_speaker(speaker), engine=engine)
            return
        _speak_text(text or "", path, output is None, speaker, provider, engine, max_length_ms, as_json)

    run_job_command(run, as_json=as_json)


#: `broker speak TEXT` longer than this runs as a long job (the same path as --file)
LONG_TEXT_WORDS = 300


def _speak_text(text: str, output: Path, defaulted: bool, speaker: str, provider: str | None, engine: str | None,
                max_length_ms: float | None, as_json: bool) -> None:
    """Short text: streamed to the file sentence by sentence through the long-work writer (flat memory)."""
    from broker._sync import iterate_sync
    from broker.longform.writer import AudioWriter, check_output_path

    request = build(SpeechRequest, text=text, speaker=_speaker(speaker), engine=engine, max_length_ms=max_length_ms)
    check_output_path(output)
    check_output(output)
    started = time.perf_counter()
    manager = _manager(provider)
    request.check_limits(manager.settings.limits)
    writer = AudioWriter(output)
    done = False
    try:
        chunks = manager.astream_speech(text, request.speaker, engine=engine, max_length_ms=max_length_ms)
        if interactive() and not as_json:
            with err.status(f"speaking {request.words()} words…"):
                for chunk in iterate_sync(chunks):
                    writer.write(chunk.audio.samples)
        else:
            for chunk in iterate_sync(chunks):
                writer.write(chunk.audio.samples)
        writer.finish()
        done = True
    finally:
        if not done:
            writer.stop(keep_partial=False)
    elapsed = time.perf_counter() - started
    report = manager.last_report
    seconds = writer.seconds
    if as_json:
        print_json({
            "output": str(output), "provider": report.provider if report else None,
            "attempts": [a.model_dump() for a in report.attempts] if report else [],
            "cost_usd": round(report.cost_usd, 8) if report else 0.0, "wall_seconds": round(elapsed, 3),
            "audio_seconds": round(seconds, 3), "sample_rate": writer.sample_rate,
        })
    else:
        out.print(
            f"wrote {_where(output, defaulted)} · {seconds:.2f} s of audio · "
            f"{escape(report.provider or '?') if report else '?'} · ${report.cost_usd if report else 0:.5f} · "
            f"{elapsed:.2f} s", highlight=False, soft_wrap=True,
        )


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
    file: Annotated[str | None, typer.Option(
        "--file", "-f", help="A book or long text (.txt/.md/.epub): spoken across workers, then rendered.")] = None,
    workers: Annotated[int, typer.Option(
        "--workers", help="Long audio: render this many segments at once.")] = 4,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Render a talking-head MP4 from --text, --audio or --file (long audio is cut at pauses and
    rendered in parallel segments)."""
    path = output or Path("out.mp4")

    def run() -> None:
        if sum(x is not None for x in (text, audio, file)) != 1:
            raise InvalidRequest("input", "give exactly one of --text, --audio or --file")
        if path.suffix.lower() != ".mp4":
            raise InvalidRequest("output", "must end in .mp4")
        check_output(path, audio=audio, avatar=avatar)
        avatar_bytes = _read_avatar(avatar)
        long_audio = _long_audio(audio, file, speaker, provider)
        if long_audio is not None:
            from broker.cli.longform import render_file

            render_file(_manager(provider), long_audio, path, fps=fps, size=size, avatar=avatar_bytes,
                        speaker=_speaker(speaker), workers=workers, as_json=as_json)
            return
        fields: dict[str, Any] = {"fps": fps, "size": size, "speaker": _speaker(speaker)}
        if text is not None:
            fields["text"] = text
        if audio is not None:
            data = read_input(audio, "audio", MAX_AUDIO_FILE_BYTES)
            try:
                fields["audio"] = Audio.from_bytes(data)
            except (OSError, ValueError) as exc:
                raise InvalidRequest("audio", f"cannot read {audio}: {exc}") from None
        if avatar_bytes is not None:
            fields["avatar"] = avatar_bytes
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

    run_job_command(run, as_json=as_json)


def _where(path: Path, defaulted: bool) -> str:
    """The file written as a full path (rich markup, the path escaped); says so when -o was not given."""
    full = f"[bold]{escape(str(path.expanduser().resolve()))}[/]"
    return f"{full} (no -o given)" if defaulted else full


def _read_avatar(avatar: Path | None) -> bytes | None:
    if avatar is None:
        return None
    from broker.types import DEFAULT_LIMITS

    return read_input(avatar, "avatar", DEFAULT_LIMITS.max_avatar_bytes)


def _long_audio(audio: Path | None, file: str | None, speaker: str, provider: str | None) -> Audio | None:
    """The audio of a long render (a --file spoken first, or an --audio longer than one segment), else None."""
    from broker.longform.render import SEGMENT_S

    if file is not None:
        from broker.cli.longform import speak_to_audio

        return speak_to_audio(_manager(provider), file, speaker=_speaker(speaker))
    if audio is None:
        return None
    try:
        import soundfile as sf

        seconds = sf.info(str(audio)).duration
    except Exception:  # unreadable here: the normal path below names the problem
        return None
    if seconds <= SEGMENT_S * 1.5:
        return None
    data = read_input(audio, "audio", MAX_AUDIO_FILE_BYTES)
    try:
        return Audio.from_bytes(data)
    except (OSError, ValueError) as exc:
        raise InvalidRequest("audio", f"cannot read {audio}: {exc}") from None


def register(app: typer.Typer) -> None:
    app.command("speak")(speak)
    app.command("render")(render)


__all__ = ["fail", "register"]
