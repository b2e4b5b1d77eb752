"""``s2clip data prepare|check|list``: parsing only; the work is in ``commands/data.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .common import PresetName, out, user_errors, value

data_app = typer.Typer(
    help="Prepare the benchmark datasets from their official downloads, check them, list what is needed.",
    no_args_is_help=True,
)


NameArg = Annotated[PresetName, typer.Argument(help="Dataset preset.")]


@data_app.command("prepare")
@user_errors
def prepare_command(
    name: NameArg,
    raw: Annotated[Path, typer.Option("--from", help="Folder holding the official downloads (archives read in "
                                      "place, or already extracted), or one archive.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Data root to write (default: "
                                                "$S2CLIP_DATA_DIR/<preset folder>, see `s2clip data list`).")] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Worker processes (0 or 1: no pool).")] =
        min(8, os.cpu_count() or 1),
) -> None:
    """Write the val split of NAME in the layout `s2clip eval` reads; resumable (rerun to continue)."""
    from ..commands.data import run_prepare

    run_prepare(value(name), raw, output, workers, out)


@data_app.command("check")
@user_errors
def check_command(
    name: NameArg,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Data root to check (default: "
                                                   "$S2CLIP_DATA_DIR/<preset folder>).")] = None,
) -> None:
    """Check a data root: sample count vs the official val size, label sizes and values."""
    from ..commands.data import run_check

    code = run_check(value(name), data_root, out)
    if code:
        raise typer.Exit(code)


@data_app.command("list")
@user_errors
def list_command() -> None:
    """The downloads each dataset needs, where it goes, whether it is prepared, and the command."""
    from ..commands.data import run_list

    run_list(out)
