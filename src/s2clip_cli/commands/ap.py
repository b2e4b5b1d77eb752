"""Driver of `s2clip ap` (semantic consistency of patch features, Figure 3): windows of dataset
images through CLIP and the VFMs in bounded batches under the run's precision, patch pairs sampled
per window, AP per feature source, then a table, JSON and PR curves."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ..analysis.consistency import APAccumulator, pair_scores, parse_sources, patch_labels, sample_pairs
from ..analysis.features import clip_layer_maps, image_windows, vfm_maps, window_multiple
from ..analysis.reports import ap_table, write_ap_outputs
from ..config import CROP
from ..models.clip import ClipBackbone
from ..models.factory import load_single, resolve_device
from ..models.precision import compute_dtype, dtype_name
from ..pipeline.transforms import rescale_size
from ..pipeline.windows import sliding_windows
from .inputs import default_figure_datasets, image_sources, progress_bar


def default_sources(max_layer: int) -> str:
    return f"clip:0-{max_layer},dino_vitb8,dinov2_vitb14,sam_vitb16"


def run_ap(dataset_names: list[str], data_root: Path | None, *, sources: str | None, backbone: str = "ViT-B/16",
           pairs: int = 2000, seed: int = 0, limit: int | None = None, out_dir: Path, models: str = "real",
           device: str = "auto", precision: str = "auto", window_batch: int = 4, offline: bool = False,
           console: Console | None = None, record_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """AP of patch-pair cosine similarity for "same ground-truth class", per feature source.

    Pairs are drawn per window from a generator seeded by (seed, image, window, source), so the
    sample does not depend on how windows are batched."""
    console = console or Console(stderr=True)
    if not dataset_names:
        dataset_names = default_figure_datasets(console)
    dev = resolve_device(device)
    dtype = compute_dtype(precision, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clip: ClipBackbone = load_single("clip", backbone, mode=models, offline=offline, device=dev)
        max_layer = clip.num_blocks - 2
        names = parse_sources(sources or default_sources(max_layer), max_layer=max_layer)
        clip_layers = [int(s.split(":")[1]) for s in names if s.startswith("clip:")]
        vfms = {s: load_single("vfm", s, mode=models, offline=offline, device=dev) for s in names
                if not s.startswith("clip:")}
    multiple = window_multiple(clip.patch_size, *(int(v.patch_size) for v in vfms.values()))
    acc = APAccumulator()
    for source in image_sources(dataset_names, data_root, None, limit):
        preset = source.dataset.preset
        with progress_bar(console) as progress:
            task = progress.add_task(f"ap {source.name}", total=len(source.items))
            for item in source.items:
                image = source.image(item)
                h, w = rescale_size(*image.shape[:2], preset.short_side)
                per_window = max(1, pairs // len(sliding_windows(h, w, CROP, preset.stride)))
                window = 0
                for batch in image_windows(image, short_side=preset.short_side, stride=preset.stride,
                                           multiple=multiple, batch_size=window_batch, label=source.label(item)):
                    feats: dict[str, torch.Tensor] = {}
                    if clip_layers:
                        maps = clip_layer_maps(clip, batch.crops, clip_layers, dtype)
                        feats.update({f"clip:{k}": v for k, v in maps.items()})
                    for vname, vfm in vfms.items():
                        feats[vname] = vfm_maps(vfm, batch.crops, dtype)
                    for b, label in enumerate(batch.labels or []):
                        for s, name in enumerate(names):
                            fmap = feats[name]
                            plab = patch_labels(label, tuple(fmap.shape[-2:]), ignore_index=preset.ignore_index)
                            rng = np.random.default_rng([seed, item, window + b, s])
                            a, c, same = sample_pairs(plab, per_window, rng)
                            if len(a):
                                acc.add(name, pair_scores(fmap[b], a, c), same)
                    window += batch.crops.shape[0]
                progress.advance(task)
    results = acc.results()
    console.print(ap_table(results))
    meta = {"config": record_config or {}, "backbone": backbone, "models": models, "device": dev.type,
            "precision": dtype_name(dtype)}
    written = write_ap_outputs(results, out_dir, meta=meta)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return results
