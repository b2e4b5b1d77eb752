"""Drivers of `s2clip entropy` (Algorithm 1 per CLIP layer, Figure 4) and `s2clip ap` (semantic
consistency of patch features, Figure 3): windows of dataset images through the models, statistics
accumulated over images, then tables, JSON/CSV and figures."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import CROP
from ..data.datasets import SegDataset, open_dataset
from ..errors import S2ClipError
from ..io.images import collect_images, read_image
from ..models.clip import CLIP_MEAN, CLIP_STD, ClipBackbone
from ..models.factory import load_single, resolve_device
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD
from ..pipeline.spatial_entropy import spatial_entropy
from ..pipeline.transforms import resize_short_side
from ..pipeline.windows import sliding_windows
from .consistency import APAccumulator, pair_scores, parse_sources, patch_labels, sample_pairs
from .reports import ap_table, entropy_table, write_ap_outputs, write_entropy_outputs


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def image_windows(image: np.ndarray, short_side: int, stride: int, multiple: int,
                  label: np.ndarray | None = None) -> tuple[torch.Tensor, list[np.ndarray] | None]:
    """Windows ``[B, 3, h, w]`` in [0, 1] of the resized image (zero-padded to `multiple`), and the
    label resized (nearest) and cut the same way, padding marked as ignore (255)."""
    resized = resize_short_side(image, short_side)
    h, w = resized.shape[:2]
    boxes = sliding_windows(h, w, CROP, stride)
    x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float().div(255)
    crops = torch.stack([x[:, y1:y2, x1:x2] for y1, x1, y2, x2 in boxes])
    ph, pw = -crops.shape[-2] % multiple, -crops.shape[-1] % multiple
    crops = F.pad(crops, (0, pw, 0, ph))
    labels = None
    if label is not None:
        lab = cv2.resize(label.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        labels = [np.pad(lab[y1:y2, x1:x2], ((0, ph), (0, pw)), constant_values=255) for y1, x1, y2, x2 in boxes]
    return crops, labels


def _normalize(crops: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    return (crops - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_layer_maps(clip: ClipBackbone, crops: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's patch-token map ``[B, D, h, w]`` (the residual stream after the block)."""
    device = next(clip.parameters()).device
    streams = clip.residual_streams(_normalize(crops, CLIP_MEAN, CLIP_STD).to(device), layers)
    gh, gw = streams.grid
    return {layer: s[:, 1:].transpose(1, 2).reshape(s.shape[0], -1, gh, gw).float().cpu()
            for layer, s in zip(streams.layers, streams.streams, strict=True)}


def _samples(dataset_names: list[str], data_root: Path | None, images_dir: Path | None,
             limit: int | None) -> Iterator[tuple[str, SegDataset | None, list]]:
    """(dataset name, dataset or None, items) per dataset; items are indices or image paths."""
    if images_dir is not None:
        paths = collect_images([images_dir])[:limit]
        yield images_dir.name, None, paths
        return
    from ..evaluation.eval_run import dataset_root

    for name in dataset_names:
        ds = open_dataset(name, dataset_root(name, data_root, len(dataset_names) > 1))
        yield name, ds, list(range(len(ds) if limit is None else min(limit, len(ds))))


def run_entropy(backbone: str, dataset_names: list[str], data_root: Path | None, *, images_dir: Path | None = None,
                limit: int | None = None, out_dir: Path, models: str = "real", device: str = "auto",
                offline: bool = False, weights: Path | None = None, console: Console | None = None) -> dict:
    """Mean spatial entropy / Gini / channel correlation per CLIP layer and dataset."""
    console = console or Console(stderr=True)
    dev = resolve_device(device)
    clip: ClipBackbone = load_single("clip", backbone, mode=models, path=weights, offline=offline, device=dev)
    layers = list(range(clip.num_blocks - 1))
    stats: dict[str, dict[str, dict[str, float]]] = {}
    for name, ds, items in _samples(dataset_names, data_root, images_dir, limit):
        short_side = ds.preset.short_side if ds is not None else 448
        sums = {layer: {"entropy": 0.0, "gini": 0.0, "channel_corr": 0.0} for layer in layers}
        with _progress(console) as progress:
            task = progress.add_task(f"entropy {name}", total=len(items))
            for item in items:
                image = ds.load_image(item) if ds is not None else read_image(item)
                crops, _ = image_windows(image, short_side, CROP, clip.patch_size)
                with torch.no_grad():
                    maps = clip_layer_maps(clip, crops, layers)
                for layer, fmap in maps.items():
                    for key, value in spatial_entropy(fmap).items():
                        sums[layer][key] += value
                progress.advance(task)
        if not items:
            raise S2ClipError(f"{name}: no images to analyse")
        stats[name] = {f"layer {layer}": {k: v / len(items) for k, v in s.items()} for layer, s in sums.items()}
    console.print(entropy_table(stats))
    written = write_entropy_outputs(stats, out_dir)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return stats


def run_ap(dataset_names: list[str], data_root: Path, *, sources: str | None, backbone: str = "ViT-B/16",
           pairs: int = 2000, seed: int = 0, limit: int | None = None, out_dir: Path, models: str = "real",
           device: str = "auto", offline: bool = False, console: Console | None = None) -> dict[str, Any]:
    """AP of patch-pair cosine similarity for "same ground-truth class", per feature source."""
    console = console or Console(stderr=True)
    dev = resolve_device(device)
    clip: ClipBackbone = load_single("clip", backbone, mode=models, offline=offline, device=dev)
    max_layer = clip.num_blocks - 2
    spec = sources or f"clip:0-{max_layer},dino_vitb8,dinov2_vitb14,sam_vitb16"
    names = parse_sources(spec, max_layer=max_layer)
    clip_layers = [int(s.split(":")[1]) for s in names if s.startswith("clip:")]
    vfms = {s: load_single("vfm", s, mode=models, offline=offline, device=dev) for s in names
            if not s.startswith("clip:")}
    multiple = math.lcm(clip.patch_size, *(int(v.patch_size) for v in vfms.values()))
    rng = np.random.default_rng(seed)
    acc = APAccumulator()
    for name, ds, items in _samples(dataset_names, data_root, None, limit):
        assert ds is not None
        with _progress(console) as progress:
            task = progress.add_task(f"ap {name}", total=len(items))
            for item in items:
                crops, labels = image_windows(ds.load_image(item), ds.preset.short_side, ds.preset.stride, multiple,
                                              ds.load_label(item))
                feats: dict[str, torch.Tensor] = {}
                with torch.no_grad():
                    if clip_layers:
                        feats.update({f"clip:{k}": v for k, v in clip_layer_maps(clip, crops, clip_layers).items()})
                    for vname, vfm in vfms.items():
                        feats[vname] = vfm(_normalize(crops, IMAGENET_MEAN, IMAGENET_STD).to(dev)).float().cpu()
                per_window = max(1, pairs // len(crops))
                for source in names:
                    fmap = feats[source]
                    for b, label in enumerate(labels or []):
                        plab = patch_labels(label, tuple(fmap.shape[-2:]), ignore_index=ds.preset.ignore_index)
                        a, c, same = sample_pairs(plab, per_window, rng)
                        if len(a):
                            acc.add(source, pair_scores(fmap[b], a, c), same)
                progress.advance(task)
    results = acc.results()
    console.print(ap_table(results))
    written = write_ap_outputs(results, out_dir)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return results
