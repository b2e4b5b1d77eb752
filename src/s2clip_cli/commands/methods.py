"""Driver of `s2clip methods`, and the settings a method implies for a run.

`method_config` turns a method (``s2clip_cli.methods``) and, for `eval`/`bench-sam`, a benchmark
preset into a `SegmenterConfig`: the method's protocol on that benchmark (resize, windows or whole
image, logit scale, ``prob_thd``, ``area_thd``, templates, post-processing, Trident's and CLIPer's
knobs), with the options the user gave explicitly on top. For `segment` (no benchmark) the method's
own defaults apply, falling back to `segment`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ..data.class_names import read_class_file
from ..data.presets import PRESETS, DatasetPreset
from ..errors import S2ClipError
from ..methods import (
    HEAD_OPTION_LAYERS,
    METHODS,
    TABLE_HEADERS,
    TABLE_PRESETS,
    Method,
    get_method,
    method_table_rows,
    resolve_protocol,
)
from ..pipeline.segmenter import SegmenterConfig

METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
ALL = "all"

# Options a user may give that the methods also set: explicit values win (`method_config`).
OVERRIDABLE = frozenset({
    "short_side", "crop", "stride", "whole_image", "prob_thd", "area_thd", "logit_scale", "templates", "vfm",
    "sam", "no_sam", "layers", "combine", "pamr", "coarse_thresh", "sd_threshold", "clip", "instance_masks",
    "mask_points",
})
MASK_OPTIONS = ("instance_masks", "mask_points")  # apply to the methods that use instance masks


def methods_table() -> str:
    """`s2clip methods`: one row per method — strategy, residual/FFN, VFM, post-processing and the
    mIoU it reports (first source; ``*`` other dataset or protocol, ``–`` none) — as aligned plain
    text, then each row's source."""
    rows = method_table_rows()
    columns = ["method", "strategy", "residual/FFN", "VFM", "post-processing", *(TABLE_HEADERS[p] for p in TABLE_PRESETS)]
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    numeric = set(TABLE_HEADERS.values())

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if col in numeric else c.ljust(w)
                         for c, w, col in zip(cells, widths, columns, strict=True)).rstrip()

    out = ["Reported mIoU (%), ViT-B/16; * = other dataset or protocol, – = not reported", "",
           line(columns), line(["-" * w for w in widths])]
    out += [line([r[c] for c in columns]) for r in rows]
    out += ["", "Sources:"] + [f"  {r['method']}: {r['source']}" for r in rows]
    out += ["", "Run one: s2clip eval --method NAME --dataset voc21; all of them: s2clip eval --method all ..."]
    return "\n".join(out)


def _uses_sam_model(method: Method) -> bool:
    return "sam" in method.postprocess or "trident_sam_attention" in method.postprocess


def method_settings(method: str, preset: DatasetPreset | None, base: SegmenterConfig) -> dict[str, Any]:
    """`SegmenterConfig` field values `method` implies on `preset` (None: `segment`, no benchmark;
    a custom dataset's preset: the method's defaults over it). ``coarse_thresh`` is the SAM
    refinement's. Fields the method leaves open keep `base`'s values."""
    m = get_method(method)
    if preset is not None and preset.name in PRESETS:
        p = resolve_protocol(m, preset.name)
        short_side, crop, stride, whole = p.short_side, p.crop, p.stride, p.whole_image
        prob_thd, logit_scale, templates, extra = p.prob_thd, p.logit_scale, p.templates, dict(p.extra)
        area_thd = p.area_thd
    else:
        d = m.defaults
        short_side = d.short_side or (preset.short_side if preset is not None else base.short_side)
        whole = bool(d.whole_image)
        crop = d.crop or (preset.crop if preset is not None else base.crop)
        stride = d.stride or (preset.stride if preset is not None else base.stride)
        prob_thd = d.prob_thd if d.prob_thd is not None else (preset.prob_thd if preset is not None else base.prob_thd)
        logit_scale = d.logit_scale if d.logit_scale is not None else m.logit_scale
        templates, extra, area_thd = d.templates or "openai80", dict(d.extra), d.area_thd
    settings: dict[str, Any] = {
        "method": m.name, "short_side": short_side, "whole_image": whole,
        "crop": base.crop if crop is None else crop, "stride": base.stride if stride is None else stride,
        "prob_thd": prob_thd, "area_thd": area_thd, "logit_scale": logit_scale, "templates": templates,
        "sam": base.sam if _uses_sam_model(m) else None, "sam_refine": "sam" in m.postprocess,
        "pamr": "pamr" in m.postprocess,
        "pamr_iterations": int(extra.get("pamr_steps", base.pamr_iterations)),
        "pamr_dilations": tuple(extra.get("pamr_dilations", base.pamr_dilations)),
        "sam_halves": preset is not None and preset.name == "cityscapes",
        "method_options": dict(extra) if m.layers in HEAD_OPTION_LAYERS else {},
    }
    if m.vfm is not None:
        settings["vfm"] = m.vfm
    if m.clip is not None:
        settings["clip"] = m.clip
    for name in ("sigma", "beta", "gamma"):
        if getattr(m, name) is not None:
            settings[name] = getattr(m, name)
    if preset is not None:
        settings["coarse_thresh"] = float(extra.get("coarse_thresh", preset.coarse_thresh))
        settings["sd_threshold"] = float(extra.get("attention_thr", preset.sd_threshold))
        settings["cos_fac"], settings["refine_neg_cos"] = preset.cos_fac, preset.refine_neg_cos
    else:
        settings["cos_fac"] = float(extra.get("cos_fac", base.cos_fac))
        settings["refine_neg_cos"] = bool(extra.get("refine_neg_cos", base.refine_neg_cos))
        if "attention_thr" in extra:
            settings["sd_threshold"] = float(extra["attention_thr"])
    settings["attention_thr"] = float(extra.get("attention_thr", settings.get("sd_threshold", base.attention_thr)))
    return settings


