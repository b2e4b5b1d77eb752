"""The methods table: S2CLIP and the training-free baselines, as data.

A *method* is a last-block attention strategy (``pipeline.attention.STRATEGIES``) plus whether the
last block keeps its residual skip and FFN, which CLIP layers feed the classifier, which vision
foundation model (VFM) supplies the attention, which post-processing steps run, and its own
protocol on each benchmark (resize, windows, thresholds, logit scale, class-name file). Every value
comes from the method's public code as read in ``shared/notes/attention-strategies.md`` (repos and
commits listed there); reported mIoU values carry their source. ``deviations`` says, per method,
what our protocol does differently from its repository.

This module is pure data (stdlib + ``s2clip_cli.config``); the pipeline reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from .config import BETA, GAMMA, LOGIT_SCALE
from .data.presets import PRESETS

# Benchmarks in the order the lineage's tables print them.
TABLE_PRESETS: tuple[str, ...] = (
    "voc21", "context60", "coco_object", "voc20", "cityscapes", "context59", "ade20k", "coco_stuff164k",
)
TABLE_HEADERS: dict[str, str] = {
    "voc21": "VOC21", "context60": "Ctx60", "coco_object": "Obj", "voc20": "VOC20",
    "cityscapes": "City", "context59": "Ctx59", "ade20k": "ADE", "coco_stuff164k": "Stuff",
}

# Which CLIP layers feed the classifier.
LAYERS_LAST = "last"  # the last block's output only
LAYERS_HIERARCHICAL = "hierarchical"  # S2CLIP: the last block's correlation on several kept streams
LAYERS_CLIPER = "cliper_all"  # CLIPer: last-block attention on every layer's ln_1 input, maps averaged
LAYERS_CORRCLIP = "corrclip_branches"  # CorrCLIP: last block + spatial (mean of mid streams) + semantic branches
# SC-CLIP and ResCLIP: heads of their own (pipeline.scclip, pipeline.resclip) around the strategy
# their last-block attention builds on (SC-CLIP: kk; ResCLIP: neighbourhood, NACLIP's).
LAYERS_SCCLIP = "scclip"
LAYERS_RESCLIP = "resclip"
LAYER_POLICIES: dict[str, str] = {
    LAYERS_LAST: "last block only",
    LAYERS_HIERARCHICAL: "S2CLIP hierarchical (kept streams 6–10 + correlation block)",
    LAYERS_CLIPER: "CLIPer all-layer fusion (12 maps averaged)",
    LAYERS_CORRCLIP: "CorrCLIP: last block's input + mean of streams 5–9 (spatial) + per-mask class tokens (semantic)",
    LAYERS_SCCLIP: "SC-CLIP: LOF anomaly repair of block 10's tokens, self-calibration from blocks 8 and 3, "
                   "multi-level fusion of blocks 3–9",
    LAYERS_RESCLIP: "ResCLIP: RCS (mean q-k attention of blocks 5–8) and SFR (a first pass's segmentation) "
                    "in the last block's attention",
}
# Methods whose per-benchmark `extra` knobs go to their head (SegmenterConfig.method_options).
HEAD_OPTION_LAYERS: frozenset[str] = frozenset({LAYERS_SCCLIP, LAYERS_RESCLIP})

# How a window that is not a multiple of the patch size is fed (sliding windows; the whole-image
# pass always feeds the image unpadded, as every reference does).
WINDOW_PAD = "pad"  # padded (centred) with the normalised mean colour to the patch multiple (ClearCLIP, ProxyCLIP)
WINDOW_DROP = "drop"  # fed as it is: the patch conv drops the remainder, logits stretched over the window (SCLIP, NACLIP)

# Where the whole-image pass's logits (on the patch grid, remainder dropped) are resized to.
WHOLE_TO_LABEL = "label"  # straight to the label size, one bilinear resize (SCLIP, ClearCLIP, ProxyCLIP)
WHOLE_VIA_IMAGE = "image"  # to the resized image, then to the label size (NACLIP's forward_feature + predict)

# Over what ``mean(S)`` of the proxy attention is taken.
PROXY_MEAN_WINDOW = "window"  # each window's own similarity matrix (ProxyCLIP's eval: one window per batch)
PROXY_MEAN_BATCH = "batch"  # all windows of the image, batched as Trident's get_windowed_imgs does

# Post-processing steps, in the order they run when a method lists several.
POSTPROCESS_STEPS: dict[str, str] = {
    "cliper_propagation": "CLIPer: last-layer map thresholded (attention_thr × class max), propagated by the "
                          "head-mean fused attention, plus the mean of the layer maps",
    "trident_sam_attention": "Trident splice-then-segment: window outputs pasted on the image grid and mixed "
                             "by SAM-ViT-B's last-block attention (cos_fac-thresholded) before ln_post/proj",
    "sd": "CLIPer fine-grained compensation: SD-2.1 self-attention (2 layers × 5 heads) product applied to "
          "the coarse class maps",
    "pamr": "PAMR: 10 iterations, dilations (8, 16), on the logits at label size",
    "sam": "Trident SAM prompt refinement (components → box + point + mask prompts)",
    "mask_correction": "CorrCLIP map correction: each class-agnostic instance mask takes its most common label",
}

# Steps a method lists that run only when asked for (the option that turns them on).
OPTIONAL_STEPS: dict[str, str] = {"sd": "--sd"}

TEMPLATES: dict[str, str] = {
    "openai80": "the 80 OpenAI ImageNet templates (open_clip's OPENAI_IMAGENET_TEMPLATES)",
    "maskclip85": "MaskCLIP: the 80 ImageNet templates + 5 'there is a {} in the scene' ones",
    "cliper_car15": "CLIPer template/car_template.txt (15 templates)",
}


@dataclass(frozen=True)
class Protocol:
    """Settings of one method on one benchmark; ``None`` = inherit (method default, then our preset).

    ``short_side``: mmseg ``Resize(scale=(2048, S), keep_ratio=True)``; ``crop``/``stride``: sliding
    window; ``whole_image``: no window, the resized image in one pass; ``prob_thd``: top probability
    under it → background; ``area_thd`` (SCLIP): a foreground class whose predicted area is at most
    this fraction of the foreground area is dropped before the argmax; ``class_file``: relative to
    ``s2clip_cli/data/class_names/``; ``extra``: method-specific knobs, named as the reference
    spells them."""

    short_side: int | None = None
    crop: int | None = None
    stride: int | None = None
    whole_image: bool | None = None
    prob_thd: float | None = None
    area_thd: float | None = None
    logit_scale: float | None = None
    class_file: str | None = None
    templates: str | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class ResolvedProtocol:
    """A method's complete settings on one benchmark (nothing left to inherit)."""

    method: str
    preset: str
    short_side: int
    crop: int | None  # None with whole_image (CLIPer's extra sliding window: see `extra`)
    stride: int | None
    whole_image: bool
    prob_thd: float
    area_thd: float | None
    logit_scale: float
    class_file: str
    templates: str
    extra: Mapping[str, Any]


