"""Drivers of ``s2clip data prepare|check|list``: library calls plus Rich progress and tables."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..data.check import check
from ..data.prepare import PrepareSummary, prepare
from ..data.prepare.manifest import read_manifest
from ..data.sources import SOURCES, data_dir, default_data_root


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def run_prepare(name: str, raw: Path, out: Path | None, workers: int, console: Console) -> PrepareSummary:
    """Prepare ``name`` from ``raw`` into ``out`` (default: its folder under the data dir) with a
    progress bar; prints a summary table and any warnings."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{name}: searching the downloads", total=None)

        def show(done: int, total: int, stage: str) -> None:
            bar.update(task, completed=done, total=total or None, description=f"{name}: {stage}")

        summary = prepare(name, raw, out, workers=workers, progress=show)
    table = Table(title=f"s2clip data prepare {name}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("prepared", f"{summary.samples} val samples (official: {summary.official}); "
                  f"{summary.written} written, {summary.skipped} already done")
    table.add_row("data root", str(summary.out))
    table.add_row("presets", ", ".join(summary.presets))
    table.add_row("labels", summary.route)
    for src in summary.sources:
        size = f", {_size(src['size'])}" if "size" in src else ""
        table.add_row(f"source: {src['role']}", f"{src['path']} ({src['kind']}{size}; {src['files_used']} files)")
    table.add_row("manifest", str(summary.manifest))
    console.print(table)
    for warning in summary.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    for preset in summary.presets:
        console.print(f"s2clip eval --dataset {preset} --data-root {summary.out}", highlight=False, soft_wrap=True)
    return summary


def run_check(name: str, data_root: Path | None, console: Console) -> int:
    """Check a data root; prints the report table and the first problems; returns the exit code
    (0 all good, 1 problems found)."""
    root = data_root if data_root is not None else default_data_root(name)
    with Progress(TextColumn(f"[bold]{name}: reading labels"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("check", total=None)
        report = check(name, root, progress=lambda done, total: bar.update(task, completed=done, total=total))
    table = Table(title=f"s2clip data check {name}")
    for col in ("check", "result", "ok"):
        table.add_column(col)
    for row in report.rows:
        table.add_row(row.check, row.result, "[green]yes[/]" if row.ok else "[red]no[/]")
    console.print(table)
    for problem in report.problems:
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
    if report.more_problems:
        console.print(f"[red]… and {report.more_problems} more problems[/]")
    console.print("[green]ok[/]" if report.ok else f"[red]{name}: {len(report.problems) + report.more_problems} "
                  "problem(s)[/]")
    return 0 if report.ok else 1


def run_list(console: Console) -> None:
    """One row per preparation: presets, downloads (name, size, URL), default data root and whether
    it is prepared there, and the prepare command."""
    table = Table(title=f"s2clip datasets (val split; data dir: {data_dir()})", show_lines=True)
    for col in ("presets", "downloads needed", "default data root", "prepare with"):
        table.add_column(col, overflow="fold")
    for source in SOURCES.values():
        downloads = "\n".join(f"{d.file} ({d.size})\n  {d.url}" for d in source.downloads)
        root = default_data_root(source.presets[0])
        manifest = read_manifest(root)
        state = (f"[green]prepared[/] ({manifest.get('counts', {}).get('samples', '?')} samples)" if manifest
                 else "[dim]not prepared[/]")
        table.add_row(f"{', '.join(source.presets)}\n[dim]{source.title}; {source.official_val} val images[/]",
                      downloads, f"{root}\n{state}", f"s2clip data prepare {source.presets[0]} --from DIR")
    console.print(table)
    console.print("DIR holds the downloads as archives or extracted; `-o DIR` writes elsewhere than the "
                  "default data root. Only the val split (what eval reads) is prepared.", highlight=False)