def applicable(method: str, explicit: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the explicit options that apply to `method`, the names of those that do not): ``vfm`` only
    for methods with proxy attention, ``layers``/``combine`` only for the layer-fusing methods,
    ``instance_masks``/``mask_points`` only for the methods that use instance masks (CorrCLIP)."""
    m = get_method(method)
    kept, dropped = {}, []
    for name, value in explicit.items():
        if value is None:
            continue
        if name == "vfm" and m.vfm is None:
            dropped.append(name)
        elif name in MASK_OPTIONS and not m.instance_masks:
            dropped.append(name)
        elif name in ("layers", "combine") and (m.strategy != "proxy" or m.name == "trident") and not (
                name == "combine" and value == "mean"):
            dropped.append(name)
        else:
            kept[name] = value
    return kept, dropped


def method_config(base: SegmenterConfig, method: str, preset: DatasetPreset | None,
                  explicit: Mapping[str, Any] | None = None, *, strict: bool = True) -> SegmenterConfig:
    """`base` with `method`'s settings on `preset` (`method_settings`), then the options the user
    gave (`explicit`: `OVERRIDABLE` names; ``None`` values = not given). ``no_sam`` drops SAM's
    prompt refinement (and the SAM model, except for Trident, whose guidance needs it); an explicit
    ``sam`` adds SAM's prompt refinement to any method. With `strict`, an option the method cannot
    use (``--vfm`` on a method without a VFM, ``--layers`` on a single-layer one) is an error;
    otherwise it is skipped (``eval --method all``)."""
    given = {k: v for k, v in (explicit or {}).items() if v is not None}
    unknown = set(given) - OVERRIDABLE
    if unknown:
        raise S2ClipError(f"not method options: {', '.join(sorted(unknown))}")
    kept, dropped = applicable(method, given)
    if dropped and strict:
        m = get_method(method)
        why = {"vfm": "uses no VFM", "layers": "uses its own layers", "combine": "uses one layer",
               **{name: "uses no instance masks" for name in MASK_OPTIONS}}
        raise S2ClipError("; ".join(f"--{d.replace('_', '-')} does not apply to {method} (it {why[d]})"
                                    for d in dropped) + f" ({m.title})")
    settings = method_settings(method, preset, base)
    coarse = kept.pop("coarse_thresh", settings.pop("coarse_thresh", None))
    no_sam = bool(kept.pop("no_sam", False))
    if "sam" in kept:
        settings["sam_refine"] = True
    if ("crop" in kept or "stride" in kept) and "whole_image" not in kept:
        kept["whole_image"] = False  # windows asked for: a whole-image method slides instead
    settings.update(kept)
    if no_sam:
        settings["sam_refine"] = False
        if settings["method"] != "trident":
            settings["sam"] = None
    cfg = dataclasses.replace(base, **settings)
    if coarse is not None:
        cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, coarse_thresh=float(coarse)))
    return cfg


def method_class_names(method: str, preset: DatasetPreset) -> list[list[str]] | None:
    """The class names `method` queries on `preset` when its protocol names another class file
    than the preset's (ClearCLIP's single 'background'), else None."""
    if preset.name not in PRESETS:
        return None
    class_file = resolve_protocol(method, preset.name).class_file
    if class_file == preset.class_file:
        return None
    path = Path(str(resources.files("s2clip_cli.data").joinpath("class_names", class_file)))
    return read_class_file(path, strict=False)


def parse_methods(spec: str) -> list[str]:
    """`all` → every method in table order; otherwise the one method named."""
    if spec == ALL:
        return list(METHOD_NAMES)
    if spec not in METHODS:
        raise S2ClipError(f"unknown method {spec!r}; choose one of: {', '.join(METHOD_NAMES)}, {ALL}")
    return [spec]


__all__ = ["ALL", "METHOD_NAMES", "OVERRIDABLE", "applicable", "method_class_names", "method_config",
           "method_settings", "methods_table", "parse_methods"]
