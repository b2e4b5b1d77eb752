"""`s2clip eval` as a library function: a Segmenter configured by a dataset preset, fed to the
resumable (and, under torchrun, sharded) runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ..config import PRESETS, DatasetPreset
from ..data.datasets import SegDataset, open_dataset
from ..errors import S2ClipError
from ..pipeline.segmenter import Segmenter, SegmenterConfig
from .distributed import DistContext
from .runner import evaluate

# Where each preset lives under one data root for `--dataset all` (MMSegmentation's conventions).
ALL_SUBDIRS: dict[str, str] = {
    "voc21": "VOCdevkit/VOC2012",
    "voc20": "VOCdevkit/VOC2012",
    "context60": "VOCdevkit/VOC2010",
    "context59": "VOCdevkit/VOC2010",
    "coco_object": "coco_stuff164k",
    "coco_stuff164k": "coco_stuff164k",
    "cityscapes": "cityscapes",
    "ade20k": "ade/ADEChallengeData2016",
}


def dataset_root(name: str, data_root: Path | None, several: bool) -> Path | None:
    """With several datasets, `data_root` is their parent and each lives in its usual sub-folder."""
    return data_root / ALL_SUBDIRS[name] if (several and data_root is not None) else data_root


def presets_table() -> Table:
    """`s2clip eval --list-datasets`: the preset table."""
    table = Table(title="s2clip evaluation presets")
    table.add_column("dataset", no_wrap=True, min_width=14)
    for col in ("classes", "bg", "reduce 0", "short side", "crop/ stride", "prob_thd", "coarse", "logit scale",
                "subdir (--dataset all)"):
        table.add_column(col, overflow="fold")
    for p in PRESETS.values():
        table.add_row(p.name, str(p.num_classes), "yes" if p.has_background else "no",
                      "yes" if p.reduce_zero_label else "no", str(p.short_side), f"{p.crop}/{p.stride}",
                      f"{p.prob_thd:g}", f"{p.coarse_thresh:g}", f"{p.logit_scale:g}", ALL_SUBDIRS[p.name])
    return table


def segmenter_config_for(base: SegmenterConfig, preset: DatasetPreset) -> SegmenterConfig:
    """The preset fixes resize scale, windows, prob_thd, logit scale and the coarse threshold."""
    return dataclasses.replace(
        base, short_side=preset.short_side, crop=preset.crop, stride=preset.stride,
        prob_thd=preset.prob_thd, logit_scale=preset.logit_scale,
        refine=dataclasses.replace(base.refine, coarse_thresh=preset.coarse_thresh),
    )


def split_background(dataset: SegDataset) -> tuple[list[list[str]], list[str] | None]:
    """(foreground classes, background names): with-background presets query class 0's names."""
    if dataset.preset.has_background:
        return dataset.class_names[1:], dataset.class_names[0]
    return dataset.class_names, None


def run_config(cfg: SegmenterConfig, seg: Segmenter) -> dict[str, Any]:
    """Settings that change predictions (the runner hashes them to refuse mixing runs)."""
    rc = cfg.refine
    return {
        "clip": cfg.clip, "vfm": cfg.vfm, "layers": seg.layers, "combine": cfg.combine,
        "entropy_tau": cfg.entropy_tau, "short_side": cfg.short_side, "crop": cfg.crop, "stride": cfg.stride,
        "beta": cfg.beta, "gamma": cfg.gamma, "logit_scale": cfg.logit_scale, "prob_thd": cfg.prob_thd,
        "sam": cfg.sam, "refine": dataclasses.asdict(rc) if cfg.sam else None,
        "models": cfg.models, "weights": seg.models.identity,
    }


def run_eval(dataset_names: list[str], data_root: Path | None, base: SegmenterConfig, *, work_dir: Path,
             limit: int | None = None, save_preds: bool = False, num_workers: int = 2,
             images: Path | None = None, masks: Path | None = None, class_names: Path | None = None,
             reduce_zero_label: bool = False, console: Console | None = None) -> list[dict[str, Any]]:
    """Evaluate on each dataset; returns each dataset's results dict."""
    console = console or Console(stderr=True)
    device = str(base.device)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = DistContext.from_env(device)
    try:
        if device.startswith("cuda") and ctx.is_distributed:
            device = f"cuda:{ctx.local_rank}"
        base = dataclasses.replace(base, device=device)
        many = len(dataset_names) > 1
        # Open every dataset first: a wrong layout is reported before any model is loaded.
        datasets: list[tuple[str, SegDataset]] = []
        for name in dataset_names:
            ds = open_dataset(name, dataset_root(name, data_root, many), images=images, masks=masks, class_names=class_names,
                              reduce_zero_label=reduce_zero_label)
            datasets.append((name, ds))
        models = None
        results = []
        for name, ds in datasets:
            cfg = segmenter_config_for(base, ds.preset)
            classes, background = split_background(ds)
            seg = Segmenter.build(cfg, classes, background, models=models)
            models = seg.models  # one set of models for every dataset
            use_sam = cfg.sam is not None

            def predict(image: np.ndarray, image_id: str, seg: Segmenter = seg, use_sam: bool = use_sam) -> np.ndarray:
                return seg(image, refine=use_sam).labels

            out_dir = work_dir / name if many else work_dir
            results.append(evaluate(ds, predict, work_dir=out_dir, config=run_config(cfg, seg), limit=limit,
                                    save_preds=save_preds, num_workers=num_workers, console=console,
                                    dist=ctx, device=device))
        return results
    finally:
        ctx.close()


def check_dataset_names(dataset: str | None, images: Path | None) -> list[str]:
    if dataset is None:
        if images is None:
            raise S2ClipError("give --dataset NAME (see --list-datasets) or --images/--masks/--class-names")
        return ["custom"]
    if dataset == "all":
        return list(PRESETS)
    names = [d.strip() for d in dataset.split(",") if d.strip()]
    for name in names:
        if name not in PRESETS and name != "custom":
            raise S2ClipError(f"unknown dataset {name!r}; choose one of: {', '.join(PRESETS)}, all")
    return names