@dataclass(frozen=True)
class Reported:
    """Published mIoU (%) per preset from one source; ``None`` = that source has no number.
    ``caveats`` flag presets whose number is from another dataset or protocol."""

    source: str
    miou: Mapping[str, float | None]
    caveats: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Method:
    """One row of the methods table."""

    name: str
    title: str
    strategy: str  # key of pipeline.attention.STRATEGIES
    residual: bool  # last block keeps the x + attention skip
    ffn: bool  # last block keeps ln_2 + MLP with its skip
    layers: str  # LAYERS_*
    vfm: str | None  # VFM model name (models.registry) for proxy attention
    postprocess: tuple[str, ...]  # POSTPROCESS_STEPS keys, in order
    logit_scale: float  # default; per-benchmark values in `protocol`
    defaults: Protocol  # method-wide settings (before per-benchmark overrides)
    protocol: Mapping[str, Protocol]  # per preset name; every preset present (possibly empty)
    reported: tuple[Reported, ...]  # first = the number the table shows
    deviations: str
    reference: str  # repository @ commit read
    sigma: float | None = None  # neighbourhood Gaussian std (patches)
    beta: float | None = None  # proxy attention
    gamma: float | None = None
    window_remainder: str = WINDOW_PAD  # WINDOW_*
    whole_image_logits: str = WHOLE_TO_LABEL  # WHOLE_*
    proxy_mean: str = PROXY_MEAN_WINDOW  # PROXY_MEAN_*
    # NACLIP: after the labels are taken, the merged class probabilities are divided by their sum.
    renormalize_probs: bool = False
    # The CLIP the reference runs (models.registry name) when it is not OpenAI's ViT-B/16 (`--clip` wins).
    clip: str | None = None
    # Needs class-agnostic instance masks (SAM 2's generator, or pre-generated files).
    instance_masks: bool = False


def _miou(values: tuple[float | None, ...]) -> Mapping[str, float | None]:
    """Eight numbers in TABLE_PRESETS order (VOC21/Ctx60/Obj/VOC20/City/Ctx59/ADE/Stuff)."""
    if len(values) != len(TABLE_PRESETS):
        raise ValueError(f"expected {len(TABLE_PRESETS)} values, got {len(values)}")
    return MappingProxyType(dict(zip(TABLE_PRESETS, values, strict=True)))


def _per_preset(**overrides: Protocol) -> Mapping[str, Protocol]:
    unknown = set(overrides) - set(PRESETS)
    if unknown:
        raise ValueError(f"unknown presets {sorted(unknown)}")
    return MappingProxyType({name: overrides.get(name, Protocol()) for name in PRESETS})


