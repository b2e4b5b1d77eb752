"""Drivers of `s2clip models list|download|verify`."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import S2ClipError
from ..models.registry import ALL_SPECS, any_spec
from ..models.verify import found_specs, verify_spec
from ..models.weights import download, is_offline, locate, weights_dir


def run_list(out: Console) -> None:
    """Every known model: family, source, expected file, and whether it is found."""
    table = Table(title=f"s2clip models (weights dir: {weights_dir()})")
    for col in ("name", "family", "source", "expected file", "found"):
        table.add_column(col)
    for spec in ALL_SPECS.values():
        found = locate(spec)
        status = f"[green]yes[/] ({found.where}: {found.path})" if found.path else "[red]no[/]"
        table.add_row(spec.name, spec.family, spec.source, spec.filename, status)
    out.print(table)


def run_download(names: list[str], out: Console, console: Console) -> None:
    """Download weights (to the Hugging Face cache or the s2clip weights dir)."""
    specs = [any_spec(name) for name in names]
    if is_offline():
        raise S2ClipError("offline mode is on (S2CLIP_OFFLINE / HF_HUB_OFFLINE): nothing can be downloaded")
    for spec in specs:
        found = locate(spec)
        if found.path is not None:
            out.print(f"{spec.name}: already present at {found.path}")
            continue
        with console.status(f"downloading {spec.name}…"):
            path = download(spec)
        out.print(f"{spec.name}: {path}")


def run_verify(names: list[str] | None, out: Console, console: Console) -> int:
    """Load each checkpoint into its architecture; returns the number that failed."""
    specs = [any_spec(n) for n in names] if names else found_specs()
    if not specs:
        raise S2ClipError("no weights found to verify; see `s2clip models list`")
    bad = 0
    for spec in specs:
        try:
            path = verify_spec(spec)
            out.print(f"[green]ok[/]   {spec.name}: {escape(str(path))}", soft_wrap=True)
        except S2ClipError as exc:
            bad += 1
            console.print(f"[red]fail[/] {spec.name}: {escape(str(exc))}", highlight=False, soft_wrap=True)
    return bad
