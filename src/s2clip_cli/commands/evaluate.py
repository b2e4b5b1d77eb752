"""Driver of `s2clip eval`: a Segmenter configured by each dataset's preset, fed to the resumable
(and, under torchrun, sharded) runner."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..data.check import official_count_mismatch
from ..data.datasets import SegDataset, open_dataset
from ..data.presets import CUSTOM, PRESETS, DatasetPreset
from ..data.sources import default_data_root, prepare_command
from ..errors import S2ClipError
from ..evaluation.distributed import DistContext
from ..evaluation.runner import evaluate
from ..models.factory import prefetch_weights
from ..models.precision import dtype_name
from ..pipeline.segmenter import SD_MODEL, Segmenter, SegmenterConfig


def presets_table() -> Table:
    """`s2clip eval --list-datasets`: the preset table."""
    table = Table(title="s2clip evaluation presets")
    table.add_column("dataset", no_wrap=True, min_width=14)
    for col in ("classes", "bg", "reduce 0", "short side", "crop/ stride", "prob_thd", "coarse", "logit scale",
                "folder under a data root"):
        table.add_column(col, overflow="fold")
    for p in PRESETS.values():
        table.add_row(p.name, str(p.num_classes), "yes" if p.has_background else "no",
                      "yes" if p.reduce_zero_label else "no", str(p.short_side), f"{p.crop}/{p.stride}",
                      f"{p.prob_thd:g}", f"{p.coarse_thresh:g}", f"{p.logit_scale:g}", p.subdir)
    return table


def segmenter_config_for(base: SegmenterConfig, preset: DatasetPreset,
                         sd_threshold: float | None = None) -> SegmenterConfig:
    """The preset fixes resize scale, windows, prob_thd, logit scale, the coarse threshold and the SD
    threshold (unless `sd_threshold` is given)."""
    return dataclasses.replace(
        base, short_side=preset.short_side, crop=preset.crop, stride=preset.stride,
        prob_thd=preset.prob_thd, logit_scale=preset.logit_scale,
        refine=dataclasses.replace(base.refine, coarse_thresh=preset.coarse_thresh),
        sd_threshold=preset.sd_threshold if sd_threshold is None else sd_threshold,
    )


def split_background(dataset: SegDataset) -> tuple[list[list[str]], list[str] | None]:
    """(foreground classes, background names): with-background presets query class 0's names."""
    if dataset.preset.has_background:
        return dataset.class_names[1:], dataset.class_names[0]
    return dataset.class_names, None


def run_config(cfg: SegmenterConfig, seg: Segmenter) -> dict[str, Any]:
    """Settings that change predictions (the runner hashes them to refuse mixing runs): the
    pipeline's, the weights' content identities, the device type and the precisions."""
    rc = cfg.refine
    return {
        "clip": cfg.clip, "vfm": cfg.vfm, "layers": seg.layers, "combine": cfg.combine,
        "entropy_tau": cfg.entropy_tau, "short_side": cfg.short_side, "crop": cfg.crop, "stride": cfg.stride,
        "beta": cfg.beta, "gamma": cfg.gamma, "logit_scale": cfg.logit_scale, "prob_thd": cfg.prob_thd,
        "sam": cfg.sam, "refine": dataclasses.asdict(rc) if cfg.sam else None,
        "models": cfg.models, "weights": seg.models.identity,
        "device": seg.device.type, "precision": dtype_name(seg.dtype),
        "sam_encoder_precision": dtype_name(seg.sam_dtype) if cfg.sam else None,
        "sd": {"threshold": cfg.sd_threshold, "seed": cfg.seed} if cfg.sd else None,
    }


def resolve_data_root(name: str, data_root: Path | None, several: bool) -> Path:
    """`--data-root` as given (with several datasets: their parent, each in its preset's folder), or
    the default data folder; a dataset that is not there names the command that prepares it."""
    if data_root is not None:
        return data_root / PRESETS[name].subdir if several else data_root
    root = default_data_root(name)
    if not root.exists():
        raise S2ClipError(f"{name} is not in the default data folder ({root}): prepare it with "
                          f"`{prepare_command(name)}`, or give --data-root")
    return root


def open_datasets(names: list[str], data_root: Path | None, **custom: Any) -> list[tuple[str, SegDataset]]:
    """Every dataset opened first, so that a wrong layout is reported before any model is loaded."""
    if names == [CUSTOM]:
        return [(CUSTOM, open_dataset(CUSTOM, None, **custom))]
    several = len(names) > 1
    return [(name, open_dataset(name, resolve_data_root(name, data_root, several))) for name in names]


def run_eval(dataset_names: list[str], data_root: Path | None, base: SegmenterConfig, *, work_dir: Path,
             limit: int | None = None, save_preds: bool = False, num_workers: int = 2,
             images: Path | None = None, masks: Path | None = None, class_names: Path | None = None,
             reduce_zero_label: bool = False, console: Console | None = None,
             record_config: dict[str, Any] | None = None, sd_threshold: float | None = None) -> list[dict[str, Any]]:
    """Evaluate on each dataset; returns each dataset's results dict."""
    console = console or Console(stderr=True)
    device = str(base.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ctx = DistContext.from_env(device)
    try:
        if device.startswith("cuda") and ctx.is_distributed:
            device = f"cuda:{ctx.local_rank}"
        base = dataclasses.replace(base, device=device)
        datasets = open_datasets(dataset_names, data_root, images=images, masks=masks, class_names=class_names,
                                 reduce_zero_label=reduce_zero_label)
        # Under several ranks, rank 0 fetches the weights while the others wait.
        prefetch_weights(base.clip, base.vfm, base.sam, sd_name=SD_MODEL if base.sd else None, mode=base.models,
                         paths=base.weights, offline=base.offline, group=ctx)
        many = len(datasets) > 1
        models = None
        results = []
        for name, ds in datasets:
            mismatch = official_count_mismatch(name, len(ds)) if name != CUSTOM else None
            if mismatch and ctx.is_main:
                console.print(f"[bold yellow]warning:[/] {mismatch}", highlight=False)
            cfg = segmenter_config_for(base, ds.preset, sd_threshold)
            classes, background = split_background(ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                seg = Segmenter.build(cfg, classes, background, models=models)
            models = seg.models  # one set of models for every dataset
            use_sam = cfg.sam is not None

            def predict(image: np.ndarray, image_id: str, seg: Segmenter = seg, use_sam: bool = use_sam) -> np.ndarray:
                return seg(image, refine=use_sam).labels

            out_dir = work_dir / name if many else work_dir
            settings = {**run_config(cfg, seg), "dataset_warning": mismatch}
            results.append(evaluate(ds, predict, work_dir=out_dir, config=settings, limit=limit,
                                    save_preds=save_preds, num_workers=num_workers, console=console,
                                    dist=ctx, device=device, options=record_config))
        return results
    finally:
        ctx.close()