def _extra(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType(dict(values))


_PROTOCOL_COMMON = (
    "Common to all baselines under s2clip: open_clip with OpenAI weights; 0-255 images normalised with "
    "mmseg's SegDataPreProcessor constants (mean 122.771/116.746/104.094, std 68.501/66.632/70.323) as the "
    "mmseg family; the positional embedding is "
    "resampled as the mmseg family does (bicubic, scale factor (g+0.1)/14); windows are cut as mmseg's "
    "slide inference and, where the method's reference pads them, padded (centred, zeros after "
    "normalisation = mmseg's mean colour) to the patch multiple; overlapping window cosines are averaged before the logit scale; predictions are resized "
    "to the label size and scored by our mmseg-style IoU (confusion matrix); precision follows "
    "--precision (auto = fp16 on CUDA as the references run, fp32 on the CPU), attention softmax and "
    "classification always float32."
)

METHODS: dict[str, Method] = {}


def _add(method: Method) -> None:
    METHODS[method.name] = method


_add(Method(
    name="s2clip", title="S2CLIP (this package)", strategy="proxy", residual=False, ffn=False,
    layers=LAYERS_HIERARCHICAL, vfm="dino_vitb8", postprocess=("sam",), logit_scale=LOGIT_SCALE,
    defaults=Protocol(), protocol=_per_preset(), beta=BETA, gamma=GAMMA,
    reported=(
        Reported("seed paper Table 3, Ours, with post-processing (ViT-B/16)",
                 _miou((70.4, 39.8, 40.8, 86.2, 46.4, 43.6, 22.2, 28.7))),
        Reported("seed paper Table 3, Ours, without post-processing (ViT-B/16)",
                 _miou((66.1, 37.7, 39.4, 85.4, 42.8, 41.2, 21.0, 27.3))),
    ),
    deviations=(
        "Reference configuration: our presets (Trident's configs), DINO ViT-B/8 proxy attention with mean(S) "
        "per window, layers 6–10 (our choice of the paper's 'hierarchical' layers), SAM refinement. "
        "No public code exists to compare with."
    ),
    reference="seed paper (shared/seed); lineage YuHengsss/Trident a93b346, mc-lan/ProxyCLIP e7b767f",
))

_add(Method(
    name="proxyclip", title="ProxyCLIP", strategy="proxy", residual=False, ffn=False, layers=LAYERS_LAST,
    vfm="dino_vitb8", postprocess=(), logit_scale=40.0, beta=1.2, gamma=3.0,
    defaults=Protocol(short_side=336, crop=336, stride=112),
    protocol=_per_preset(
        voc21=Protocol(prob_thd=0.2),
        context60=Protocol(prob_thd=0.15),
        coco_object=Protocol(prob_thd=0.25),
        cityscapes=Protocol(short_side=448, crop=224, stride=112),
        ade20k=Protocol(short_side=448),
    ),
    reported=(
        Reported("Trident README table (ProxyCLIP's repo reports none); = seed paper Table 3",
                 _miou((61.3, 35.3, 37.5, 80.3, 38.1, 39.1, 20.2, 26.5))),
    ),
    deviations=(
        "Runs S2CLIP's code path with one layer (the last block's input), so --layers turns it hierarchical. "
        "mean(S) of the proxy attention is taken per window (ProxyCLIP: over the batch, which is one window in "
        "its eval, so equal); the VFM sees the mmseg-normalised window un-normalised with CLIP's constants and "
        "normalised for ImageNet, as ProxyCLIP; windows smaller than the crop are padded to the CLIP/VFM patch "
        "multiple (ProxyCLIP: 56); a whole-image pass (--whole-image) feeds the image unpadded (each patch conv "
        "drops its remainder) and resizes the logits straight to the label size, as ProxyCLIP's forward_feature; "
        "the DINO branch uses both image sides (ProxyCLIP uses the height for both, equal for square crops; its "
        "whole-image pass fails on non-square images); our class files are ProxyCLIP's ('; ' synonyms, same "
        "background words). " + _PROTOCOL_COMMON
    ),
    reference="mc-lan/ProxyCLIP e7b767f",
))

_add(Method(
    name="trident", title="Trident", strategy="proxy", residual=False, ffn=False, layers=LAYERS_LAST,
    vfm="dino_vitb16", postprocess=("trident_sam_attention", "sam"), logit_scale=40.0, beta=1.2, gamma=3.0,
    defaults=Protocol(extra=_extra(cos_fac=1.2, refine_neg_cos=True, sam_iou_thresh=0.8, minimal_area=225,
                                   sam_mask_coff=0.005)),
    protocol=_per_preset(
        voc21=Protocol(extra=_extra(coarse_thresh=0.2)),
        context60=Protocol(extra=_extra(coarse_thresh=0.15)),
        coco_object=Protocol(extra=_extra(coarse_thresh=0.25)),
        voc20=Protocol(extra=_extra(cos_fac=0.0)),
        cityscapes=Protocol(extra=_extra(cos_fac=3.0, refine_neg_cos=False, coarse_thresh=0.10)),
        context59=Protocol(extra=_extra(coarse_thresh=0.15)),
        ade20k=Protocol(extra=_extra(refine_neg_cos=False, coarse_thresh=0.05)),
        coco_stuff164k=Protocol(extra=_extra(coarse_thresh=0.05)),
    ),
    reported=(
        Reported("Trident README, image table, ViT-B/16 (with --sam_refine); = seed paper Table 3",
                 _miou((67.1, 38.6, 41.1, 84.5, 42.9, 42.2, 21.9, 28.3))),
        Reported("seed paper Table 1, Trident without post-processing (not in Trident's repo)",
                 _miou((64.5, 37.2, 39.5, 83.7, 40.4, 40.9, 20.9, 27.6))),
    ),
    deviations=(
        "Our presets are Trident's configs (resize, crop 336/stride 224, prob_thd, coarse_thresh, cos_fac, "
        "refine_neg_cos). Splice-then-segment as Trident: the resized image brought to multiples of 16 "
        "(its preprocess_image), per-window last-block tokens from DINO ViT-B/16 proxy attention (before "
        "ln_post) pasted on the image token grid and averaged, mixed by SAM ViT-B's cos_fac-thresholded "
        "last-block attention computed on the original image rounded up to x16 (Cityscapes: left/right "
        "halves), then ln_post/proj, cosines on SAM's grid, SAM prompt refinement (--no-sam skips only the "
        "prompts). As Trident, all windows of an image are one batch and mean(S) of the proxy attention is "
        "taken over that batch (so a window's attention depends on the other windows of its image; our "
        "s2clip and proxyclip methods take it per window); the VFM sees the mmseg-normalised windows "
        "un-normalised with CLIP's constants and normalised for ImageNet, as Trident. Differences: the SAM branch takes the image in memory "
        "(Trident re-reads the file from disk); SAM's encoder runs twice (guidance on the x16-rounded image, "
        "prompts on the image; Trident encodes once); a guidance row with no kept entry keeps its own token "
        "(Trident: NaN); classes merge by max over names (Trident's merge assumes synonyms on line 0 only, "
        "true of our files). " + _PROTOCOL_COMMON
    ),
    reference="YuHengsss/Trident a93b346",
    proxy_mean=PROXY_MEAN_BATCH,
))

# ClearCLIP's protocol; MaskCLIP runs under it too (the numbers the tables cite come from ClearCLIP's
# re-implementation).
_CLEARCLIP_DEFAULTS = Protocol(short_side=448, crop=448, stride=224)
_CLEARCLIP_PROTOCOL = _per_preset(
    voc21=Protocol(prob_thd=0.5, class_file="clearclip/voc21.txt"),
    context60=Protocol(prob_thd=0.15),
    coco_object=Protocol(prob_thd=0.4, class_file="clearclip/coco_object.txt"),
    cityscapes=Protocol(crop=224, stride=224),
)

_add(Method(
    name="clearclip", title="ClearCLIP", strategy="qq", residual=False, ffn=False, layers=LAYERS_LAST,
    vfm=None, postprocess=(), logit_scale=50.0,
    defaults=_CLEARCLIP_DEFAULTS,
    protocol=_CLEARCLIP_PROTOCOL,
    reported=(
        Reported("ClearCLIP README (results image), ViT-B/16; VOC21/Ctx60/Obj not in the repo",
                 _miou((None, None, None, 80.9, 30.0, 35.9, 16.7, 23.9))),
        Reported("seed paper Table 3", _miou((57.0, 32.2, 32.5, 82.3, 32.8, 35.8, 17.3, 24.0))),
    ),
    deviations=(
        "ClearCLIP's committed base_config has model_type='vanilla'; we run its intended ClearCLIP mode "
        "(q-q attention, residual and FFN dropped). Background is the single query 'background' on VOC21 and "
        "COCO-Object (class files clearclip/*.txt: ours with line 0 replaced, checked equal to ClearCLIP's "
        "cls_voc21/cls_coco_object). " + _PROTOCOL_COMMON
    ),
    reference="mc-lan/ClearCLIP ad68a40",
))

_SCLIP_CLASS_NOTE = (
    "SCLIP/NACLIP class files (configs/cls_voc21.txt, cls_voc20.txt, cls_coco_object.txt, ', '-separated) give "
    "person 7 variants (8 with 'body' on COCO-Object), tvmonitor 5 variants, and 26 background words on "
    "COCO-Object; the note does not list them exactly, so ours are used (no person/tv synonyms; COCO-Object "
    "background 17 words) — files class_names/<method>/{voc21,voc20,coco_object}.txt would be needed."
)

_add(Method(
    name="sclip", title="SCLIP", strategy="csa", residual=True, ffn=True, layers=LAYERS_LAST,
    vfm=None, postprocess=(), logit_scale=40.0,
    defaults=Protocol(short_side=336, crop=224, stride=112),
    protocol=_per_preset(
        voc21=Protocol(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
        context60=Protocol(logit_scale=50.0, prob_thd=0.1),
        coco_object=Protocol(logit_scale=50.0, prob_thd=0.1),
        cityscapes=Protocol(short_side=560),
        coco_stuff164k=Protocol(short_side=448),
    ),
    reported=(
        Reported("SCLIP README", _miou((59.63, 31.74, 33.52, 81.54, 32.34, 34.46, 16.45, 22.77))),
        Reported("SCLIP paper (Trident table; = seed paper Table 3)",
                 _miou((59.1, 30.4, 30.5, 80.4, 32.2, 34.2, 16.1, 22.4))),
    ),
    deviations=(
        "Correlative self-attention with the residual and FFN kept (SCLIP's code; its rows sum to 2); area_thd "
        "on VOC21 applied as SCLIP's postprocess_result (after the name merge, before prob_thd). Windows are fed "
        "unpadded as SCLIP's (a remainder is dropped by the patch conv and the logits stretched over the "
        "window); a whole-image pass resizes the grid's logits straight to the label size (its forward_feature). "
        + _SCLIP_CLASS_NOTE + " SCLIP loads OpenAI CLIP (fp16 on GPU). " + _PROTOCOL_COMMON
    ),
    reference="wangf3014/SCLIP b56bd30",
    window_remainder=WINDOW_DROP,
))

_add(Method(
    name="naclip", title="NACLIP", strategy="neighbourhood", residual=False, ffn=False, layers=LAYERS_LAST,
    vfm=None, postprocess=("pamr",), logit_scale=40.0, sigma=5.0,
    defaults=Protocol(short_side=336, crop=224, stride=112, extra=_extra(pamr_steps=10, pamr_dilations=(8, 16))),
    protocol=_per_preset(
        voc21=Protocol(prob_thd=0.1, whole_image=True),
        voc20=Protocol(whole_image=True),
        context60=Protocol(prob_thd=0.1),
        coco_object=Protocol(prob_thd=0.1),
        cityscapes=Protocol(short_side=560),
    ),
    reported=(
        Reported("NACLIP README (with PAMR); = seed paper Table 3 rounded",
                 _miou((64.07, 34.99, 36.19, 83.03, 38.27, 38.35, 19.05, 25.69))),
        Reported("NACLIP paper without PAMR (Trident table)",
                 _miou((58.9, 32.2, 33.2, 79.7, 35.5, 35.2, 17.4, 23.3))),
    ),
    deviations=(
        "Neighbourhood attention (k-k plus a Gaussian over patch positions, sigma 5) without residual/FFN, and "
        "PAMR (10 iterations, dilations 8/16; --no-pamr for the paper's numbers) on the cosine logits at label "
        "size with the mmseg-normalised image, before the logit scale (as NACLIP). VOC21/VOC20 run the whole "
        "image in one pass as NACLIP v2: unpadded (the patch conv drops the remainder), the grid's logits "
        "stretched to the resized image, then resized to the label size; windows are fed unpadded too. After "
        "the labels are taken (argmax, prob_thd), the class probabilities (max over a class's names) are "
        "divided by their sum, as NACLIP's postprocess_result: labels are unchanged, SAM's coarse_thresh "
        "(when --sam adds it) sees the renormalised values. " + _SCLIP_CLASS_NOTE + " " + _PROTOCOL_COMMON
    ),
    reference="sinahmr/NACLIP 0cac3a6 (v2 code); PAMR from visinf/1-stage-wseg",
    window_remainder=WINDOW_DROP, whole_image_logits=WHOLE_VIA_IMAGE, renormalize_probs=True,
))

_add(Method(
    name="maskclip", title="MaskCLIP", strategy="identity", residual=True, ffn=True, layers=LAYERS_LAST,
    vfm=None, postprocess=(), logit_scale=50.0,
    defaults=_CLEARCLIP_DEFAULTS,
    protocol=_CLEARCLIP_PROTOCOL,
    reported=(
        Reported("ClearCLIP README (results image), MaskCLIP row (residual kept)",
                 _miou((None, None, None, 74.9, 12.6, 26.4, 9.8, 16.4))),
        Reported("seed paper Table 3", _miou((38.8, 23.6, 20.6, 74.9, 12.6, 26.4, 9.8, 16.4))),
        Reported("Trident table", _miou((43.4, 23.2, 20.6, 74.9, 24.9, 26.4, 11.9, 16.7))),
        Reported("MaskCLIP README (own protocol: whole image 512/520, 85 templates)",
                 _miou((None, None, None, 49.5, None, 21.7, None, 12.5)),
                 MappingProxyType({"voc20": "other protocol", "context59": "other protocol",
                                   "coco_stuff164k": "other protocol"})),
    ),
    deviations=(
        "Value path only with the residual and FFN kept, as original MaskCLIP (out = FFN-block(x + Proj(v))), run "
        "under ClearCLIP's re-implementation protocol (448, crop 448/stride 224, scale 50, its prob_thd and "
        "'background' files), which produced the numbers the tables cite. Original MaskCLIP instead infers on the "
        "whole image at short side 512 (Context 520), with 85 templates, and takes the argmax of raw cosines "
        "(no background handling; key smoothing and prompt denoising off). " + _PROTOCOL_COMMON
    ),
    reference="chongzhou96/MaskCLIP 245d31f; mc-lan/ClearCLIP ad68a40 (re-implementation)",
))

_add(Method(
    name="clip", title="CLIP (vanilla)", strategy="vanilla", residual=True, ffn=True, layers=LAYERS_LAST,
    vfm=None, postprocess=(), logit_scale=40.0,
    defaults=Protocol(short_side=336, crop=336, stride=112),
    protocol=_per_preset(
        voc21=Protocol(prob_thd=0.1),
        context60=Protocol(prob_thd=0.05),
        coco_object=Protocol(prob_thd=0.1),
        cityscapes=Protocol(short_side=448, crop=224, stride=112),
        ade20k=Protocol(short_side=448),
    ),
    reported=(
        Reported("Trident table", _miou((16.4, 8.4, 5.6, 41.9, 5.0, 9.2, 2.9, 4.4))),
        Reported("seed paper Table 3", _miou((20.8, 9.3, 8.9, 49.1, 6.7, 11.2, 3.2, 5.7))),
    ),
    deviations=(
        "Untouched CLIP (q-k attention, residual and FFN kept) on all patch tokens. No repository states the "
        "protocol behind either published row; we use ProxyCLIP's configs with the plain-CLIP prob_thd its "
        "comments give (VOC21 0.1, Context60 0.05, COCO-Object 0.1). " + _PROTOCOL_COMMON
    ),
    reference="mc-lan/ProxyCLIP e7b767f (protocol); mc-lan/ClearCLIP ad68a40 (vanilla mode with residual)",
))


def _cliper(logit: float, templates: str, attention_thr: float, score_thr: float, bkg_thre: float,
            normalize: bool, slide_crop: int, short_side: int | None = None) -> Protocol:
    return Protocol(
        short_side=short_side, logit_scale=logit, templates=templates,
        extra=_extra(attention_thr=attention_thr, score_threshold=score_thr, bkg_thre=bkg_thre,
                     is_normalize=normalize, sliding_crop_size=slide_crop),
    )


_add(Method(
    name="cliper", title="CLIPer", strategy="fused", residual=False, ffn=False, layers=LAYERS_CLIPER,
    vfm=None, postprocess=("cliper_propagation", "sd"), logit_scale=100.0,
    defaults=Protocol(short_side=336, whole_image=True, templates="cliper_car15", prob_thd=0.0,
                      extra=_extra(round_to_patch=True, slide_stride=112, slide_weight=0.5, sd_version="v2.1",
                                   sd_time_step=45, sd_layers=(-4, -6), refinement="SFSA")),
    protocol=_per_preset(
        voc21=_cliper(100.0, "cliper_car15", 0.1, 0.7, 0.6, True, 336),
        context60=_cliper(100.0, "cliper_car15", 0.2, 0.45, 0.45, False, 224),
        coco_object=_cliper(50.0, "openai80", 0.2, 0.3, 0.3, False, 224),
        voc20=_cliper(100.0, "cliper_car15", 0.1, 0.0, 0.001, False, 0),
        context59=_cliper(100.0, "cliper_car15", 0.2, 0.3, 0.3, False, 224),
        coco_stuff164k=_cliper(50.0, "cliper_car15", 0.2, 0.1, 0.1, False, 0),
        ade20k=_cliper(100.0, "cliper_car15", 0.2, 0.3, 0.3, False, 0),
        cityscapes=_cliper(100.0, "openai80", 0.35, 0.0, 0.0001, False, 0, short_side=560),
    ),
    reported=(
        Reported("CLIPer README (Sep 2025), ViT-B/16, no window, with SD",
                 _miou((66.4, 37.5, 39.2, 85.5, 37.0, 41.6, 21.5, 27.6)),
                 MappingProxyType({"coco_object": "COCO-2014 5k val (WSSS masks), not COCO-Object"})),
        Reported("CLIPer README (Sep 2025), ViT-B/16, no window, without SD",
                 _miou((60.7, 34.7, 36.3, 84.3, 35.9, 38.4, 19.8, 25.4)),
                 MappingProxyType({"coco_object": "COCO-2014 5k val (WSSS masks), not COCO-Object"})),
        Reported("CLIPer README (Sep 2025), ViT-B/16, with window, with SD",
                 _miou((66.5, 38.3, 40.0, 86.0, 38.7, 42.4, 22.0, 28.6)),
                 MappingProxyType({"coco_object": "COCO-2014 5k val (WSSS masks), not COCO-Object"})),
        Reported("seed paper Table 3 (CLIPer paper v1, with SD)",
                 _miou((65.9, 37.6, 39.0, 85.2, None, 41.7, 21.2, 27.5)),
                 MappingProxyType({"coco_object": "COCO-2014 5k val (WSSS masks), not COCO-Object"})),
    ),
    deviations=(
        "Our decision rule, stated: CLIPer runs whole-image (the README's 'no window' rows; the sliding-window "
        "variant is not implemented) at short side 336 (560 City) with both sides rounded to the nearest x16 "
        "(bicubic, after our mmseg resize; CLIPer resizes once with PIL bicubic), fused attention over blocks "
        "0..L-2, all-layer fusion and attention propagation as its code (in-place normalisation quirk kept); "
        "per layer the softmax runs over our names plus CLIPer's mean-of-foreground query (dropped after); the "
        "coarse map (propagated last layer + layer mean) is normalised per pixel over the names, then classes "
        "take the max over their names and the argmax wins, with prob_thd 0: CLIPer's bkg_thre and "
        "score_threshold act on max-normalised class maps of its own rule and mean nothing on these "
        "probabilities, so background is decided by our background names (line 0 of our class files), as for "
        "every other method. SD refinement only with --sd (threshold = attention_thr, seeded noise). "
        "CLIPer's numbers are not protocol-compatible with ours: its 'Object' is 5 000 COCO-2014 val images with "
        "WSSS masks (we evaluate COCO-Object from val2017), its mIoU averages only classes present in the ground "
        "truth (ours: mmseg IoU over all classes), it classifies against [classes, each background word, mean "
        "class embedding] with per-dataset class-score thresholds (score_threshold, bkg_thre, is_normalize in "
        "`extra`) instead of prob_thd, splits background lines into single words (VOC21: 25 words, COCO: 23; we "
        "use our background lines), uses 15 'car' templates on most datasets (we use them too, per its configs), "
        "rounds both image sides to multiples of 16 with PIL bicubic, resizes the positional embedding "
        "bilinearly, runs fp16 and unseeded SD noise; its VOC20 is VOC21 with label 0 ignored. The committed "
        "configs slide on VOC21/Ctx60/Obj/Ctx59 only (sliding_crop_size), while the README reports both "
        "settings. The fused attention reproduces CLIPer's in-place normalisation: layer slot i sees i + 1 "
        "column/row passes, the last block's input and the propagation L passes."
    ),
    reference="linsun449/cliper.code c05fa41",
    whole_image_logits=WHOLE_VIA_IMAGE,
))


_add(Method(
    name="corrclip", title="CorrCLIP", strategy="scoped", residual=False, ffn=False, layers=LAYERS_CORRCLIP,
    vfm="dino_vitb8", postprocess=("mask_correction",), logit_scale=40.0,
    defaults=Protocol(short_side=336, crop=336, stride=112),
    protocol=_per_preset(
        voc21=Protocol(prob_thd=0.2, class_file="corrclip/voc21.txt"),
        context60=Protocol(prob_thd=0.15, class_file="corrclip/context60.txt"),
        coco_object=Protocol(prob_thd=0.25, class_file="corrclip/coco_object.txt"),
        voc20=Protocol(class_file="corrclip/voc20.txt"),
        cityscapes=Protocol(short_side=448, crop=224, stride=112, class_file="corrclip/cityscapes.txt"),
        context59=Protocol(class_file="corrclip/context59.txt"),
        ade20k=Protocol(short_side=448, class_file="corrclip/ade20k.txt"),
        coco_stuff164k=Protocol(class_file="corrclip/coco_stuff164k.txt"),
    ),
    reported=(
        Reported("CorrCLIP README, ViT-B/16 (MetaCLIP), SAM2 masks with 32 points per side (its pre-generated "
                 "masks, --instance-masks); average 51.0",
                 _miou((74.8, 44.2, 43.7, 88.8, 49.4, 48.8, 26.9, 31.6))),
        Reported("CorrCLIP README, ViT-B/16 (MetaCLIP), SAM2 with 8 points per side (its code's generator, our "
                 "default); average 50.4", _miou((73.9, 43.7, 43.6, 87.6, 47.9, 48.0, 26.5, 31.8))),
        Reported("CorrCLIP README, ViT-L/14 (MetaCLIP), SAM2 32 points per side; average 53.6",
                 _miou((76.7, 44.9, 49.4, 91.5, 51.1, 50.8, 30.7, 34.0))),
        Reported("CorrCLIP README, ViT-L/14 (MetaCLIP), SAM2 8 points per side; average 52.9",
                 _miou((76.2, 44.2, 49.0, 91.2, 48.9, 49.9, 29.8, 33.7))),
    ),
    deviations=(
        "CorrCLIPv1 as its code runs: MetaCLIP ViT-B/16 (fullcc; --clip MetaCLIP-L/14 for its L/14 rows), DINO "
        "ViT-B/8 q+k features, windows padded to x56, mask merging (scikit-learn DBSCAN, eps 0.2, min_samples 1), "
        "scope-reconstructed attention (tau 4), spatial branch (mean of streams 5–9) and semantic branch (one mask "
        "class token per region), weights 1.0/0.5, map correction after prob_thd; its configs' protocol (336, "
        "crop 336/stride 112; Cityscapes 448 with 224/112; ADE 448; prob_thd 0.2/0.15/0.25 on VOC21/Context60/"
        "COCO-Object) and its class files ('people' for 'person'; COCO-Object's background without 'bed'; its "
        "Context60 file ends in 'wood ' with a trailing space, which ours strips). Masks: SAM 2 Hiera-L's automatic "
        "generator with its code's parameters (8 points per side, pred_iou_thresh 0.4, stability_score_thresh 0.4, "
        "one mask per point, no post-processing; --mask-points 32 for its table's 32-point setting, whose other "
        "parameters are in its paper, not its code) painted smallest area first, or its published pre-generated "
        "masks (--instance-masks DIR, the README's SAM2-32 rows). The generator runs under the run's precision "
        "(CorrCLIP: the model cast to fp16 on CUDA); the attention arithmetic is float32 and a DINO-grid row with "
        "no kept entry attends to itself (CorrCLIP: NaN). The whole-image pass is one window of the whole image "
        "padded to x56 (CorrCLIP's slide inference with a crop no smaller than the image). `segment` corrects the "
        "map at the working size (the mask resized by nearest neighbour); `eval` at the image's size, as CorrCLIP. "
        "Mask-level SAM prompt refinement is off (CorrCLIP has its own masks; --sam adds it after the correction). "
        + _PROTOCOL_COMMON.replace("open_clip with OpenAI weights", "open_clip (MetaCLIP weights for corrclip)")
    ),
    reference="zdk258/CorrCLIP 103bc18 (CorrCLIPv1/corrclip_segmentor.py, open_clip/transformer.py)",
    clip="MetaCLIP-B/16", instance_masks=True,
))


# SCLIP's class files (configs/cls_*.txt, ', '-separated; NACLIP, SC-CLIP and ResCLIP ship the same),
# packaged as class_names/sclip/*.txt where they differ from ours.
_SCLIP_CLASS_FILES = {name: Protocol(class_file=f"sclip/{name}.txt") for name in ("voc21", "voc20", "coco_object")}


def _with_class_file(preset: str, protocol: Protocol) -> Protocol:
    own = _SCLIP_CLASS_FILES.get(preset)
    return protocol if own is None else replace(protocol, class_file=own.class_file)


def _sclip_files(**overrides: Protocol) -> Mapping[str, Protocol]:
    """`_per_preset` with SCLIP's class files on VOC21, VOC20 and COCO-Object."""
    table = _per_preset(**overrides)
    return MappingProxyType({name: _with_class_file(name, p) for name, p in table.items()})


_SCCLIP_CLASS_NOTE = (
    "Class names are SC-CLIP's files (SCLIP's: person 7 variants, 8 with 'body' on COCO-Object; tvmonitor 5; "
    "26 background words on VOC21 and COCO-Object), packaged as class_names/sclip/*.txt."
)

_add(Method(
    name="scclip", title="SC-CLIP", strategy="kk", residual=False, ffn=False, layers=LAYERS_SCCLIP,
    vfm=None, postprocess=(), logit_scale=40.0,
    defaults=Protocol(short_side=336, crop=224, stride=112,
                      extra=_extra(pre_adjust_idx=8, post_adjust_idx=3, multi_start_idx=3, multi_end_idx=10,
                                   res_cls=0.3, beta=0.4, n_neighbors=30, contamination=0.05)),
    protocol=_sclip_files(
        voc21=Protocol(logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
        context60=Protocol(prob_thd=0.15),
        coco_object=Protocol(logit_scale=55.0, prob_thd=0.35),
        cityscapes=Protocol(short_side=560),
    ),
    reported=(
        Reported("SC-CLIP README reports none; third-party tables (issue 24): average over the 8 benchmarks "
                 "about 43.9 (ViT-B/16), 45.2 (ViT-L/14), per-benchmark values not verified here",
                 _miou((None, None, None, None, None, None, None, None))),
    ),
    deviations=(
        "SC-CLIP's calibration as its code (configs/base_config.py: pre 8, post 3, multi-level 3–9, res_cls 0.3; "
        "similarity threshold 0.4; LOF with 30 neighbours, outliers above the 0.95 torch.quantile of the scores, "
        "computed per window in float32 in its order). Outlier tokens are located on the window's own grid "
        "(row-major, token i = (i // w, i % w)); SC-CLIP indexes them as (i // h, i % h), right only on square grids "
        "(its sliding windows are square; its whole-image path raises IndexError or repairs the wrong patches on "
        "any other), so --whole-image works here on any image. Fewer than 31 patches (SC-CLIP's topk fails): "
        "min(30, N − 1) neighbours. Windows are fed unpadded (remainder dropped by the patch conv, logits "
        "stretched over the window) and a whole-image pass resizes the grid's logits straight to the label size, "
        "as SC-CLIP's forward_feature; area_thd on VOC21 as SCLIP's. On CLIPs shallower than 12 blocks (the tiny "
        "test models) the block indices are scaled to the depth; deeper ones use them as they are, as SC-CLIP. "
        + _SCCLIP_CLASS_NOTE + " SC-CLIP loads OpenAI CLIP (fp16 on GPU). " + _PROTOCOL_COMMON
    ),
    reference="SuleBai/SC-CLIP 0417ba9",
    window_remainder=WINDOW_DROP,
))


def _resclip(temp_thd: float, rcs: tuple[float, float], sfr: tuple[float, float], **fields: Any) -> Protocol:
    return Protocol(**fields, extra=_extra(temp_thd=temp_thd, attn_rcs_weights=rcs, attn_sfr_weights=sfr))


_add(Method(
    name="resclip", title="ResCLIP (over NACLIP)", strategy="neighbourhood", residual=False, ffn=False,
    layers=LAYERS_RESCLIP, vfm=None, postprocess=(), logit_scale=40.0, sigma=5.0,
    defaults=Protocol(short_side=336, crop=224, stride=112,
                      extra=_extra(temp_thd=0.25, attn_rcs_weights=(2.0, 0.4), attn_sfr_weights=(1.8, 0.7),
                                   delete_same_entity=True, rcs_blocks=(5, 9), sfr_pamr_steps=10,
                                   sfr_pamr_dilations=(8, 16), sfr_half=False)),
    protocol=_sclip_files(
        voc21=_resclip(0.50, (2.0, 0.3), (2.2, 0.7), whole_image=True, prob_thd=0.1),
        context60=_resclip(0.30, (2.0, 0.3), (1.8, 0.7), prob_thd=0.1),
        coco_object=_resclip(0.11, (2.0, 0.4), (1.8, 0.7), prob_thd=0.1),
        voc20=_resclip(0.10, (2.0, 0.6), (2.1, 0.6), whole_image=True),
        cityscapes=_resclip(0.10, (2.0, 0.2), (2.1, 0.6), short_side=560),
        context59=_resclip(0.25, (2.0, 0.4), (1.8, 0.7)),
        ade20k=_resclip(0.25, (2.0, 0.3), (2.1, 0.7)),
        coco_stuff164k=_resclip(0.11, (2.0, 0.4), (1.8, 0.7)),
    ),
    reported=(
        Reported("ResCLIP README (results images), NACLIP + ResCLIP, ViT-B/16 (average 41.4)",
                 _miou((61.1, 33.5, 35.0, 86.0, 35.9, 36.8, 18.0, 24.7))),
        Reported("ResCLIP README (results images), NACLIP + ResCLIP, ViT-L/14",
                 _miou((54.1, 30.9, 32.5, 85.5, 33.7, 34.5, 18.2, 23.4))),
    ),
    deviations=(
        "The plug-in form of ResCLIP's default configuration (test_all.sh wo_resi resclip 5): NACLIP's last block "
        "(k-k + Gaussian σ 5, no residual/FFN) with RCS (mean q-k attention of blocks 5–8) and SFR (a first pass's "
        "labels, refined by PAMR 10 it. (8, 16) on the window), its per-benchmark temp_thd, attn_rcs_weights and "
        "attn_sfr_weights, delete_same_entity, no PAMR on the output; VOC21/VOC20 whole image as NACLIP (logits "
        "stretched to the resized image, then to the label size), class probabilities renormalised after the labels "
        "as NACLIP. Differences: runs on any device (ResCLIP hard-wires CUDA: .cuda() and PAMR on 'cuda'); the "
        "normalised SFR matrix stays float32 (ResCLIP casts it to float16: ≤ 1.3e-5 in the probabilities; "
        "method option sfr_half=True reproduces the cast); the first pass's PAMR always runs (ResCLIP wraps it in "
        "try/except RuntimeError, so an out-of-memory error skipped it silently); RCS and SFR always on (ResCLIP's "
        "use_rcs=use_rcs, stores a tuple, so its switches are always true too); its area_thd branch acts on the "
        "logits and changes nothing (no config sets it). `segment` uses its Context59 settings (temp_thd 0.25, "
        "RCS (2.0, 0.4), SFR (1.8, 0.7)). On CLIPs shallower than 12 blocks the RCS blocks are scaled to the "
        "depth. " + _SCCLIP_CLASS_NOTE.replace("SC-CLIP's", "ResCLIP's") + " " + _PROTOCOL_COMMON
    ),
    reference="yvhangyang/ResCLIP 0e085f7",
    window_remainder=WINDOW_DROP, whole_image_logits=WHOLE_VIA_IMAGE, renormalize_probs=True,
))

# ------------------------------------------------------------------------------------------ queries
def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


def resolve_protocol(method: str | Method, preset: str) -> ResolvedProtocol:
    """The complete settings of ``method`` on ``preset``: per-benchmark override, else the method's
    default, else our preset (``config.PRESETS``)."""
    m = get_method(method) if isinstance(method, str) else method
    if preset not in PRESETS:
        raise KeyError(f"unknown dataset {preset!r}; choose one of: {', '.join(PRESETS)}")
    base = PRESETS[preset]
    merged: dict[str, Any] = {}
    for f in fields(Protocol):
        if f.name == "extra":
            continue
        specific = getattr(m.protocol[preset], f.name)
        merged[f.name] = specific if specific is not None else getattr(m.defaults, f.name)
    extra = {**m.defaults.extra, **m.protocol[preset].extra}
    whole = bool(merged["whole_image"])
    return ResolvedProtocol(
        method=m.name, preset=preset,
        short_side=merged["short_side"] if merged["short_side"] is not None else base.short_side,
        crop=None if whole else merged["crop"] if merged["crop"] is not None else base.crop,
        stride=None if whole else merged["stride"] if merged["stride"] is not None else base.stride,
        whole_image=whole,
        prob_thd=merged["prob_thd"] if merged["prob_thd"] is not None else base.prob_thd,
        area_thd=merged["area_thd"],
        logit_scale=merged["logit_scale"] if merged["logit_scale"] is not None else m.logit_scale,
        class_file=merged["class_file"] if merged["class_file"] is not None else base.class_file,
        templates=merged["templates"] if merged["templates"] is not None else "openai80",
        extra=MappingProxyType(extra),
    )


def _format_miou(reported: Reported) -> list[str]:
    cells = []
    for preset in TABLE_PRESETS:
        value = reported.miou.get(preset)
        mark = "*" if preset in reported.caveats else ""
        text = "–" if value is None else f"{value:g}"
        cells.append(text + (".0" if value is not None and "." not in text else "") + mark)
    return cells


def _yes_no(flag: bool) -> str:
    return "kept" if flag else "dropped"


def method_table_rows() -> list[dict[str, str]]:
    """One row per method for ``s2clip methods``: method, strategy, residual/FFN, layers, VFM,
    post-processing, the first reported source's mIoU per benchmark (``TABLE_HEADERS`` keys; ``–``
    none, ``*`` other dataset/protocol) and that source."""
    rows = []
    for m in METHODS.values():
        primary = m.reported[0]
        row = {
            "method": m.name,
            "strategy": f"{m.layers} over {m.strategy}" if m.layers in HEAD_OPTION_LAYERS else m.strategy,
            "residual/FFN": f"{_yes_no(m.residual)}/{_yes_no(m.ffn)}",
            "layers": m.layers,
            "VFM": m.vfm or "–",
            "post-processing": ", ".join(f"{step} ({OPTIONAL_STEPS[step]})" if step in OPTIONAL_STEPS else step
                                         for step in m.postprocess) or "–",
        }
        row.update({TABLE_HEADERS[p]: cell for p, cell in zip(TABLE_PRESETS, _format_miou(primary), strict=True)})
        row["source"] = primary.source
        rows.append(row)
    return rows


def deviations(name: str) -> str:
    """What differs from the method's own repository under our protocol, and why."""
    return get_method(name).deviations


__all__ = [
    "HEAD_OPTION_LAYERS", "LAYERS_CORRCLIP", "LAYERS_RESCLIP", "LAYERS_SCCLIP", "LAYER_POLICIES", "METHODS", "OPTIONAL_STEPS", "POSTPROCESS_STEPS", "PROXY_MEAN_BATCH", "PROXY_MEAN_WINDOW",
    "TABLE_HEADERS", "TABLE_PRESETS", "TEMPLATES", "WHOLE_TO_LABEL", "WHOLE_VIA_IMAGE", "WINDOW_DROP", "WINDOW_PAD",
    "Method",
    "Protocol", "Reported", "ResolvedProtocol", "deviations", "get_method", "method_table_rows",
    "resolve_protocol",
]
