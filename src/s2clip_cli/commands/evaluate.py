"""Driver of `s2clip eval`: a Segmenter configured by each dataset's preset and the method's protocol
on it, fed to the resumable (and, under torchrun, sharded) runner; `--method all` runs every method
into its own sub-folder and writes one comparison table."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..data.check import official_count_mismatch
from ..data.datasets import SegDataset, open_dataset
from ..data.presets import CUSTOM, PRESETS
from ..data.sources import default_data_root, prepare_command
from ..distributed import DistContext
from ..errors import S2ClipError
from ..evaluation.runner import evaluate, lock_work_dirs
from ..io.files import atomic_write_text, write_json
from ..methods import TABLE_HEADERS, get_method
from ..models.factory import LoadedModels, load_models, prefetch_weights, resolve_device
from ..models.precision import compute_dtype, dtype_name
from ..pipeline.segmenter import SD_MODEL, Segmenter, SegmenterConfig
from .methods import method_class_names, method_config


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


def split_background(dataset: SegDataset) -> tuple[list[list[str]], list[str] | None]:
    """(foreground classes, background names): with-background presets query class 0's names."""
    if dataset.preset.has_background:
        return dataset.class_names[1:], dataset.class_names[0]
    return dataset.class_names, None


def run_config(cfg: SegmenterConfig, seg: Segmenter) -> dict[str, Any]:
    """Settings that change predictions (the runner hashes them to refuse mixing runs): the
    pipeline's, the weights' content identities, the device type and the precisions."""
    rc = cfg.refine
    method = seg.method
    masks = {"instance_masks": seg.mask_source.identity} if seg.mask_source is not None else {}
    return {**masks,
        "method": cfg.method, "clip": cfg.clip, "vfm": cfg.vfm if method.vfm is not None else None,
        "layers": seg.layers, "combine": cfg.combine,
        "entropy_tau": cfg.entropy_tau, "short_side": cfg.short_side, "crop": cfg.crop, "stride": cfg.stride,
        "beta": cfg.beta, "gamma": cfg.gamma, "logit_scale": cfg.logit_scale, "prob_thd": cfg.prob_thd,
        "sam": cfg.sam, "refine": dataclasses.asdict(rc) if cfg.sam else None,
        "models": cfg.models, "weights": used_weights(cfg, seg),
        "device": seg.device.type, "precision": dtype_name(seg.dtype),
        "sam_encoder_precision": dtype_name(seg.sam_dtype) if cfg.sam else None,
        "sd": {"threshold": cfg.sd_threshold, "seed": cfg.seed} if cfg.sd else None,
        **method_settings_record(cfg),
    }


def used_weights(cfg: SegmenterConfig, seg: Segmenter) -> dict[str, str]:
    """The content identities of the models this configuration runs (a shared model set may hold
    more, `ModelPool`)."""
    used = {cfg.clip}
    if seg.method.vfm is not None:
        used.add(cfg.vfm)
    if cfg.sam is not None:
        used.add(cfg.sam)
    if cfg.sd:
        used.add(SD_MODEL)
    return {name: ident for name, ident in seg.models.identity.items() if name in used}


