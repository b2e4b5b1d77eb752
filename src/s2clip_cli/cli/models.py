"""`s2clip models list|download|verify`: parsing only; the work is in `commands/models.py`."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import console, out, user_errors

models_app = typer.Typer(help="List, download and verify model weights.", no_args_is_help=True)


@models_app.command("list")
@user_errors
def models_list() -> None:
    """Every known model: family, source, expected file, and whether it is found."""
    from ..commands.models import run_list

    run_list(out)


@models_app.command("download")
@user_errors
def models_download(names: Annotated[list[str], typer.Argument(help="Model names (see `s2clip models list`).")]) -> None:
    """Download weights (to the Hugging Face cache or the s2clip weights dir)."""
    from ..commands.models import run_download

    run_download(names, out, console)


@models_app.command("verify")
@user_errors
def models_verify(names: Annotated[list[str] | None, typer.Argument(help="Models to check (default: all found).")] = None) -> None:
    """Check that weight files are present and load into their architectures."""
    from ..commands.models import run_verify

    if run_verify(names, out, console):
        raise typer.Exit(1)
