"""Driver of `s2clip entropy` (Algorithm 1 per CLIP layer, Figure 4): every window of every image
through CLIP in bounded batches, per-layer statistics averaged over windows and images, then a
table, JSON/CSV and the heatmap."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from ..analysis.features import clip_layer_maps, image_windows
from ..analysis.reports import ENTROPY_STATS, entropy_table, write_entropy_outputs
from ..config import SEGMENT_SHORT_SIDE
from ..models.clip import ClipBackbone
from ..models.factory import load_single, resolve_device
from ..models.precision import compute_dtype, dtype_name
from ..pipeline.spatial_entropy import spatial_entropy
from .inputs import default_figure_datasets, image_sources, progress_bar


def run_entropy(backbone: str, dataset_names: list[str], data_root: Path | None, *, images_dir: Path | None = None,
                limit: int | None = None, out_dir: Path, models: str = "real", device: str = "auto",
                precision: str = "auto", window_batch: int = 4, offline: bool = False, weights: Path | None = None,
                console: Console | None = None, record_config: dict[str, Any] | None = None) -> dict:
    """Mean spatial entropy / Gini / channel correlation per CLIP layer and dataset.

    Algorithm 1 runs on each window's token map of each layer (so results do not depend on how
    windows are batched); values are averaged over the windows of an image, then over images."""
    console = console or Console(stderr=True)
    if not dataset_names and images_dir is None:
        dataset_names = default_figure_datasets(console)
    dev = resolve_device(device)
    dtype = compute_dtype(precision, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clip: ClipBackbone = load_single("clip", backbone, mode=models, path=weights, offline=offline, device=dev)
    layers = list(range(clip.num_blocks - 1))
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for source in image_sources(dataset_names, data_root, images_dir, limit):
        short_side = source.dataset.preset.short_side if source.dataset is not None else SEGMENT_SHORT_SIDE
        stride = source.dataset.preset.stride if source.dataset is not None else 224
        sums = {layer: dict.fromkeys(ENTROPY_STATS, 0.0) for layer in layers}
        with progress_bar(console) as progress:
            task = progress.add_task(f"entropy {source.name}", total=len(source.items))
            for item in source.items:
                image_sums = {layer: dict.fromkeys(ENTROPY_STATS, 0.0) for layer in layers}
                windows = 0
                for batch in image_windows(source.image(item), short_side=short_side, stride=stride,
                                           multiple=clip.patch_size, batch_size=window_batch):
                    maps = clip_layer_maps(clip, batch.crops, layers, dtype)
                    for layer, fmap in maps.items():
                        for b in range(fmap.shape[0]):
                            for key, value in spatial_entropy(fmap[b:b + 1]).items():
                                image_sums[layer][key] += value
                    windows += batch.crops.shape[0]
                for layer in layers:
                    for key in ENTROPY_STATS:
                        sums[layer][key] += image_sums[layer][key] / windows
                progress.advance(task)
        n = len(source.items)
        stats[source.name] = {f"layer {layer}": {k: v / n for k, v in s.items()} for layer, s in sums.items()}
    console.print(entropy_table(stats))
    meta = {"config": record_config or {}, "backbone": backbone, "models": models, "device": dev.type,
            "precision": dtype_name(dtype)}
    written = write_entropy_outputs(stats, out_dir, meta=meta)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return stats
