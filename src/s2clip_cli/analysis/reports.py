"""Tables and files for the analyses: spatial entropy (Figure 4) and consistency AP (Figure 3).

Inputs:
  * entropy stats: ``{dataset: {layer: {"entropy": ..., "gini": ..., "channel_corr": ...}}}``
    (each inner dict as returned by `spatial_entropy`, averaged over images by the caller;
    extra numeric keys such as ``"n_images"`` are carried along);
  * AP results: `APAccumulator.results()`.

Files are written atomically; non-finite numbers become ``null`` in JSON and empty cells in CSV.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from ..errors import S2ClipError
from ..io.files import atomic_write_text, json_safe, prepare_output_dir, write_json
from .plots import entropy_heatmap, pr_curves

__all__ = ["ENTROPY_STATS", "ap_table", "entropy_table", "write_ap_outputs", "write_entropy_outputs"]

#: The statistics of Algorithm 1, in table/CSV column order (other keys follow).
ENTROPY_STATS: tuple[str, ...] = ("entropy", "gini", "channel_corr")

EntropyStats = Mapping[str, Mapping[Any, Mapping[str, Any]]]
APResults = Mapping[str, Mapping[str, Any]]


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    return f"{value:.{digits}f}" if math.isfinite(value) else "-"


def _entropy_columns(stats: EntropyStats) -> tuple[list[str], list[str]]:
    """Layer names (first-seen order over datasets) and stat names (Algorithm 1's first)."""
    layers: list[str] = []
    extra: list[str] = []
    for per_layer in stats.values():
        for layer, values in per_layer.items():
            if str(layer) not in layers:
                layers.append(str(layer))
            extra.extend(k for k in values if k not in ENTROPY_STATS and k not in extra)
    return layers, [*ENTROPY_STATS, *extra]


def _check_entropy(stats: EntropyStats) -> None:
    if not stats or not any(stats.values()):
        raise S2ClipError("no entropy statistics to report")


def entropy_table(stats: EntropyStats) -> Table:
    """Rich table, one row per (dataset, layer); each dataset's lowest-entropy layer in bold."""
    _check_entropy(stats)
    _, stat_names = _entropy_columns(stats)
    table = Table(title="Spatial entropy (Algorithm 1)")
    table.add_column("dataset")
    table.add_column("layer")
    for name in stat_names:
        table.add_column(name, justify="right")
    for dataset, per_layer in stats.items():
        entropies = [float(v.get("entropy", math.nan)) for v in per_layer.values()]
        finite = [e for e in entropies if math.isfinite(e)]
        best = min(finite) if finite else None
        for (layer, values), ent in zip(per_layer.items(), entropies, strict=True):
            style = "bold green" if best is not None and ent == best else None
            cells = [_fmt(values.get(name, math.nan)) for name in stat_names]
            table.add_row(str(dataset), str(layer), *cells, style=style)
        table.add_section()
    return table


def write_entropy_outputs(stats: EntropyStats, out_dir: str | os.PathLike[str],
                          meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``entropy.json``, ``entropy.csv`` and ``entropy_heatmap.png`` into `out_dir`.

    With `meta` (the run's ``config`` block and settings), the JSON is ``{**meta, "stats": stats}``.
    The CSV has one row per (dataset, layer); the heatmap shows "entropy" as layers x datasets
    (a layer missing for a dataset is a grey cell).
    """
    _check_entropy(stats)
    out = prepare_output_dir(out_dir)
    layers, stat_names = _entropy_columns(stats)
    datasets = [str(d) for d in stats]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "layer", *stat_names])
    for dataset, per_layer in stats.items():
        for layer, values in per_layer.items():
            cells = [json_safe(values.get(name)) for name in stat_names]
            writer.writerow([dataset, layer, *("" if c is None else c for c in cells)])

    values = np.full((len(layers), len(datasets)), np.nan)
    for j, per_layer in enumerate(stats.values()):
        for layer, stat in per_layer.items():
            values[layers.index(str(layer)), j] = float(stat.get("entropy", math.nan))

    return [
        write_json(out / "entropy.json", stats if meta is None else {**meta, "stats": stats}),
        atomic_write_text(out / "entropy.csv", buf.getvalue()),
        entropy_heatmap(values, layers, datasets, out / "entropy_heatmap.png"),
    ]


def ap_table(results: APResults) -> Table:
    """Rich table of AP, positive rate and pair count per source; the best AP in bold."""
    if not results:
        raise S2ClipError("no AP results to report")
    aps = [float(r.get("ap", math.nan)) for r in results.values()]
    finite = [a for a in aps if math.isfinite(a)]
    best = max(finite) if finite else None
    table = Table(title="Semantic consistency (patch-pair AP)")
    table.add_column("source")
    table.add_column("AP", justify="right")
    table.add_column("positive rate", justify="right")
    table.add_column("pairs", justify="right")
    for (source, res), ap in zip(results.items(), aps, strict=True):
        style = "bold green" if best is not None and ap == best else None
        table.add_row(
            source,
            _fmt(ap),
            _fmt(float(res.get("positive_rate", math.nan))),
            _fmt(int(res.get("n_pairs", 0))),
            style=style,
        )
    return table


def write_ap_outputs(
    results: APResults, out_dir: str | os.PathLike[str], title: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``ap.json`` (the full results, curves included; with `meta`, ``{**meta, "results": ...}``)
    and ``ap_pr_curves.png``."""
    if not results:
        raise S2ClipError("no AP results to report")
    out = prepare_output_dir(out_dir)
    plot_kwargs = {"title": title} if title else {}
    return [
        write_json(out / "ap.json", results if meta is None else {**meta, "results": results}),
        pr_curves(results, out / "ap_pr_curves.png", **plot_kwargs),
    ]
