"""Figures for the analyses: the entropy heatmap (Figure 4) and the PR curves (Figure 3).

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no
global backend switch) and written atomically: to a temporary file in the target directory,
then renamed over the target, so a reader never sees a half-written PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..errors import S2ClipError
from ..io.files import atomic_path

__all__ = ["entropy_heatmap", "pr_curves"]

#: Colormap of the heatmap: light-to-dark reversed, so low entropy is dark.
HEATMAP_CMAP = "Blues_r"


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 150) -> Path:
    FigureCanvasAgg(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def entropy_heatmap(
    values: np.ndarray,
    layer_names: Sequence[str],
    dataset_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Spatial entropy across CLIP layers",
    per_column: bool = True,
) -> Path:
    """Heatmap of spatial entropy, layers (rows) x datasets (columns), in the style of Figure 4.

    Darker cells are lower entropy; each cell is annotated with its value (NaN cells are grey
    and marked "-"). With `per_column` each dataset is coloured on its own min-max scale (as
    Figure 4's separate per-dataset panels; entropies of datasets with different feature grids
    are not on one scale), otherwise all cells share one scale and a colorbar is drawn.
    Returns the written path.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.ndim != 2 or vals.size == 0:
        raise S2ClipError(f"entropy values must be a non-empty [layers, datasets] array, got {vals.shape}")
    if vals.shape != (len(layer_names), len(dataset_names)):
        raise S2ClipError(
            f"entropy values have shape {vals.shape} but there are {len(layer_names)} layer names "
            f"and {len(dataset_names)} dataset names"
        )
    n_layers, n_sets = vals.shape
    finite = np.isfinite(vals)
    if per_column:
        shown = np.full_like(vals, np.nan)
        for j in range(n_sets):
            col = vals[finite[:, j], j]
            if col.size:
                lo, hi = col.min(), col.max()
                shown[:, j] = (vals[:, j] - lo) / (hi - lo) if hi > lo else 0.5
        norm = Normalize(0.0, 1.0)
    else:
        shown = vals
        lo = float(vals[finite].min()) if finite.any() else 0.0
        hi = float(vals[finite].max()) if finite.any() else 1.0
        norm = Normalize(lo, hi if hi > lo else lo + 1.0)

    fig = Figure(figsize=(1.2 + 1.3 * n_sets, 0.9 + 0.42 * n_layers))
    ax = fig.add_subplot()
    cmap = colormaps[HEATMAP_CMAP].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, norm=norm, aspect="auto")
    for i in range(n_layers):
        for j in range(n_sets):
            level = shown[i, j] if per_column else norm(vals[i, j])
            text = f"{vals[i, j]:.3f}" if finite[i, j] else "-"
            colour = "white" if finite[i, j] and level < 0.5 else "black"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(n_sets), [str(d) for d in dataset_names])
    ax.set_yticks(range(n_layers), [str(name) for name in layer_names])
    ax.set_xlabel("dataset")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if not per_column:
        fig.colorbar(image, ax=ax, label="spatial entropy")
    return _save(fig, path)


def _source_style(source: str, clip_layers: list[int], index: int) -> dict[str, Any]:
    """Line colour/style: CLIP layers along a sequential colormap, VFMs distinct and dashed."""
    if source.startswith("clip:") and source[5:].isdigit():
        layer = int(source[5:])
        lo, hi = min(clip_layers), max(clip_layers)
        t = 0.0 if hi == lo else (layer - lo) / (hi - lo)
        return {"color": colormaps["viridis"](0.1 + 0.8 * t), "linestyle": "-", "linewidth": 1.2}
    palette = colormaps["tab10"]
    return {"color": palette(index % 10), "linestyle": "--", "linewidth": 2.0}


def pr_curves(
    results: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Semantic consistency: precision-recall",
) -> Path:
    """Precision-recall curves, one per source, AP in the legend (Figure 3 style).

    `results` is `APAccumulator.results()`. A source without a curve (no positive pairs) is
    listed in the legend only. Returns the written path.
    """
    if not results:
        raise S2ClipError("no sources to plot")
    clip_layers = [int(s[5:]) for s in results if s.startswith("clip:") and s[5:].isdigit()]
    fig = Figure(figsize=(7.0, 5.0))
    ax = fig.add_subplot()
    vfm_index = 0
    for source, res in results.items():
        style = _source_style(source, clip_layers, vfm_index)
        if not source.startswith("clip:"):
            vfm_index += 1
        ap = float(res.get("ap", math.nan))
        label = f"{source} (AP {ap:.3f})" if math.isfinite(ap) else f"{source} (AP n/a)"
        recall, precision = list(res.get("recall", [])), list(res.get("precision", []))
        if len(recall) != len(precision):
            raise S2ClipError(f"{source}: precision and recall differ in length")
        if recall:
            ax.plot(recall, precision, label=label, **style)
        else:
            ax.plot([], [], label=label, **style)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)