def method_settings_record(cfg: SegmenterConfig) -> dict[str, Any]:
    """The method-specific settings that change predictions (only those the method uses, so that
    the default method's record is what it was before methods existed, plus its name)."""
    method = get_method(cfg.method)
    out: dict[str, Any] = {}
    if cfg.whole_image:
        out["whole_image"] = True
    if cfg.area_thd is not None:
        out["area_thd"] = cfg.area_thd
    if cfg.templates != "openai80":
        out["templates"] = cfg.templates
    if cfg.pamr:
        out["pamr"] = {"iterations": cfg.pamr_iterations, "dilations": list(cfg.pamr_dilations)}
    if method.strategy == "neighbourhood":
        out["sigma"] = cfg.sigma
    if method.name == "cliper":
        out["attention_thr"] = cfg.attention_thr
    if cfg.method_options:
        out["method_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.method_options.items()}
    if method.name == "trident":
        out["trident"] = {"cos_fac": cfg.cos_fac, "refine_neg_cos": cfg.refine_neg_cos, "halves": cfg.sam_halves,
                          "sam_prompts": cfg.sam_refine}
    return out


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


class ModelPool:
    """Loaded model sets of one process, shared between methods (`eval --method all`): a method
    reuses a set holding its CLIP, and its VFM and SAM when it needs them; a new set reuses the CLIP
    already loaded (so text embeddings are computed once per CLIP)."""

    def __init__(self) -> None:
        self.sets: list[LoadedModels] = []

    def get(self, cfg: SegmenterConfig) -> LoadedModels:
        needs_vfm = get_method(cfg.method).vfm is not None
        for models in self.sets:
            if self._fits(models, cfg, needs_vfm):
                return models
        device = resolve_device(cfg.device)
        models = load_models(cfg.clip, cfg.vfm if needs_vfm else None, cfg.sam, mode=cfg.models, paths=cfg.weights, offline=cfg.offline,
                             device=device, sd_name=SD_MODEL if cfg.sd else None,
                             sd_dtype=compute_dtype(cfg.precision, device))
        same_clip = next((m for m in self.sets if m.clip.name == cfg.clip), None)
        if same_clip is not None:
            models = dataclasses.replace(models, clip=same_clip.clip)
        self.sets.append(models)
        return models

    @staticmethod
    def _fits(models: LoadedModels, cfg: SegmenterConfig, needs_vfm: bool) -> bool:
        if models.clip.name != cfg.clip:
            return False
        if needs_vfm and cfg.vfm not in models.identity:
            return False
        if cfg.sam is not None and (models.sam is None or cfg.sam not in models.identity):
            return False
        return not (cfg.sd and models.sd is None)


def run_eval(dataset_names: list[str], data_root: Path | None, base: SegmenterConfig, *, work_dir: Path,
             limit: int | None = None, save_preds: bool = False, num_workers: int = 2,
             images: Path | None = None, masks: Path | None = None, class_names: Path | None = None,
             reduce_zero_label: bool = False, console: Console | None = None,
             record_config: dict[str, Any] | None = None, explicit: dict[str, Any] | None = None,
             strict: bool = True, pool: ModelPool | None = None, locked: bool = False) -> list[dict[str, Any]]:
    """Evaluate `base.method` on each dataset; returns each dataset's results dict.

    Each dataset's configuration is the method's protocol on its preset (`commands.methods`) with
    the options in `explicit` (given by the user) on top. The work dirs are locked once the inputs
    are checked and before any weights are fetched or models built, so a work dir in use is refused
    at once (``locked``: the caller holds them, `run_eval_methods`)."""
    console = console or Console(stderr=True)
    device = str(resolve_device(base.device))
    ctx = DistContext.from_env(device)
    try:
        if device.startswith("cuda") and ctx.is_distributed:
            device = f"cuda:{ctx.cuda_index}"
        base = dataclasses.replace(base, device=device)
        datasets = open_datasets(dataset_names, data_root, images=images, masks=masks, class_names=class_names,
                                 reduce_zero_label=reduce_zero_label)
        for _, ds in datasets:
            if ctx.is_main:
                for notice in ds.notices:
                    console.print(f"[bold yellow]warning:[/] {escape(notice)}", highlight=False, soft_wrap=True)
        configs = [method_config(base, base.method, ds.preset, explicit, strict=strict) for _, ds in datasets]
        locks = contextlib.ExitStack() if locked else lock_work_dirs(dataset_work_dirs(work_dir, dataset_names), ctx)
        return _run_eval(ctx, datasets, configs, locks, work_dir=work_dir, limit=limit, save_preds=save_preds,
                         num_workers=num_workers, console=console, record_config=record_config, pool=pool,
                         device=device)
    finally:
        ctx.close()


def dataset_work_dirs(work_dir: Path, dataset_names: list[str]) -> list[Path]:
    """Where each dataset's records and results go: ``work_dir`` itself, or with several datasets
    ``work_dir/<dataset>``."""
    return [work_dir / name for name in dataset_names] if len(dataset_names) > 1 else [work_dir]


def _run_eval(ctx: DistContext, datasets: list[tuple[str, SegDataset]], configs: list[SegmenterConfig],
              locks: contextlib.ExitStack, *, work_dir: Path, limit: int | None, save_preds: bool,
              num_workers: int, console: Console, record_config: dict[str, Any] | None, pool: ModelPool | None,
              device: str) -> list[dict[str, Any]]:
    """`run_eval` once the inputs are checked and the work dirs locked (released on return)."""
    with locks:
        first = configs[0]
        # Under several ranks, rank 0 fetches the weights while the others wait.
        prefetch_weights(first.clip, first.vfm if get_method(first.method).vfm else None, first.sam,
                         sd_name=SD_MODEL if first.sd else None,
                         mode=first.models, paths=first.weights, offline=first.offline, group=ctx)
        out_dirs = dataset_work_dirs(work_dir, [name for name, _ in datasets])
        models = None
        results = []
        for (name, ds), cfg, out_dir in zip(datasets, configs, out_dirs, strict=True):
            mismatch = official_count_mismatch(name, len(ds)) if name != CUSTOM else None
            if mismatch and ctx.is_main:
                console.print(f"[bold yellow]warning:[/] {escape(mismatch)}", highlight=False, soft_wrap=True)
            variant = method_class_names(cfg.method, ds.preset)
            if variant is not None:  # the method's own class-name file (e.g. ClearCLIP's 'background')
                ds = dataclasses.replace(ds, class_names=variant)
            classes, background = split_background(ds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                if models is None and pool is not None:
                    models = pool.get(cfg)
                seg = Segmenter.build(cfg, classes, background, models=models)
            models = seg.models  # one set of models for every dataset
            use_sam = seg.uses_sam_prompts
            # Pre-generated instance masks are found by the image file's stem (CorrCLIP's <stem>.npz).
            stems = {sample.id: sample.image.stem for sample in ds.samples} if seg.mask_source is not None else {}

            def predict(image: np.ndarray, image_id: str, seg: Segmenter = seg, use_sam: bool = use_sam,
                        stems: dict[str, str] = stems) -> np.ndarray:
                return seg(image, refine=use_sam, name=stems.get(image_id)).labels

            settings = {**run_config(cfg, seg), "dataset_warning": mismatch}
            results.append(evaluate(ds, predict, work_dir=out_dir, config=settings, limit=limit,
                                    save_preds=save_preds, num_workers=num_workers, console=console,
                                    dist=ctx, device=device, options=record_config, locked=True))
        return results


def run_eval_methods(methods: list[str], dataset_names: list[str], data_root: Path | None, base: SegmenterConfig,
                     *, work_dir: Path, record_config: dict[str, Any] | None = None,
                     console: Console | None = None, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """`eval --method all`: each method in turn into ``work_dir/<method>/`` (options that a method
    cannot use are skipped for it), sharing loaded models; then ``work_dir/comparison.md`` and
    ``comparison.json`` (method × dataset mIoU next to the reported value). Returns each method's
    results."""
    console = console or Console(stderr=True)
    pool = ModelPool()
    by_method: dict[str, list[dict[str, Any]]] = {}
    dirs = [d for method in methods for d in dataset_work_dirs(work_dir / method, dataset_names)]
    ctx = DistContext.from_env(str(resolve_device(base.device)))  # (each run_eval joins this group)
    try:
        with lock_work_dirs(dirs, ctx):  # every method's folders, before any model is built
            for method in methods:
                console.print(f"[bold]method {method}[/]", highlight=False)
                record = {**(record_config or {}), "method": method}
                by_method[method] = run_eval(dataset_names, data_root, dataclasses.replace(base, method=method),
                                             work_dir=work_dir / method, record_config=record, console=console,
                                             strict=False, pool=pool, locked=True, **kwargs)
    finally:
        ctx.close()
    if int(os.environ.get("RANK", "0")) == 0:
        write_comparison(work_dir, dataset_names, by_method)
    return by_method


def comparison(dataset_names: list[str], by_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Method × dataset: our mIoU (and images evaluated) next to the first reported value."""
    rows: dict[str, dict[str, Any]] = {}
    for method, results in by_method.items():
        reported = get_method(method).reported[0]
        cells = {}
        for name, res in zip(dataset_names, results, strict=True):
            cells[name] = {"miou": res["summary"]["mIoU"], "num_images": res.get("num_images"),
                           "reported": reported.miou.get(name), "reported_caveat": reported.caveats.get(name)}
        rows[method] = {"reported_source": reported.source, "datasets": cells}
    return {"datasets": dataset_names, "methods": rows}


def comparison_markdown(table: dict[str, Any]) -> str:
    """The comparison as a markdown table: ``ours (reported)`` per cell."""
    names = table["datasets"]
    header = ["method", *(TABLE_HEADERS.get(n, n) for n in names)]
    lines = ["# s2clip: methods under one protocol", "",
             "mIoU (%) from this run, the method's reported value in parentheses (– none; * other dataset or "
             "protocol; see `s2clip methods`).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in table["methods"].items():
        cells = []
        for n in names:
            c = row["datasets"][n]
            rep = "–" if c["reported"] is None else f"{c['reported']:g}" + ("*" if c["reported_caveat"] else "")
            cells.append(f"{c['miou']:.2f} ({rep})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Reported values:", ""] + [f"- {m}: {r['reported_source']}" for m, r in table["methods"].items()]
    lines.append("")
    return "\n".join(lines)


def write_comparison(work_dir: Path, dataset_names: list[str], by_method: dict[str, list[dict[str, Any]]]) -> Path:
    """``comparison.json`` and ``comparison.md`` in `work_dir` (atomic); returns the markdown path."""
    table = comparison(dataset_names, by_method)
    write_json(work_dir / "comparison.json", table)
    return atomic_write_text(work_dir / "comparison.md", comparison_markdown(table))
