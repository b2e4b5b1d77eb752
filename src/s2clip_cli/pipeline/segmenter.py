"""The S2CLIP pipeline (DESIGN steps 1–6) as one object: build once, call on many images.

>>> from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
>>> seg = Segmenter.build(SegmenterConfig(), classes=[["cat"], ["dog"]], background=None)
>>> result = seg(image)          # image: H x W x 3 uint8 RGB
>>> result.labels                # H x W int64, indices into seg.queries.labels

Its pieces are usable on their own: `prepare` (resize to the working scale), `window_logits`
(features and fusion of a batch of windows), `predict_logits` (windows stitched), `classify`
(logits → labels and class probabilities) and `refine` (SAM post-processing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config as defaults
from ..config import RefineConfig
from ..errors import S2ClipError
from ..models.clip import CLIP_MEAN, CLIP_STD, default_layers
from ..models.factory import LoadedModels, ModelPaths, load_models, resolve_device
from ..models.precision import autocast, compute_dtype, full_precision, sam_encoder_dtype
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD
from ..profiling import StageTimer
from .fusion import proxy_attention, resample_matrix
from .spatial_entropy import layer_entropy_weights, spatial_entropy
from .text import ClassQueries, build_queries, encode_names
from .transforms import resize_short_side
from .windows import Stitcher, WindowBatch, sliding_windows, window_batches

Combine = Literal["mean", "entropy"]
COMBINES: tuple[str, ...] = ("mean", "entropy")
WorkResolution = Literal["image", "resized"]

# Above this many name-probability values at the output size, `classify` streams over the names
# instead of holding every name's upsampled map at once (256 MB of float32).
CLASSIFY_BUDGET = 64 * 2**20
SD_MODEL = "sd21_base"


@dataclass
class SegmenterConfig:
    """Every knob of the pipeline. Defaults are `s2clip segment`'s."""

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
    beta: float = defaults.BETA
    gamma: float = defaults.GAMMA
    logit_scale: float = defaults.LOGIT_SCALE
    prob_thd: float = 0.0  # pixels under it fall to the background (with-background runs only)
    window_batch: int = 4
    refine: RefineConfig = field(default_factory=RefineConfig)
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
                 device: torch.device) -> None:
        self.config = config
        self.queries = queries
        self.models = models
        self.device = device
        self.dtype = compute_dtype(config.precision, device)
        self.sam_dtype = sam_encoder_dtype(config.precision, device, config.sam)
        clip = models.clip
        self.layers = sorted(set(config.layers)) if config.layers else default_layers(clip.num_blocks)
        text_id = None if models.is_random else f"{clip.name}|{models.identity.get(clip.name, '')}"
        with full_precision(device):
            self.text = encode_names(clip, queries.names, text_id).to(device)  # [Q, E]
        self.name_to_class = torch.tensor(queries.name_to_class, device=device)
        self._resample_cache: dict[tuple[tuple[int, int], tuple[int, int]], Tensor] = {}
        self._predictor = None
        self._mean = {
            "clip": torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1),
            "vfm": torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
        }
        self._std = {
            "clip": torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1),
            "vfm": torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: SegmenterConfig, classes: list[list[str]], background: list[str] | None,
              models: LoadedModels | None = None) -> Segmenter:
        """Load the models named by `config` (unless given) and embed the class names."""
        device = resolve_device(config.device)
        if config.combine not in COMBINES:
            raise S2ClipError(f"unknown layer combination {config.combine!r}: use mean or entropy")
        if config.work_resolution not in ("image", "resized"):
            raise S2ClipError(f"unknown working resolution {config.work_resolution!r}: use image or resized")
        compute_dtype(config.precision, device)  # reject a bad --precision before loading anything
        if models is None:
            models = load_models(config.clip, config.vfm, config.sam, mode=config.models,
                                 paths=config.weights, offline=config.offline, device=device,
                                 sd_name=SD_MODEL if config.sd else None,
                                 sd_dtype=compute_dtype(config.precision, device))
        elif config.sd and models.sd is None:
            raise S2ClipError("SD refinement requested but the given models hold no SD model")
        queries = build_queries(classes, background)
        with torch.no_grad():
            return cls(config, queries, models, device)

    def with_classes(self, classes: list[list[str]], background: list[str] | None) -> Segmenter:
        """A segmenter for other classes that shares this one's models."""
        return Segmenter(self.config, build_queries(classes, background), self.models, self.device)

    def timer(self) -> StageTimer:
        """A stage timer as the configuration asks (a no-op unless `timing`)."""
        return StageTimer(self.device, enabled=self.config.timing)

    # ------------------------------------------------------------------ numerics helpers
    def _resample(self, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
        key = (src, dst)
        if key not in self._resample_cache:
            self._resample_cache[key] = resample_matrix(src, dst, device=self.device)
        return self._resample_cache[key]

    def pad_multiple(self) -> int:
        """Windows are padded to a multiple of both backbones' patch sizes."""
        clip_p = self.models.clip.patch_size
        vfm_p = int(getattr(self.models.vfm, "patch_size", clip_p))
        return math.lcm(clip_p, vfm_p)

    # ------------------------------------------------------------------ per-window features
    def window_logits(self, windows: Tensor, timer: StageTimer | None = None) -> Tensor:
        """Cosine similarities ``[B, Q, h, w]`` on the VFM grid for windows ``[B, 3, H, W]`` in [0, 1].

        H and W must be multiples of both backbones' patch sizes. The backbones run under the
        run's precision; the fusion (attention softmax, classification) in float32."""
        timer = timer or self.timer()
        clip, vfm = self.models.clip, self.models.vfm
        with torch.no_grad():
            with timer("vfm"), autocast(self.device, self.dtype):
                feats = vfm((windows - self._mean["vfm"]) / self._std["vfm"])
            with timer("clip"), autocast(self.device, self.dtype):
                streams = clip.residual_streams((windows - self._mean["clip"]) / self._std["clip"], self.layers)
            with timer("fusion"), full_precision(self.device):
                logits = self._fuse(feats.float(), streams.streams, streams.grid)
        return logits

    def _fuse(self, feats: Tensor, streams: list[Tensor], clip_grid: tuple[int, int]) -> Tensor:
        """Correlation block on every kept stream with the proxy attention, then cosine similarity
        with the class-name embeddings, layers combined (DESIGN step 3)."""
        clip = self.models.clip
        b, _, gh, gw = feats.shape
        attn = proxy_attention(feats, self.config.beta, self.config.gamma)  # [B, M, M]
        # A · resample(v) == (A · R) · v: resample once per window instead of once per layer.
        attn_r = torch.matmul(attn, self._resample(clip_grid, (gh, gw)))  # [B, M, N]
        values = torch.cat([clip.value_tokens(s.float()) for s in streams], dim=-1)  # [B, N, L*D]
        mixed = torch.bmm(attn_r, values)  # [B, M, L*D]
        num_layers = len(streams)
        mixed = mixed.view(b, gh * gw, num_layers, -1).permute(0, 2, 1, 3)  # [B, L, M, D]
        emb = F.normalize(clip.project_values(mixed), dim=-1)  # [B, L, M, E]
        per_layer = emb @ self.text.T  # [B, L, M, Q]
        weights = self._layer_weights(emb, (gh, gw))  # [B, L]
        cosines = (per_layer * weights[:, :, None, None]).sum(dim=1)  # [B, M, Q]
        return cosines.transpose(1, 2).reshape(b, -1, gh, gw)

    def _layer_weights(self, emb: Tensor, grid: tuple[int, int]) -> Tensor:
        """Per-window layer weights: uniform (`mean`) or softmax(−H_l/τ) of each layer's spatial
        entropy (Algorithm 1) on that window's token map (`entropy`)."""
        b, num_layers = emb.shape[:2]
        if self.config.combine == "mean":
            return torch.full((b, num_layers), 1.0 / num_layers, device=emb.device)
        rows = []
        for i in range(b):
            maps = emb[i].transpose(1, 2).reshape(num_layers, -1, *grid)  # [L, E, h, w]
            entropies = [spatial_entropy(maps[j : j + 1])["entropy"] for j in range(num_layers)]
            rows.append(layer_entropy_weights(entropies, self.config.entropy_tau).to(emb.device, emb.dtype))
        return torch.stack(rows)

    # ------------------------------------------------------------------ whole image
    def prepare(self, image: np.ndarray) -> Tensor:
        """Step 1: the image resized as the preset says (mmseg keep-ratio resize), ``[3, h, w]`` in
        [0, 1] on the device."""
        cfg = self.config
        resized = resize_short_side(image, cfg.short_side, cfg.max_long_side)
        x = torch.from_numpy(np.require(resized, requirements=["C", "W"])).to(self.device)
        return x.permute(2, 0, 1).float().div_(255.0)

    def windows(self, x: Tensor) -> list[WindowBatch]:
        """Step 2: the prepared image's sliding windows in batches of `window_batch`, padded to the
        patch multiple."""
        h, w = x.shape[-2:]
        boxes = sliding_windows(h, w, self.config.crop, self.config.stride)
        return list(window_batches(x, boxes, self.config.window_batch, self.pad_multiple(), CLIP_MEAN))

    def predict_logits(self, image: np.ndarray, timer: StageTimer | None = None) -> Tensor:
        """Stitched cosine similarities ``[Q, h, w]`` at the resized scale (DESIGN steps 1–5)."""
        timer = timer or self.timer()
        with timer("prepare"):
            x = self.prepare(image)
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
        chunks of names (two passes), so only the class probabilities are held at full size."""
        with full_precision(self.device):
            logits = logits.float()
            n_names = logits.shape[0]
            if n_names * size[0] * size[1] <= CLASSIFY_BUDGET:
                up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
                probs = self._merge_names(torch.softmax(up.mul_(self.config.logit_scale), dim=0), slice(None))
            else:
                probs = self._classify_streamed(logits, size)
        return self.labels_from(probs), probs

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

    def _scaled_up(self, logits: Tensor, names: slice, size: tuple[int, int]) -> Tensor:
        up = F.interpolate(logits[None, names], size=size, mode="bilinear", align_corners=False)[0]
        return up.mul_(self.config.logit_scale)

    def _classify_streamed(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """The softmax over names in chunks: pass 1 the per-pixel max and sum of exponentials,
        pass 2 each chunk's probabilities folded into the class maxima."""
        chunks = self._name_chunks(logits.shape[0], size)
        top = torch.full(size, float("-inf"), device=logits.device)
        total = torch.zeros(size, device=logits.device)
        for names in chunks:
            up = self._scaled_up(logits, names, size)
            new_top = torch.maximum(top, up.amax(dim=0))
            total.mul_(torch.exp(top - new_top)).add_(torch.exp(up.sub_(new_top)).sum(dim=0))
            top = new_top
        probs = torch.full((self.queries.num_classes, *size), -1.0, device=logits.device)
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
               coarse_thresh: float | None = None) -> tuple[Tensor, Tensor]:
        """SAM post-processing (DESIGN step 6) with the configured implementation and ablations.

        The image encoder runs under the run's precision; prompt decoding and every threshold in
        float32."""
        from ..refine.sam_refine import sam_refine

        timer = timer or self.timer()
        rc = self.config.refine
        if coarse_thresh is not None:
            rc = replace(rc, coarse_thresh=coarse_thresh)
        predictor = self.encode_for_sam(image, timer)
        with timer("sam_refine"), torch.no_grad(), full_precision(self.device):
            result = sam_refine(
                image, labels[None], probs, self.queries.num_classes, predictor,
                coarse_thresh=rc.coarse_thresh, min_area=rc.min_area, mask_coeff=rc.mask_coeff,
                iou_thresh=rc.iou_thresh, impl=rc.impl, use_cca=rc.use_cca, use_box=rc.use_box,
                use_mask=rc.use_mask, use_point=rc.use_point,
            )
        return result.labels[0], result.probs

    def __call__(self, image: np.ndarray, *, refine: bool | None = None) -> SegmentationResult:
        """Segment one H×W×3 uint8 RGB image; labels at its own size."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise S2ClipError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        timer = self.timer()
        with torch.no_grad():
            logits = self.predict_logits(image, timer)
            work_image = image
            if self.config.work_resolution == "resized":
                work_image = resize_short_side(image, self.config.short_side, self.config.max_long_side)
            with timer("classify"):
                labels, probs = self.classify(logits, work_image.shape[:2])
            if self.config.sd:
                labels, probs = self.refine_sd(work_image, probs, timer)
            do_refine = (self.models.sam is not None) if refine is None else refine
            if do_refine:
                labels, probs = self.refine(work_image, labels, probs, timer)
            if tuple(labels.shape) != image.shape[:2]:
                labels = F.interpolate(labels[None, None].float(), size=image.shape[:2], mode="nearest")[0, 0]
        return SegmentationResult(labels.cpu().numpy().astype(np.int64), probs, timer.times)
