"""``s2clip data prepare|check|list``: parsing only; the work is in ``commands/data.py``.

``cli.py`` mounts this sub-app with ``app.add_typer(data_app, name="data")``. To stay free of a
circular import, nothing from ``cli`` is imported at module level: the one-line error handling
(``cli.user_errors``) and the consoles are looked up when a command runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer

data_app = typer.Typer(
    help="Prepare the benchmark datasets from their official downloads, check them, list what is needed.",
    no_args_is_help=True,
)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """``cli.user_errors`` applied at call time (one-line errors, no traceback)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .cli import user_errors

        return user_errors(func)(*args, **kwargs)

    return wrapper


NameArg = Annotated[str, typer.Argument(help="Dataset preset: voc21, voc20, context60, context59, coco_stuff164k, "
                                        "coco_object, cityscapes or ade20k.")]


@data_app.command("prepare")
@_user_errors
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
    from .cli import out
    from .commands.data import run_prepare

    run_prepare(name, raw, output, workers, out)


@data_app.command("check")
@_user_errors
def check_command(
    name: NameArg,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="Data root to check (default: "
                                                   "$S2CLIP_DATA_DIR/<preset folder>).")] = None,
) -> None:
    """Check a data root: sample count vs the official val size, label sizes and values."""
    from .cli import out
    from .commands.data import run_check

    code = run_check(name, data_root, out)
    if code:
        raise typer.Exit(code)


@data_app.command("list")
@_user_errors
def list_command() -> None:
    """The downloads each dataset needs, where it goes, whether it is prepared, and the command."""
    from .cli import out
    from .commands.data import run_list

    run_list(out)
