"""How `broker bench` results are shown: rich tables, CSV, and a cost-vs-time plot (matplotlib, Agg, lazily)."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from rich.table import Table

from broker.bench.model import BenchRow, Workload, row_dict
from broker.bench.run import BenchResult

CSV_FIELDS = [
    "provider", "hardware", "task", "workload", "amount", "output_s", "measured", "wall_s", "warm_wall_s",
    "queue_s", "cold_start_s", "run_s", "overhead_s", "usd", "usd_warm", "usd_per_output_min", "speedup_vs_local",
    "saving_vs_local", "speed_basis", "speed_source", "cold_basis", "cold_source", "price_basis", "price_source",
    "price_checked", "billing_model", "notes",
]


# -- formatting -------------------------------------------------------------------------------------
def fmt_seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 600:
        return f"{s / 60:.1f} min"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def fmt_usd(x: float | None) -> str:
    if x is None:
        return "unpriced"
    if x == 0:
        return "$0"
    if x < 0.01:
        return f"${x:.5f}"
    if x < 10:
        return f"${x:.3f}"
    return f"${x:,.2f}"


def fmt_vs_local(row: BenchRow) -> str:
    parts = []
    if row.speedup_vs_local is not None:
        x = row.speedup_vs_local
        if 0.95 <= x <= 1.05:
            parts.append("same speed")
        elif x > 1:
            parts.append(f"{x:.1f}× faster")
        else:
            parts.append(f"{1 / x:.1f}× slower")
    if row.saving_vs_local is not None:
        pct = row.saving_vs_local * 100
        parts.append(f"{pct:.0f}% cheaper" if pct >= 0 else f"{-pct:.0f}% dearer")
    return " · ".join(parts) or "—"


def _who(row: BenchRow) -> str:
    return f"{row.provider} (this machine)" if row.provider == "local" and row.measured else row.provider


def _workload_title(w: Workload, result: BenchResult) -> str:
    out_s = w.output_seconds(result.seconds_per_word.value)
    if w.task == "speech":
        return f"{w.label} of speech (≈{fmt_seconds(out_s)} of audio, {result.engine})"
    return f"{w.label}: {out_s * 25:.0f} frames of talking head from given audio"


# -- tables -----------------------------------------------------------------------------------------
def tables(result: BenchResult) -> list[Table]:
    """One table per workload, cheapest first."""
    out = []
    for w in result.workloads:
        rows = [r for r in result.rows if r.workload == w.label]
        if not rows:
            continue
        unit = "audio-min" if w.task == "speech" else "video-min"
        t = Table("provider", "hardware", "time", "warm", "$ / job", f"$ / {unit}", "vs local", "figures",
                  title=_workload_title(w, result), title_justify="left")
        for r in rows:
            figures = ("measured" if r.measured else "estimate" + ("*" if r.notes else "")) + " / " + r.price_basis
            t.add_row(_who(r), r.hardware, fmt_seconds(r.wall_s), fmt_seconds(r.warm_wall_s), fmt_usd(r.usd),
                      fmt_usd(r.usd_per_output_min), fmt_vs_local(r), figures, style="bold" if r.measured else None)
        out.append(t)
    return out


def monthly_tables(result: BenchResult) -> list[Table]:
    out = []
    for w in result.workloads:
        rows = [m for m in result.monthly if m.workload == w.label]
        if not rows:
            continue
        rows.sort(key=lambda m: (m.usd is None, m.usd or 0.0))
        t = Table("provider", "hardware", "$ / month", "of which idle + cold", "cold jobs", "compute h", "billing",
                  title=f"{result.volume:,} jobs a month of {w.label}", title_justify="left")
        for m in rows:
            who = f"{m.provider} (this machine)" if m.provider == "local" and m.measured else m.provider
            t.add_row(who, m.hardware, fmt_usd(m.usd), fmt_usd(m.usd_idle), f"{m.cold_share:.0%}",
                      f"{m.compute_hours:,.1f}", m.model, style="bold" if m.measured else None)
        out.append(t)
    return out


def _calibration_cells(result: BenchResult) -> list[list[str]]:
    cells = []
    for cal in result.calibrations:
        for j in cal.jobs:
            if not j.ok:
                cells.append([cal.provider, cal.hardware, j.task, "cold" if j.cold else "warm", "failed", "", "", "",
                              "", j.error or ""])
                continue
            cells.append([cal.provider, cal.hardware, j.task, "cold" if j.cold else "warm", f"{j.wall_s:.2f}",
                          f"{j.queue_s:.2f}", f"{j.run_s:.2f}", f"{j.overhead_s:.2f}", f"{j.output_s:.1f}",
                          j.timing_source])
    return cells


_CALIBRATION_HEAD = ("provider", "hardware", "task", "job", "wall s", "queue s", "run s", "other s", "output s",
                     "queue/run from")


def calibration_table(result: BenchResult) -> Table | None:
    """Every calibration job, phase by phase (live runs, and the local measurement)."""
    cells = _calibration_cells(result)
    if not cells:
        return None
    t = Table(*_CALIBRATION_HEAD, title="calibration jobs (other = API round trips, polling, transfer; a cold "
              "job's extra time is its cold start)", title_justify="left")
    for row in cells:
        t.add_row(*row)
    return t


def footnotes(result: BenchResult) -> list[str]:
    """Where the figures came from, each source once."""
    lines = [
        "time: a job sent to an idle provider (queue + cold start + run + API overhead); warm: the same on a warm "
        "worker. $ / job: that cold job, with the cold start and idle tail where the provider bills them. "
        "figures: time measured in this run or estimated from the performance profile / the price's basis.",
        f"speech length: {result.seconds_per_word.value * 60:.1f} s of audio per 60 words "
        f"({result.seconds_per_word.basis}: {result.seconds_per_word.source}).",
    ]
    speed, price, notes = [], [], []
    for r in result.rows:
        speed.append(f"speed: {r.speed_source}")
        if r.price_source:
            price.append(f"price: {r.provider}: {r.price_source} ({r.price_checked})")
        notes += [f"* {r.provider} {r.hardware}: {n}" for n in r.notes]
    lines += list(dict.fromkeys(speed + price + notes))
    for name, why in result.skipped.items():
        lines.append(f"skipped {name}: {why}")
    return lines


# -- Markdown --------------------------------------------------------------------------------------
def markdown(result: BenchResult) -> str:
    """GitHub tables, one per task: a row per provider/hardware, a column per workload ("time · $ per job")."""
    parts: list[str] = []
    for task in ("speech", "render"):
        workloads = [w for w in result.workloads if w.task == task]
        if not workloads:
            continue
        keys: dict[tuple[str, str, bool], dict[str, BenchRow]] = {}
        for r in result.rows:
            if r.task == task:
                keys.setdefault((r.provider, r.hardware, r.measured), {})[r.workload] = r
        what = f"Speech ({result.engine})" if task == "speech" else "Talking-head render (512 px, 25 fps, from audio)"
        biggest = workloads[-1].label
        head = ["provider", "hardware", *[w.label for w in workloads], f"vs local ({biggest})", "figures"]
        lines = [f"**{what}**: time for one job sent to an idle provider · $ per job", "",
                 "| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 2 + ["---:"] * len(workloads)
                                                                  + ["---", "---"]) + " |"]
        ordered = sorted(keys.items(), key=lambda kv: (kv[1][biggest].usd is None, kv[1][biggest].usd or 0.0,
                                                       kv[1][biggest].wall_s))
        for (provider, hardware, measured), by_w in ordered:
            last = by_w[biggest]
            cells = [f"{fmt_seconds(by_w[w.label].wall_s)} · {fmt_usd(by_w[w.label].usd)}" for w in workloads]
            who = f"**{provider} (this machine)**" if provider == "local" and measured else provider
            figures = ("measured" if measured else "estimate") + " / " + last.price_basis
            lines.append("| " + " | ".join([who, hardware, *cells, fmt_vs_local(last), figures]) + " |")
        parts.append("\n".join(lines))
    calibration = _calibration_cells(result)
    if calibration:
        lines = ["**Calibration jobs** (seconds; other = API round trips, polling, transfer)", "",
                 "| " + " | ".join(_CALIBRATION_HEAD) + " |", "|" + " --- |" * len(_CALIBRATION_HEAD)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in calibration]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


# -- CSV ---------------------------------------------------------------------------------------------
def write_csv(result: BenchResult, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in result.rows:
            d = row_dict(r)
            d["notes"] = "; ".join(r.notes)
            writer.writerow({k: d[k] for k in CSV_FIELDS})


# -- plot --------------------------------------------------------------------------------------------
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
#: time axis ticks a reader can say out loud (seconds)
_TIME_TICKS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14_400, 36_000)


def _series(rows: Iterable[BenchRow], workloads: list[Workload]) -> list[list[BenchRow]]:
    """Rows grouped per provider/hardware; estimated ones thinned to each provider's cost/time frontier
    (and left out when free)."""
    groups: dict[tuple[str, str, bool], list[BenchRow]] = {}
    for r in rows:
        if not r.measured and r.usd == 0:
            continue  # free estimated rows (a local GPU, a machine you already pay for) would pile up on $0
        groups.setdefault((r.provider, r.hardware, r.measured), []).append(r)
    order = {w.label: i for i, w in enumerate(workloads)}
    for g in groups.values():
        g.sort(key=lambda r: order[r.workload])
    keep = [g for (_, _, measured), g in groups.items() if measured]
    by_provider: dict[str, list[list[BenchRow]]] = {}
    for (provider, _, measured), g in groups.items():
        if not measured:
            by_provider.setdefault(provider, []).append(g)
    for gs in by_provider.values():
        # Judge on the largest workload: keep the rows no other row of this provider beats on both axes.
        def last(g: list[BenchRow]) -> tuple[float, float]:
            return g[-1].wall_s, g[-1].usd if g[-1].usd is not None else float("inf")

        frontier = [g for g in gs if not any(
            last(o)[0] <= last(g)[0] and last(o)[1] <= last(g)[1] and last(o) != last(g) for o in gs)]
        unique: dict[tuple[float, float], list[BenchRow]] = {}
        for g in frontier:
            unique.setdefault(last(g), g)  # same speed and price (e.g. Piper on any GPU): one line is enough
        keep += list(unique.values())[:3]
    return keep


def write_plot(result: BenchResult, path: Path) -> None:
    """Cost per job against time per job, one panel per task, one line per provider/hardware across workloads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator

    tasks = [t for t in ("speech", "render") if any(w.task == t for w in result.workloads)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 7.0), squeeze=False)
    providers = sorted({r.provider for r in result.rows})
    cmap = plt.get_cmap("tab10")
    colour = {p: cmap(i % 10) for i, p in enumerate(providers)}
    for ax, task in zip(axes[0], tasks, strict=True):
        workloads = [w for w in result.workloads if w.task == task]
        series = _series([r for r in result.rows if r.task == task], workloads)
        positive = [r.usd for g in series for r in g if r.usd]
        floor = min(positive) / 4 if positive else 1e-4
        marker = {w.label: _MARKERS[i % len(_MARKERS)] for i, w in enumerate(workloads)}
        xs_all: list[float] = []
        for g in series:
            xs = [r.wall_s for r in g]
            ys = [r.usd if r.usd else floor for r in g]
            xs_all += xs
            c = colour[g[0].provider]
            ax.plot(xs, ys, "-" if g[0].measured else "--", color=c, linewidth=1.6 if g[0].measured else 1.1,
                    alpha=0.9)
            for r, x, y in zip(g, xs, ys, strict=True):
                ax.scatter([x], [y], marker=marker[r.workload], color=c, s=60 if r.measured else 40, zorder=3,
                           edgecolors="black" if r.measured else "none")
            label = f"{g[-1].provider} {g[-1].hardware}" + (" (measured)" if g[0].measured else "")
            ax.annotate(label, (xs[-1], ys[-1]), textcoords="offset points", xytext=(7, -3), fontsize=8, color=c,
                        fontweight="bold" if g[0].measured else "normal")
        ax.axhline(floor, color="grey", linestyle=":", linewidth=0.8)
        ax.text(0.01, floor, " $0: free", ha="left", va="top",
                transform=ax.get_yaxis_transform(), fontsize=7.5, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if xs_all:
            ax.set_xlim(min(xs_all) / 1.4, max(xs_all) * 3.0)  # room on the right for the labels
        ax.set_ylim(floor / 2, None)
        ax.xaxis.set_major_locator(FixedLocator(_TIME_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_seconds(v)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        # No dollar labels down at the "$0" line: free points sit there on a log axis only for show.
        ax.yaxis.set_major_formatter(FuncFormatter(
            lambda v, _, low=floor * 2: "" if v < low else "$" + f"{v:.6f}".rstrip("0").rstrip(".")))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("time per job, sent to an idle provider (log)")
        ax.set_ylabel("$ per job (log)")
        what = f"speech ({result.engine})" if task == "speech" else "talking-head render (512 px, 25 fps)"
        ax.set_title(f"{what}: cost vs time per job", fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        handles = [Line2D([], [], marker=marker[w.label], linestyle="", color="black", label=w.label)
                   for w in workloads]
        handles += [Line2D([], [], linestyle="-", color="black", label="measured in this run"),
                    Line2D([], [], linestyle="--", color="black", label="estimated (catalog × profile)")]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8,
                  frameon=False)
    fig.suptitle(f"broker bench ({result.mode}) · {result.machine.get('cpu', '')}, {result.machine.get('cores')} "
                 "cores · lower left is better; estimated rows thinned to each provider's cheapest/fastest",
                 fontsize=9.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


__all__ = ["CSV_FIELDS", "calibration_table", "fmt_seconds", "fmt_usd", "fmt_vs_local", "footnotes", "markdown",
           "monthly_tables", "tables", "write_csv", "write_plot"]
