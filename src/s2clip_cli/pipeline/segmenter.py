"""The S2CLIP pipeline (DESIGN steps 1–6) as one object: build once, call on many images.

>>> from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
>>> seg = Segmenter.build(SegmenterConfig(), classes=[["cat"], ["dog"]], background=None)
>>> result = seg(image)          # image: H x W x 3 uint8 RGB
>>> result.labels                # H x W int64, indices into seg.queries.labels

Its pieces are usable on their own: `prepare` (resize to the working scale, normalise), `window_logits`
(features and fusion of a batch of windows), `predict_logits` (windows stitched), `refine_pamr`
(PAMR on the logits), `classify` (logits → labels and class probabilities), `refine_sd` (CLIPer's
SD refinement) and `refine` (SAM post-processing).

`SegmenterConfig.method` picks one of the training-free methods of `s2clip_cli.methods` (default
``s2clip``): its attention strategy, residual/FFN handling and layers come from the methods table
(`method_features` holds one head per family); its per-benchmark protocol (resize, windows, logit
scale, thresholds, templates, post-processing) is filled into the configuration's other fields by
the caller (`s2clip_cli.commands.methods`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config as defaults
from ..config import RefineConfig
from ..errors import S2ClipError
from ..methods import (
    LAYERS_HIERARCHICAL,
    METHODS,
    PROXY_MEAN_BATCH,
    WHOLE_TO_LABEL,
    WINDOW_PAD,
    get_method,
)
from ..models.factory import LoadedModels, ModelPaths, load_models, resolve_device
from ..models.precision import autocast, compute_dtype, full_precision, sam_encoder_dtype
from ..profiling import StageTimer
from ..refine.instance_masks import MaskSource, image_digest
from .fusion import resample_matrix
from .method_features import PROBABILITY, make_head
from .text import DEFAULT_TEMPLATE_SET, ClassQueries, build_queries, encode_names, template_set
from .transforms import resize_short_side
from .windows import Stitcher, WindowBatch, sliding_windows, window_batches

Combine = Literal["mean", "entropy"]
COMBINES: tuple[str, ...] = ("mean", "entropy")
WorkResolution = Literal["image", "resized"]

# Above this many name-probability values at the output size, `classify` streams over the names
# instead of holding every name's upsampled map at once (256 MB of float32).
CLASSIFY_BUDGET = 64 * 2**20
SD_MODEL = "sd21_base"
MASKS_REMEMBERED = 4  # instance masks kept in memory (by image content) between a call's steps


@dataclass
class SegmenterConfig:
    """Every knob of the pipeline. Defaults are `s2clip segment`'s."""

    method: str = "s2clip"  # a key of s2clip_cli.methods.METHODS: strategy, residual/FFN, layer policy
    clip: str = "ViT-B/16"
    vfm: str = "dino_vitb8"
    sam: str | None = "vit_b"  # None: no SAM post-processing
    layers: list[int] | None = None  # None: the deeper half (see models.clip.default_layers)
    combine: Combine = "mean"
    entropy_tau: float = 0.1
    short_side: int = defaults.SEGMENT_SHORT_SIDE
    max_long_side: int = defaults.MAX_LONG_SIDE
    crop: int = defaults.CROP
    stride: int = defaults.SEGMENT_STRIDE
    whole_image: bool = False  # one pass over the whole prepared image instead of sliding windows
    beta: float = defaults.BETA
    gamma: float = defaults.GAMMA
    logit_scale: float = defaults.LOGIT_SCALE
    prob_thd: float = 0.0  # pixels under it fall to the background (with-background runs only)
    # SCLIP: a foreground class predicted on at most this fraction of the foreground pixels is dropped.
    area_thd: float | None = None
    templates: str = DEFAULT_TEMPLATE_SET  # prompt template set (pipeline.text.TEMPLATE_SETS)
    sigma: float = 5.0  # NACLIP's neighbourhood Gaussian (patches)
    # PAMR (NACLIP) on the cosine logits at the classification size, before the logit scale.
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    # CLIPer: the last layer map's threshold (× per-name max) before its attention propagation.
    attention_thr: float = 0.2
    # Trident's SAM guidance: cos_fac, refine_neg_cos, and Cityscapes' left/right halves.
    cos_fac: float = 1.2
    refine_neg_cos: bool = True
    sam_halves: bool = False
    # Knobs of the methods with a head of their own (SC-CLIP, ResCLIP), named as their references
    # spell them: the methods table's per-benchmark `extra` (commands.methods); empty = the head's defaults.
    method_options: dict[str, Any] = field(default_factory=dict)
    window_batch: int = 4
    # Class-agnostic instance masks (CorrCLIP): a folder of pre-generated `<image stem>.npz` files, else SAM 2's
    # automatic mask generator (`mask_model`, `mask_points` points per side; refine.instance_masks).
    instance_masks: str | None = None
    mask_model: str = "sam2_hiera_large"
    mask_points: int = 8
    refine: RefineConfig = field(default_factory=RefineConfig)
    # Run SAM's prompt refinement when a SAM model is loaded (False: the model only serves Trident's
    # guidance).
    sam_refine: bool = True
    # Where classification and SAM refinement run: at the input image's size (`image`, the
    # evaluation protocol), or at the resized working image (`resized`, bounded memory for large
    # photos; only the labels are brought to the image's size, by nearest neighbour).
    work_resolution: WorkResolution = "image"
    # CLIPer's Stable-Diffusion refinement of the class probabilities, before SAM (DESIGN step 5b).
    sd: bool = False
    sd_threshold: float = 0.2  # CLIPer's attention_thr (presets: 0.1 VOC, 0.35 Cityscapes, 0.2 otherwise)
    seed: int = 0  # the SD noise seed
    precision: str = "auto"  # auto | fp32 | fp16 | bf16 (see models.precision)
    timing: bool = False  # per-stage wall times in SegmentationResult.timings (synchronises CUDA)
    models: str = "real"
    device: str = "auto"
    offline: bool = False
    weights: ModelPaths = field(default_factory=ModelPaths)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [H, W] int64 class indices at the image's size (0 = background when there is one)
    probs: Tensor  # [C, h, w] float32 class probabilities at the working size (after refinement when it ran)
    timings: dict[str, float]  # seconds per stage (empty unless config.timing)


