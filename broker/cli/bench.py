"""`broker bench`: cost and speed of the same work on every provider, side by side."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from broker.cli.common import atomic_output, check_engine, err, interactive, out, print_json
from broker.cli.signals import run_job_command

if TYPE_CHECKING:
    from broker.bench.run import Progress


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A rich progress bar on stderr, only on a terminal (pipes and CI logs get none)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]bench[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=err, transient=True)
    task = bar.add_task("starting", total=None)

    def update(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total or None, description=what)

    with bar:
        yield update


def bench(
    estimate: Annotated[bool, typer.Option("--estimate", help="Price every catalog row with the performance "
                                           "profiles (no account needed); the local engine is measured here.")]
    = False,
    live: Annotated[bool, typer.Option("--live", help="Run short calibration jobs on every configured provider "
                                       "(real jobs: a few cents on a real cloud) and extrapolate.")] = False,
    providers: Annotated[str | None, typer.Option("--providers", help="Only these providers, comma-separated "
                                                  "(e.g. local,runpod).")] = None,
    words: Annotated[str, typer.Option("--words", help="Speech workloads in words, comma-separated "
                                       "('none' to leave speech out).")] = "500,2000,10000",
    render_seconds: Annotated[str, typer.Option("--render-seconds", help="Render workloads in seconds of video, "
                                                "comma-separated ('none' to leave renders out).")] = "10,60",
    volume: Annotated[int | None, typer.Option("--volume", min=1, help="Jobs per month of each workload: adds a "
                                               "monthly projection with idle and keep-warm costs.")] = None,
    hardware: Annotated[str | None, typer.Option("--hardware", help="Estimate mode: only these catalog hardware "
                                                 "names, comma-separated (e.g. cpu,a100-80gb).")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="piper | csm (default: configured)")] = None,
    local_usd_per_hour: Annotated[float | None, typer.Option("--local-usd-per-hour", min=0.0,
                                                             help="What this machine costs you per hour, so "
                                                             "savings vs local can be in dollars too.")] = None,
    no_local: Annotated[bool, typer.Option("--no-local", help="Estimate mode: do not measure the local engine "
                                           "(use its profile).")] = False,
    warm_runs: Annotated[int, typer.Option("--warm-runs", min=1, max=20, help="Warm calibration jobs per task "
                                           "after the cold one.")] = 2,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, help="Seconds one calibration job may "
                                           "take.")] = 600.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
    as_markdown: Annotated[bool, typer.Option("--markdown", help="Print GitHub Markdown tables (a column per "
                                              "workload) instead.")] = False,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="Also write the rows as CSV to this file.")] = None,
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Also draw cost vs time to this PNG "
                                                   "(needs matplotlib: pip install 'broker[plot]').")] = None,
) -> None:
    """What speech and renders cost and take on every provider: $ per job, time, and against this machine.

    Without --live or --estimate it estimates (free). --live --estimate shows both.
    """

    def run() -> None:
        from broker.bench.run import BenchOptions, abench, parse_amounts
        from broker.settings import Settings
        from broker.store import open_store

        check_engine(engine)
        options = BenchOptions(
            estimate=estimate or not live, live=live,
            providers=_names(providers), hardware=_names(hardware),
            words=parse_amounts(words, "words", integer=True),
            render_seconds=parse_amounts(render_seconds, "render_seconds", integer=False),
            volume=volume, engine=engine, measure_local=not no_local, warm_runs=warm_runs, timeout_s=timeout,
            local_usd_per_hour=local_usd_per_hour,
        )
        if plot_path is not None:
            _check_matplotlib()
        settings = Settings()
        ledger = open_store(settings) if live else None  # live runs spend: the shared ledger when configured
        try:
            from broker._sync import run_sync

            with _progress_bar(interactive()) as progress:
                result = run_sync(abench(options, settings=settings, ledger=ledger, progress=progress))
        finally:
            if ledger is not None:
                ledger.close()
        _write_files(result, csv_path, plot_path)
        if as_json:
            print_json(result.to_dict())
            return
        if as_markdown:
            from broker.bench.report import markdown

            sys.stdout.write(markdown(result))
            return
        _print(result)

    run_job_command(run, as_json=as_json)


def _names(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _check_matplotlib() -> None:
    import importlib.util

    from broker.cli.common import EXIT_BAD_INPUT, fail

    if importlib.util.find_spec("matplotlib") is None:
        fail("--plot needs matplotlib: pip install 'broker[plot]'", EXIT_BAD_INPUT)


def _write_files(result: object, csv_path: Path | None, plot_path: Path | None) -> None:
    from broker.bench.report import write_csv, write_plot
    from broker.bench.run import BenchResult

    assert isinstance(result, BenchResult)
    # Where the files went goes to stderr, so --json and --markdown output on stdout stays clean.
    if csv_path is not None:
        with atomic_output(csv_path) as tmp:
            write_csv(result, tmp)
        err.print(f"wrote the rows to {escape(str(csv_path.expanduser().resolve()))}", highlight=False,
                  soft_wrap=True)
    if plot_path is not None:
        with atomic_output(plot_path) as tmp:
            write_plot(result, tmp)
        err.print(f"wrote the plot to {escape(str(plot_path.expanduser().resolve()))}", highlight=False,
                  soft_wrap=True)


def _print(result: object) -> None:
    from rich.console import Console

    from broker.bench.report import calibration_table, footnotes, monthly_tables, tables
    from broker.bench.run import BenchResult

    assert isinstance(result, BenchResult)
    # Piped into a file the tables would wrap at 80 columns; give them room instead.
    con = out if out.is_terminal else Console(width=max(out.width, 132))
    m = result.machine
    con.print(f"[bold]broker bench[/] · {result.mode} · {escape(str(m.get('cpu')))} ({m.get('cores')} cores, "
              f"load {m.get('load_average')}) · {result.seconds:.0f} s", highlight=False)
    for table in tables(result):
        con.print(table)
    for table in monthly_tables(result):
        con.print(table)
    cal = calibration_table(result)
    if cal is not None:
        con.print(cal)
    for line in footnotes(result):
        con.print(f"[dim]{escape(line)}[/]", highlight=False, soft_wrap=True)
    if result.calibrations:
        spent = result.calibration_cost_usd
        con.print(f"[dim]calibration jobs: {sum(len(c.jobs) for c in result.calibrations)}, "
                  f"${spent:.5f} (estimated from the catalog)[/]", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
