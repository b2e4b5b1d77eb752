"""The `s2clip` command line: parsing only. Each command's options live in one module here; the
work is done by its driver in `s2clip_cli.commands`."""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.markup import escape
from typer.core import TyperGroup
from typer.exceptions import TyperException

from ..errors import interrupt_exit_code, interrupt_message, one_line
from . import interrupts
from .analyses import ap, entropy
from .bench import bench_sam
from .common import console, out, user_errors
from .data import data_app
from .evaluate import eval_command
from .methods import methods
from .models import models_app
from .segment import segment
from .serve import serve
from .visualize import visualize


class OneLineErrors(TyperGroup):
    """The command group, reporting a bad option as one `error:` line (with the valid values where
    there is a choice) and exit code 2, like every other user error, instead of a usage box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except TyperException as exc:  # click's usage errors (Typer vendors click)
            if not hasattr(exc, "format_message"):
                raise
            ctx = getattr(exc, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            message = one_line(exc.format_message()).replace("Value error, ", "")
            if message:  # (empty after `s2clip` alone has printed the help)
                console.print(f"[bold red]error:[/] {escape(message + hint)}", highlight=False, soft_wrap=True)
            code = getattr(exc, "exit_code", 2)
        except typer.Abort as exc:  # Ctrl-C / SIGTERM outside a command's own handling (click's Abort)
            console.print(f"[bold red]error:[/] {escape(interrupt_message(exc.__cause__))}", highlight=False)
            code = interrupt_exit_code(exc.__cause__)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="s2clip",
    cls=OneLineErrors,
    help="Training-free open-vocabulary semantic segmentation with frozen CLIP + DINO + SAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(segment)
app.command("eval")(eval_command)
app.command("bench-sam")(bench_sam)
app.command()(entropy)
app.command()(ap)
app.command()(methods)
app.command()(visualize)
app.command()(serve)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")


def main() -> None:
    """Console-script entry point: Ctrl-C and SIGTERM stop any command within seconds (`interrupts`)."""
    interrupts.install()
    try:
        app()
    except BrokenPipeError:  # pragma: no cover - e.g. `s2clip models list | head`
        sys.stderr.close()
    except SystemExit as exc:
        interrupts.exit_now(exc.code if isinstance(exc.code, int) else 1)  # after an interruption
        interrupts.finishing()  # (otherwise) a signal during the teardown: no traceback
        raise


__all__ = ["app", "console", "main", "out", "user_errors"]