class Segmenter:
    """CLIP + VFM + SAM segmenter for a fixed list of classes."""

    def __init__(self, config: SegmenterConfig, queries: ClassQueries, models: LoadedModels,
                 device: torch.device, mask_source: MaskSource | None = None) -> None:
        self.config = config
        self.mask_source = mask_source  # instance masks (methods that use them: `instance_mask`)
        self._masks_seen: OrderedDict[str, np.ndarray] = OrderedDict()
        self.queries = queries
        self.models = models
        self.device = device
        self.dtype = compute_dtype(config.precision, device)
        self.sam_dtype = sam_encoder_dtype(config.precision, device, config.sam)
        self.method = get_method(config.method)
        self.head = make_head(self, self.method)
        clip = models.clip
        self.layers = self.head.layers()
        text_id = None if models.is_random else f"{clip.name}|{models.identity.get(clip.name, '')}"
        with full_precision(device):
            self.text = encode_names(clip, queries.names, text_id, config.templates).to(device)  # [Q, E]
        self.name_to_class = torch.tensor(queries.name_to_class, device=device)
        self._resample_cache: dict[tuple[tuple[int, int], tuple[int, int]], Tensor] = {}
        self._predictor = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: SegmenterConfig, classes: list[list[str]], background: list[str] | None,
              models: LoadedModels | None = None) -> Segmenter:
        """Load the models named by `config` (unless given) and embed the class names."""
        device = resolve_device(config.device)
        check_config(config)
        if config.combine not in COMBINES:
            raise S2ClipError(f"unknown layer combination {config.combine!r}: use mean or entropy")
        if config.work_resolution not in ("image", "resized"):
            raise S2ClipError(f"unknown working resolution {config.work_resolution!r}: use image or resized")
        compute_dtype(config.precision, device)  # reject a bad --precision before loading anything
        if models is None:
            models = load_models(config.clip, config.vfm if get_method(config.method).vfm else None, config.sam,
                                 mode=config.models,
                                 paths=config.weights, offline=config.offline, device=device,
                                 sd_name=SD_MODEL if config.sd else None,
                                 sd_dtype=compute_dtype(config.precision, device))
        elif config.sd and models.sd is None:
            raise S2ClipError("SD refinement requested but the given models hold no SD model")
        queries = build_queries(classes, background)
        masks = mask_source_of(config, device) if get_method(config.method).instance_masks else None
        with torch.no_grad():
            return cls(config, queries, models, device, mask_source=masks)

    def with_classes(self, classes: list[list[str]], background: list[str] | None) -> Segmenter:
        """A segmenter for other classes that shares this one's models."""
        return Segmenter(self.config, build_queries(classes, background), self.models, self.device,
                         mask_source=self.mask_source)

    # ------------------------------------------------------------------ instance masks
    def instance_mask(self, image: np.ndarray, name: str | None = None) -> np.ndarray:
        """The class-agnostic instance mask ``int64 [H, W]`` of `image` (file stem `name`, which a
        folder of pre-generated masks needs): from the mask source, remembered for the last few
        images by their content so that the features and the map correction of one call share it
        (a call naming the file reads that file's mask anew)."""
        if self.mask_source is None:
            raise S2ClipError(f"{self.method.name} uses no instance masks")
        key = image_digest(image)
        by_name = name is not None and self.mask_source.needs_name  # (two files may hold the same pixels)
        if key in self._masks_seen and not by_name:
            self._masks_seen.move_to_end(key)
            return self._masks_seen[key]
        mask = self.mask_source.masks(image, name)
        if mask.shape != image.shape[:2]:
            raise S2ClipError(f"instance mask is {mask.shape[1]}x{mask.shape[0]}, the image {image.shape[1]}x"
                              f"{image.shape[0]}")
        self._masks_seen[key] = mask
        while len(self._masks_seen) > MASKS_REMEMBERED:
            self._masks_seen.popitem(last=False)
        return mask

    def timer(self) -> StageTimer:
        """A stage timer as the configuration asks (a no-op unless `timing`)."""
        return StageTimer(self.device, enabled=self.config.timing)

    # ------------------------------------------------------------------ numerics helpers
    def resample(self, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
        """The bilinear resampling matrix from grid `src` to grid `dst` (cached)."""
        key = (src, dst)
        if key not in self._resample_cache:
            self._resample_cache[key] = resample_matrix(src, dst, device=self.device)
        return self._resample_cache[key]

    def pad_multiple(self) -> int:
        """Windows are padded to a multiple of the patch sizes of the backbones the method runs (CLIP,
        and the VFM when it has one)."""
        clip_p = self.models.clip.patch_size
        if self.method.vfm is None:
            return clip_p
        vfm_p = int(getattr(self.models.vfm, "patch_size", clip_p))
        return math.lcm(clip_p, vfm_p)

    # ------------------------------------------------------------------ per-window features
    def window_logits(self, windows: Tensor, timer: StageTimer | None = None) -> Tensor:
        """Per-name maps ``[B, Q, h, w]`` for windows ``[B, 3, H, W]`` cut from `prepare`'s output
        (normalised) — cosine similarities on the patch grid (S2CLIP: the VFM grid), or
        probabilities for CLIPer (`head.scores`).

        A remainder of H or W modulo a backbone's patch size is dropped by that backbone. The
        backbones run under the run's precision; the fusion (attention softmax, classification) in
        float32."""
        timer = timer or self.timer()
        with torch.no_grad():
            return self.head.window_logits(windows, timer)

    # ------------------------------------------------------------------ whole image
    def prepare(self, image: np.ndarray) -> Tensor:
        """Step 1: the image resized as the preset says (mmseg keep-ratio resize, uint8 as mmseg),
        normalised as the method's reference (mmseg's constants on 0–255 values; CLIPer: CLIP's
        transform) — ``[3, h, w]`` float32 on the device (`FeatureHead.to_input`)."""
        cfg = self.config
        resized = resize_short_side(image, cfg.short_side, cfg.max_long_side)
        x = torch.from_numpy(np.require(resized, requirements=["C", "W"])).to(self.device)
        return self.head.to_input(x.permute(2, 0, 1).float())

    def windows(self, x: Tensor) -> list[WindowBatch]:
        """Step 2: the prepared image's windows, in batches of `window_batch` (Trident: all windows of
        the image in one batch, as its `get_windowed_imgs`). Windows are padded (centred, with zeros
        = the normalised mean colour) to the patch multiple when the method's reference pads them;
        the whole-image pass is never padded (every reference feeds it as it is)."""
        h, w = x.shape[-2:]
        if self.config.whole_image:
            boxes, multiple = [(0, 0, h, w)], 1
        else:
            boxes = sliding_windows(h, w, self.config.crop, self.config.stride)
            multiple = self.pad_multiple() if self.method.window_remainder == WINDOW_PAD else 1
        batch = len(boxes) if self.method.proxy_mean == PROXY_MEAN_BATCH else self.config.window_batch
        return list(window_batches(x, boxes, batch, multiple, (0.0, 0.0, 0.0)))

    def predict_logits(self, image: np.ndarray, timer: StageTimer | None = None) -> Tensor:
        """Per-name maps ``[Q, h, w]`` covering the image (DESIGN steps 1–5): cosine similarities
        stitched at the resized scale (Trident: on SAM's grid; a whole-image pass of a method that
        resizes its logits straight to the label size: on the patch grid), CLIPer's probabilities.
        `classify` and `refine_pamr` resize them to the output size."""
        timer = timer or self.timer()
        with timer("prepare"):
            x = self.prepare(image)
        whole = self.head.image_logits(x, image, timer)
        if whole is not None:
            return whole
        if self.config.whole_image and self.method.whole_image_logits == WHOLE_TO_LABEL:
            (batch,) = self.windows(x)
            return self.window_logits(batch.crops, timer)[0]
        h, w = x.shape[-2:]
        stitcher = Stitcher(len(self.queries.names), h, w, device=self.device)
        for batch in self.windows(x):
            logits = self.window_logits(batch.crops, timer)
            with timer("stitch"):
                full = batch.unpad(F.interpolate(logits, size=batch.crops.shape[-2:], mode="bilinear",
                                                 align_corners=False))
                for box, values in zip(batch.boxes, full, strict=True):
                    stitcher.add(box, values)
        with timer("stitch"):
            return stitcher.result()

    def classify(self, logits: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Cosines ``[Q, h, w]`` → (labels ``[H, W]``, class probabilities ``[C, H, W]``) at `size`.

        Bilinear upsampling of the cosines, ×logit scale, softmax over all names (float32); a
        class's probability is the max over its names (synonyms, background stuff names); with a
        background, pixels whose top probability is under `prob_thd` become background. When every
        name's map at `size` would exceed `CLASSIFY_BUDGET` values, the softmax is computed over
        chunks of names (two passes), so only the class probabilities are held at full size.
        Heads whose maps are already probabilities (CLIPer) are normalised per pixel instead of
        scaled and softmaxed. SCLIP's `area_thd` drops small foreground classes before the labels;
        NACLIP's class probabilities are divided by their sum after the labels are taken."""
        with full_precision(self.device):
            logits = logits.float()
            n_names = logits.shape[0]
            if n_names * size[0] * size[1] <= CLASSIFY_BUDGET:
                up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
                probs = self._merge_names(self._name_probs(up), slice(None))
            else:
                probs = self._classify_streamed(logits, size)
            probs = self.drop_small_classes(probs)
            labels = self.labels_from(probs)
            if self.method.renormalize_probs:
                probs = renormalized(probs)
        return labels, probs

    def _name_probs(self, up: Tensor) -> Tensor:
        """Per-name probabilities of upsampled maps ``[Q, H, W]`` (in place where possible)."""
        if self.head.scores == PROBABILITY:
            up = up.clamp_(min=0.0)
            return up.div_(up.sum(dim=0, keepdim=True).clamp_(min=torch.finfo(up.dtype).tiny))
        return torch.softmax(up.mul_(self.config.logit_scale), dim=0)

    def drop_small_classes(self, probs: Tensor) -> Tensor:
        """SCLIP's ``area_thd`` (with-background runs): after the argmax, a foreground class
        predicted on at most ``area_thd`` × the foreground-predicted pixels has its probabilities
        zeroed. No-op when `area_thd` is None."""
        thd = self.config.area_thd
        if thd is None or not self.queries.has_background:
            return probs
        counts = torch.bincount(probs.argmax(dim=0).flatten(), minlength=probs.shape[0])[1:].to(probs.dtype)
        keep = (counts > thd * counts.sum()).to(probs.dtype)
        probs = probs.clone()
        probs[1:] *= keep[:, None, None]
        return probs

    def refine_pamr(self, image: np.ndarray, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """NACLIP's PAMR: the maps ``[Q, h, w]`` upsampled (bilinear) to `size` and refined by the
        affinities of the normalised prepared image (`prepare`: mmseg's constants, as NACLIP's
        ``inputs``) resized to that size, before any logit scale.
        Returns ``[Q, H, W]`` float32 (PAMR is batched over the names, on the device)."""
        from ..refine.pamr import pamr

        cfg = self.config
        with torch.no_grad(), full_precision(self.device):
            x = self.prepare(image)[None]
            normed = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            up = F.interpolate(logits.float()[None], size=size, mode="bilinear", align_corners=False)
            return pamr(normed, up, iterations=cfg.pamr_iterations, dilations=cfg.pamr_dilations)[0]

    def labels_from(self, probs: Tensor) -> Tensor:
        """Labels ``[H, W]`` from class probabilities: the argmax; with a background, pixels whose
        top probability is under `prob_thd` become background (class 0)."""
        top, labels = probs.max(dim=0)
        if self.queries.has_background and self.config.prob_thd > 0:
            labels = torch.where(top < self.config.prob_thd, torch.zeros_like(labels), labels)
        return labels

    def _name_chunks(self, n_names: int, size: tuple[int, int]) -> list[slice]:
        step = max(1, CLASSIFY_BUDGET // (size[0] * size[1]))
        return [slice(i, min(i + step, n_names)) for i in range(0, n_names, step)]

    def _up(self, logits: Tensor, names: slice, size: tuple[int, int]) -> Tensor:
        return F.interpolate(logits[None, names], size=size, mode="bilinear", align_corners=False)[0]

    def _scaled_up(self, logits: Tensor, names: slice, size: tuple[int, int]) -> Tensor:
        return self._up(logits, names, size).mul_(self.config.logit_scale)

    def _classify_streamed(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """The softmax over names in chunks: pass 1 the per-pixel max and sum of exponentials,
        pass 2 each chunk's probabilities folded into the class maxima."""
        chunks = self._name_chunks(logits.shape[0], size)
        probs = torch.full((self.queries.num_classes, *size), -1.0, device=logits.device)
        if self.head.scores == PROBABILITY:
            total = torch.zeros(size, device=logits.device)
            for names in chunks:
                total.add_(self._up(logits, names, size).clamp_(min=0.0).sum(dim=0))
            total.clamp_(min=torch.finfo(total.dtype).tiny)
            for names in chunks:
                chunk = self._up(logits, names, size).clamp_(min=0.0).div_(total)
                probs = self._merge_names(chunk, names, into=probs)
            return probs
        top = torch.full(size, float("-inf"), device=logits.device)
        total = torch.zeros(size, device=logits.device)
        for names in chunks:
            up = self._scaled_up(logits, names, size)
            new_top = torch.maximum(top, up.amax(dim=0))
            total.mul_(torch.exp(top - new_top)).add_(torch.exp(up.sub_(new_top)).sum(dim=0))
            top = new_top
        for names in chunks:
            chunk = self._scaled_up(logits, names, size).sub_(top).exp_().div_(total)
            probs = self._merge_names(chunk, names, into=probs)
        return probs

    def _merge_names(self, probs_q: Tensor, names: slice, into: Tensor | None = None) -> Tensor:
        """Fold per-name probabilities ``[q, H, W]`` (names `names`) into per-class maxima."""
        n_cls = self.queries.num_classes
        if into is None and n_cls == len(self.queries.names):
            return probs_q
        if into is None:
            into = torch.full((n_cls, *probs_q.shape[1:]), -1.0, device=probs_q.device)
        idx = self.name_to_class[names].view(-1, 1, 1).expand_as(probs_q)
        return into.scatter_reduce_(0, idx, probs_q, reduce="amax", include_self=True)

    def refine_sd(self, image: np.ndarray, probs: Tensor, timer: StageTimer | None = None) -> tuple[Tensor, Tensor]:
        """CLIPer's Stable-Diffusion refinement (`refine.sd_refine`): the image's SD self-attention
        maps propagate the class probabilities; returns (labels, refined probabilities)."""
        from ..refine.sd_refine import SDRefiner

        if self.models.sd is None:
            raise S2ClipError("SD refinement requested but no SD model was loaded")
        timer = timer or self.timer()
        refiner = SDRefiner(self.models.sd, threshold=self.config.sd_threshold, seed=self.config.seed)
        with torch.no_grad():
            refined = refiner(image, probs, timer.times if timer.enabled else None)
        return self.labels_from(refined), refined

    def _sam_predictor(self):  # noqa: ANN202 - segment_anything.SamPredictor, imported lazily
        from segment_anything import SamPredictor

        if self.models.sam is None:
            raise S2ClipError("SAM refinement requested but no SAM model was loaded")
        if self._predictor is None:
            self._predictor = SamPredictor(self.models.sam)
        return self._predictor

    def encode_for_sam(self, image: np.ndarray, timer: StageTimer | None = None):  # noqa: ANN201
        """SAM's image embedding of `image` (its encoder under the run's SAM precision): the
        predictor, ready for prompts."""
        timer = timer or self.timer()
        predictor = self._sam_predictor()
        with timer("sam_encoder"), torch.no_grad(), autocast(self.device, self.sam_dtype):
            predictor.set_image(image)
        return predictor

    def refine(self, image: np.ndarray, labels: Tensor, probs: Tensor, timer: StageTimer | None = None,
               coarse_thresh: float | None = None, impl: str | None = None) -> tuple[Tensor, Tensor]:
        """SAM post-processing (DESIGN step 6) with the configured implementation and ablations
        (`coarse_thresh` and `impl` given: they replace the configured ones for this call).

        The image encoder runs under the run's precision; prompt decoding and every threshold in
        float32."""
        from ..refine.sam_refine import sam_refine

        timer = timer or self.timer()
        rc = self.config.refine
        if coarse_thresh is not None:
            rc = replace(rc, coarse_thresh=coarse_thresh)
        if impl is not None:
            rc = replace(rc, impl=impl)
        predictor = self.encode_for_sam(image, timer)
        with timer("sam_refine"), torch.no_grad(), full_precision(self.device):
            result = sam_refine(
                image, labels[None], probs, self.queries.num_classes, predictor,
                coarse_thresh=rc.coarse_thresh, min_area=rc.min_area, mask_coeff=rc.mask_coeff,
                iou_thresh=rc.iou_thresh, impl=rc.impl, use_cca=rc.use_cca, use_box=rc.use_box,
                use_mask=rc.use_mask, use_point=rc.use_point,
            )
        return result.labels[0], result.probs

    @property
    def uses_sam_prompts(self) -> bool:
        """Whether SAM's prompt refinement runs by default (a SAM model is loaded and wanted)."""
        return self.models.sam is not None and self.config.sam_refine

    def coarse(self, image: np.ndarray, size: tuple[int, int], timer: StageTimer | None = None) -> tuple[Tensor, Tensor]:
        """(labels ``[H, W]``, class probabilities ``[C, H, W]``) at `size` before SD and SAM:
        features, stitching, PAMR when configured, classification."""
        timer = timer or self.timer()
        with torch.no_grad():
            return self.coarse_from_logits(image, self.predict_logits(image, timer), size, timer)

    def coarse_from_logits(self, image: np.ndarray, logits: Tensor, size: tuple[int, int],
                           timer: StageTimer) -> tuple[Tensor, Tensor]:
        """`coarse` from the stitched per-name maps of `image` (`predict_logits`): PAMR when
        configured, classification."""
        if self.config.pamr:
            with timer("pamr"):
                logits = self.refine_pamr(image, logits, size)
        with timer("classify"):
            labels, probs = self.classify(logits, size)
            return self.head.correct_labels(image, labels), probs

    def __call__(self, image: np.ndarray, *, refine: bool | None = None, name: str | None = None) -> SegmentationResult:
        """Segment one H×W×3 uint8 RGB image; labels at its own size. `name`: the image file's stem,
        by which pre-generated instance masks are found (CorrCLIP with a mask folder)."""
        check_image(image)
        timer = self.timer()
        if self.mask_source is not None:
            with timer("instance_masks"):
                self.instance_mask(image, name)
        with torch.no_grad():
            return self.finish(image, self.predict_logits(image, timer), timer, refine=refine)

    def finish(self, image: np.ndarray, logits: Tensor, timer: StageTimer, *,
               refine: bool | None = None) -> SegmentationResult:
        """Everything after the stitched per-name maps of `image` (`predict_logits`): PAMR,
        classification, SD, SAM, labels at the image's own size. `segment --batch` computes the
        maps of several images in shared forward passes and finishes each image here."""
        with torch.no_grad():
            work_image = image
            if self.config.work_resolution == "resized":
                work_image = resize_short_side(image, self.config.short_side, self.config.max_long_side)
            labels, probs = self.coarse_from_logits(image, logits, work_image.shape[:2], timer)
            if self.config.sd:
                labels, probs = self.refine_sd(work_image, probs, timer)
            do_refine = self.uses_sam_prompts if refine is None else refine
            if do_refine:
                labels, probs = self.refine(work_image, labels, probs, timer)
            if tuple(labels.shape) != image.shape[:2]:
                labels = F.interpolate(labels[None, None].float(), size=image.shape[:2], mode="nearest")[0, 0]
        return SegmentationResult(labels.cpu().numpy().astype(np.int64), probs, timer.times)


def mask_source_of(config: SegmenterConfig, device: torch.device) -> MaskSource:
    """The instance-mask source `config` names: its folder of pre-generated masks, else SAM 2's
    generator (weights as `config.models` says; under the run's precision)."""
    from ..refine.instance_masks import Sam2GeneratorParams, mask_source_for

    params = Sam2GeneratorParams(points_per_side=config.mask_points)
    return mask_source_for(config.instance_masks, config.mask_model, params, mode=config.models,
                           path=config.weights.sam2, offline=config.offline, device=device,
                           dtype=compute_dtype(config.precision, device))


def check_image(image: np.ndarray) -> None:
    """What the Segmenter takes: an H×W×3 uint8 RGB array (one-line error otherwise)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise S2ClipError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")


def renormalized(probs: Tensor) -> Tensor:
    """NACLIP's last step: class probabilities ``[C, H, W]`` divided by their per-pixel sum (after
    the max over each class's names the sum falls below 1 wherever a class has several names)."""
    return probs / probs.sum(dim=0, keepdim=True)


def check_config(config: SegmenterConfig) -> None:
    """One-line errors for settings the method cannot honour (before any model is loaded)."""
    if config.method not in METHODS:
        raise S2ClipError(f"unknown method {config.method!r}; choose one of: {', '.join(METHODS)}")
    method = METHODS[config.method]
    template_set(config.templates)  # an unknown set is an error here, before any model is loaded
    if config.layers and method.strategy != "proxy":
        raise S2ClipError(f"--layers applies to the proxy-attention methods (s2clip, proxyclip); {method.name} "
                          "uses its own layers")
    if config.layers and method.name == "trident":
        raise S2ClipError("--layers does not apply to trident (its spliced map is the last block's)")
    if config.combine != "mean" and method.layers != LAYERS_HIERARCHICAL and not config.layers:
        raise S2ClipError(f"--combine {config.combine} combines several layers; {method.name} uses one")
    if method.name == "trident" and config.sam is None:
        raise S2ClipError("trident needs a SAM model for its splice-then-segment guidance (config.sam); "
                          "to skip only its prompt refinement set sam_refine=False (--no-sam)")
    if config.pamr and (config.pamr_iterations < 0 or not config.pamr_dilations):
        raise S2ClipError("PAMR needs iterations >= 0 and at least one dilation")
