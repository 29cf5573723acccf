"""`broker speak --file` (a book across many workers), `broker jobs` (long jobs and how to resume them),
and the fan-out table behind `broker quote --file`."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from broker.cli.common import err, guarded, interactive, out, print_json

WORKER_COUNTS = (1, 4, 16, 64)


def _command() -> str:
    return "broker " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_job(manager: Any, file: str, *, output: Path | None, split_dir: Path | None, need_output: bool = True,
              **options: Any) -> Any:
    """Read the file and plan the job: every bad-input error is raised here, before anything runs."""
    from broker.errors import InvalidRequest
    from broker.longform import LongJob, read_chapters

    if need_output and output is None and split_dir is None:
        raise InvalidRequest("output", "give -o FILE or --split-chapters DIR")
    if split_dir is not None and split_dir.exists() and not split_dir.is_dir():
        raise InvalidRequest("split_chapters", f"{split_dir} is a file, not a directory")
    chapters = read_chapters(file)
    return LongJob(manager, chapters, output=output, split_dir=split_dir, command=_command(), **options)


def speak_text_long(manager: Any, text: str, *, output: Path, as_json: bool, **options: Any) -> None:
    from broker.longform import LongJob, as_chapters

    _run_job(LongJob(manager, as_chapters(text), output=output, command=_command(), **options), as_json)


def speak_file(manager: Any, file: str, *, output: Path | None, split_dir: Path | None, as_json: bool,
               **options: Any) -> None:
    _run_job(build_job(manager, file, output=output, split_dir=split_dir, **options), as_json)


def _run_job(job: Any, as_json: bool) -> None:
    try:
        result = _with_bar(job) if interactive() and not as_json else asyncio.run(job.run())
    finally:
        job.close()
    if as_json:
        print_json(result.summary())
        return
    mix = ", ".join(f"{k} {v}" for k, v in result.providers.items()) or "all reused"
    out.print(f"wrote [bold]{result.output}[/] · {result.chapters} chapters · {result.pieces} pieces "
              f"({result.pieces_run} run, {result.pieces_reused} reused) · {result.audio_seconds / 60:.1f} min · "
              f"{mix} · ${result.cost_usd:.4f} · {result.wall_seconds:.1f} s", highlight=False)


def _with_bar(job: Any) -> Any:
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[minutes]:.1f} audio min · ${task.fields[usd]:.4f}"),
                   TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(f"{len(job.pieces)} pieces", total=len(job.pieces), minutes=0.0, usd=0.0)

        def update(p: Any) -> None:
            bar.update(task, completed=p.done, minutes=p.audio_seconds / 60, usd=p.cost_usd)

        job.on_progress = update
        return asyncio.run(job.run())


def speak_to_audio(manager: Any, file: str, *, speaker: int | str) -> Any:
    """A --file spoken across workers into audio for a long render (the pieces are journaled as usual)."""
    import tempfile

    from broker.media import Audio

    with tempfile.TemporaryDirectory(prefix="broker-render-") as tmp:
        wav = Path(tmp) / "speech.wav"
        job = build_job(manager, file, output=wav, split_dir=None, speaker=speaker)
        try:
            asyncio.run(job.run())
        finally:
            job.close()
        return Audio.from_file(wav)


def render_file(manager: Any, audio: Any, output: Path, *, fps: float, size: int, avatar: bytes | None,
                speaker: int | str, workers: int, as_json: bool) -> None:
    from broker.cli.common import atomic_output
    from broker.longform.render import render_long

    started = time.perf_counter()
    with atomic_output(output) as tmp:
        if interactive() and not as_json:
            with err.status(f"rendering {audio.duration_s / 60:.1f} min in segments…"):
                result = asyncio.run(render_long(manager, audio, fps=fps, size=size, avatar=avatar,
                                                 speaker=speaker, workers=workers))
        else:
            result = asyncio.run(render_long(manager, audio, fps=fps, size=size, avatar=avatar, speaker=speaker,
                                             workers=workers))
        result.video.save(tmp)
    video = result.video
    elapsed = time.perf_counter() - started
    if as_json:
        print_json({"output": str(output), "segments": result.segments, "frames": video.frames, "fps": video.fps,
                    "audio_seconds": round(video.audio_seconds, 3), "cost_usd": round(result.cost_usd, 8),
                    "providers": result.providers, "attempts": result.attempts, "wall_seconds": round(elapsed, 3),
                    "bytes": len(video.data)})
        return
    out.print(f"wrote [bold]{output}[/] · {video.frames} frames @ {video.fps:g} fps ({video.audio_seconds:.1f} s) "
              f"in {result.segments} segments · ${result.cost_usd:.4f} · {elapsed:.1f} s", highlight=False)


def fanout_rows(job: Any) -> list[dict[str, Any]]:
    """Expected wall time and $ for 1, 4, 16, 64 workers on the cheapest endpoint, then the configured mix."""
    from dataclasses import replace

    from broker.longform.plan import simulate

    rows = []
    first = job.lanes[0]
    for n in WORKER_COUNTS:
        f = simulate(len(job.pieces), [replace(first, limit=n)], n)
        rows.append({"workers": n, "endpoints": {first.name: f.workers}, "wall_s": round(f.wall_s, 1),
                     "usd": round(f.usd, 6), "first_audio_s": round(f.first_audio_s, 1), "mix": False})
    capacity = sum(lane.limit for lane in job.lanes)
    f = simulate(len(job.pieces), job.lanes, capacity)
    rows.append({"workers": f.workers, "endpoints": {lane.name: lane.limit for lane in job.lanes},
                 "wall_s": round(f.wall_s, 1), "usd": round(f.usd, 6), "first_audio_s": round(f.first_audio_s, 1),
                 "mix": True, "pieces_per_endpoint": f.by_lane})
    return rows


def quote_file(file: str, engine: str | None, as_json: bool) -> None:
    from broker.routing.manager import CloudGPUManager
    from broker.settings import Settings

    settings = Settings()
    settings.ledger.path = ":memory:"  # quoting spends nothing and writes no file
    manager = CloudGPUManager(settings=settings)
    job = build_job(manager, file, output=None, split_dir=None, need_output=False, engine=engine)
    job.close()
    rows = fanout_rows(job)
    words = sum(p.words for p in job.pieces)
    if as_json:
        print_json({"file": file, "words": words, "chapters": len(job.chapters), "pieces": len(job.pieces),
                    "lanes": [{"endpoint": lane.name, "limit": lane.limit, "piece_run_s": round(lane.run_s, 3),
                               "piece_usd": round(lane.usd, 8), "cold_start_s": lane.cold_s,
                               "priced": lane.priced} for lane in job.lanes],
                    "rows": rows})
        return
    table = Table("workers", "where", "expected wall", "expected $", "first audio",
                  title=f"{words} words · {len(job.chapters)} chapters · {len(job.pieces)} pieces "
                        "(cold starts included)")
    for r in rows:
        where = ", ".join(f"{k}×{v}" for k, v in r["endpoints"].items()) + (" (configured mix)" if r["mix"] else "")
        usd = f"${r['usd']:.4f}" if all(lane.priced for lane in job.lanes) else "unpriced"
        table.add_row(str(r["workers"]), where, _duration(r["wall_s"]), usd, _duration(r["first_audio_s"]))
    out.print(table)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def jobs(
    limit: Annotated[int, typer.Option("--limit", help="Show at most this many jobs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Long jobs (books, long renders): progress, cost so far, and the command that resumes each."""

    def run() -> None:
        from broker.longform.journal import open_journal
        from broker.settings import Settings

        settings = Settings()
        journal = open_journal(settings)  # the shared PostgreSQL journal when ledger.url names one
        rows = journal.jobs(limit)
        journal.close()
        for r in rows:
            r["resume"] = r["command"] if r["status"] != "done" else None
        if as_json:
            print_json({"jobs": rows})
            return
        table = Table("job", "status", "pieces", "audio", "$ so far", "updated", "output / resume with")
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated_at"]))
            hint = r["output"] if r["status"] == "done" else r["resume"]
            table.add_row(r["job"], r["status"], f"{r['pieces_done']}/{r['pieces']}",
                          f"{r['audio_seconds'] / 60:.1f} min", f"${r['cost_usd']:.4f}", when, hint)
        out.print(table if rows else "no long jobs yet")

    guarded(run)


def register(app: typer.Typer) -> None:
    app.command("jobs")(jobs)
