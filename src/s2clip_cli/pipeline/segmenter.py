"""The S2CLIP pipeline (DESIGN steps 1–6) as one object: build once, call on many images.

>>> from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
>>> seg = Segmenter.build(SegmenterConfig(), classes=[["cat"], ["dog"]], background=None)
>>> result = seg(image)          # image: H x W x 3 uint8 RGB
>>> result.labels                # H x W int64, indices into seg.queries.labels
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import config as C
from ..config import RefineConfig
from ..errors import S2ClipError
from ..models.clip import CLIP_MEAN, CLIP_STD, default_layers
from ..models.factory import LoadedModels, ModelPaths, load_models, resolve_device
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD
from .fusion import proxy_attention, resample_matrix
from .text import ClassQueries, build_queries, encode_names
from .windows import Stitcher, sliding_windows

Combine = Literal["mean", "entropy"]


@dataclass
class SegmenterConfig:
    """Every knob of the pipeline. Defaults are `s2clip segment`'s."""

    clip: str = "ViT-B/16"
    vfm: str = "dino_vitb8"
    sam: str | None = "vit_b"  # None: no SAM post-processing
    layers: list[int] | None = None  # None: the deeper half (see models.clip.default_layers)
    combine: Combine = "mean"
    entropy_tau: float = 0.1
    short_side: int = C.SEGMENT_SHORT_SIDE
    max_long_side: int = C.MAX_LONG_SIDE
    crop: int = C.CROP
    stride: int = C.SEGMENT_STRIDE
    beta: float = C.BETA
    gamma: float = C.GAMMA
    logit_scale: float = C.LOGIT_SCALE
    prob_thd: float = 0.0  # pixels under it fall to the background (with-background runs only)
    window_batch: int = 4
    refine: RefineConfig = field(default_factory=RefineConfig)
    models: str = "real"
    device: str = "auto"
    offline: bool = False
    weights: ModelPaths = field(default_factory=ModelPaths)


@dataclass
class SegmentationResult:
    labels: np.ndarray  # [H, W] int64 class indices (0 = background when there is one)
    probs: Tensor  # [C, H, W] float32 class probabilities (after refinement when it ran)
    timings: dict[str, float]  # seconds per stage


class _StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


class Segmenter:
    """CLIP + VFM + SAM segmenter for a fixed list of classes."""

    def __init__(self, config: SegmenterConfig, queries: ClassQueries, models: LoadedModels,
                 device: torch.device) -> None:
        self.config = config
        self.queries = queries
        self.models = models
        self.device = device
        clip = models.clip
        self.layers = sorted(set(config.layers)) if config.layers else default_layers(clip.num_blocks)
        text_id = None if models.is_random else f"{clip.name}|{models.identity.get(clip.name, '')}"
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
        if config.combine not in ("mean", "entropy"):
            raise S2ClipError(f"unknown layer combination {config.combine!r}: use mean or entropy")
        if models is None:
            models = load_models(config.clip, config.vfm, config.sam, mode=config.models,
                                 paths=config.weights, offline=config.offline, device=device)
        queries = build_queries(classes, background)
        with torch.no_grad():
            return cls(config, queries, models, device)

    def with_classes(self, classes: list[list[str]], background: list[str] | None) -> Segmenter:
        """A segmenter for other classes that shares this one's models."""
        return Segmenter(self.config, build_queries(classes, background), self.models, self.device)

    # ------------------------------------------------------------------ numerics helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _resample(self, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
        key = (src, dst)
        if key not in self._resample_cache:
            self._resample_cache[key] = resample_matrix(src, dst, device=self.device)
        return self._resample_cache[key]

    def _pad_multiple(self) -> int:
        clip_p = self.models.clip.patch_size
        vfm_p = int(getattr(self.models.vfm, "patch_size", clip_p))
        return clip_p * vfm_p // math.gcd(clip_p, vfm_p)

    # ------------------------------------------------------------------ per-window features
    def window_logits(self, windows: Tensor, timer: _StageTimer | None = None) -> Tensor:
        """Cosine logits ``[B, Q, h, w]`` on the VFM grid for windows ``[B, 3, H, W]`` in [0, 1].

        H and W must be multiples of both backbones' patch sizes."""
        timer = timer or _StageTimer(self.device)
        clip, vfm = self.models.clip, self.models.vfm
        with torch.no_grad():
            with timer("vfm"), self._autocast():
                feats = vfm((windows - self._mean["vfm"]) / self._std["vfm"])
            with timer("clip"), self._autocast():
                streams = clip.residual_streams((windows - self._mean["clip"]) / self._std["clip"], self.layers)
            with timer("fusion"):
                logits = self._fuse(feats.float(), streams.streams, streams.grid)
        return logits

    def _fuse(self, feats: Tensor, streams: list[Tensor], clip_grid: tuple[int, int]) -> Tensor:
        """Correlation block on every kept stream with the proxy attention, then classification."""
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
        logits = (per_layer * weights[:, :, None, None]).sum(dim=1)  # [B, M, Q]
        return logits.transpose(1, 2).reshape(b, -1, gh, gw)

    def _layer_weights(self, emb: Tensor, grid: tuple[int, int]) -> Tensor:
        """Per-window layer weights: uniform (`mean`) or softmax(−H_l/τ) of each layer's spatial
        entropy (Algorithm 1) on its token map (`entropy`)."""
        b, num_layers = emb.shape[:2]
        if self.config.combine == "mean":
            return torch.full((b, num_layers), 1.0 / num_layers, device=emb.device)
        from ..analysis.entropy import layer_entropy_weights, spatial_entropy

        rows = []
        for i in range(b):
            maps = emb[i].transpose(1, 2).reshape(num_layers, -1, *grid)  # [L, E, h, w]
            entropies = [spatial_entropy(maps[j : j + 1])["entropy"] for j in range(num_layers)]
            rows.append(layer_entropy_weights(entropies, self.config.entropy_tau).to(emb.device, emb.dtype))
        return torch.stack(rows)

    # ------------------------------------------------------------------ whole image
    def _windows(self, image: Tensor, boxes: list[tuple[int, int, int, int]]) -> Iterator[tuple[list, Tensor]]:
        """Batches of windows (bounded by `window_batch`), zero-padded to the patch multiple."""
        mult = self._pad_multiple()
        for start in range(0, len(boxes), self.config.window_batch):
            chunk = boxes[start : start + self.config.window_batch]
            crops = torch.stack([image[:, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])
            h, w = crops.shape[-2:]
            ph, pw = -h % mult, -w % mult
            if ph or pw:
                crops = F.pad(crops, (0, pw, 0, ph))
            yield chunk, crops

    def predict_logits(self, image: np.ndarray, timer: _StageTimer | None = None) -> Tensor:
        """Stitched cosine logits ``[Q, h, w]`` at the resized scale (DESIGN steps 1–5)."""
        from .transforms import resize_short_side

        timer = timer or _StageTimer(self.device)
        cfg = self.config
        with timer("prepare"):
            resized = resize_short_side(image, cfg.short_side, cfg.max_long_side)
            x = torch.from_numpy(np.ascontiguousarray(resized)).to(self.device)
            x = x.permute(2, 0, 1).float().div_(255.0)
        h, w = x.shape[-2:]
        boxes = sliding_windows(h, w, cfg.crop, cfg.stride)
        stitcher = Stitcher(len(self.queries.names), h, w, device=self.device)
        for chunk, crops in self._windows(x, boxes):
            logits = self.window_logits(crops, timer)
            with timer("stitch"):
                full = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False)
                for (y1, x1, y2, x2), values in zip(chunk, full, strict=True):
                    stitcher.add((y1, x1, y2, x2), values[:, : y2 - y1, : x2 - x1])
        with timer("stitch"):
            return stitcher.result()

    def classify(self, logits: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Logits ``[Q, h, w]`` → (labels ``[H, W]``, class probabilities ``[C, H, W]``) at `size`.

        Bilinear upsampling of the logits, ×logit scale, softmax over all names; a class's
        probability is the max over its names (synonyms, background stuff names); with a
        background, pixels whose top probability is under `prob_thd` become background."""
        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        probs_q = torch.softmax(up * self.config.logit_scale, dim=0)
        n_cls = self.queries.num_classes
        if n_cls == probs_q.shape[0]:
            probs = probs_q
        else:
            probs = torch.full((n_cls, *size), -1.0, device=probs_q.device)
            idx = self.name_to_class.view(-1, 1, 1).expand_as(probs_q)
            probs = probs.scatter_reduce(0, idx, probs_q, reduce="amax", include_self=True)
        top, labels = probs.max(dim=0)
        if self.queries.has_background and self.config.prob_thd > 0:
            labels = torch.where(top < self.config.prob_thd, torch.zeros_like(labels), labels)
        return labels, probs

    def refine(self, image: np.ndarray, labels: Tensor, probs: Tensor, timer: _StageTimer | None = None,
               coarse_thresh: float | None = None) -> tuple[Tensor, Tensor]:
        """SAM post-processing (DESIGN step 6) with the configured implementation and ablations."""
        from segment_anything import SamPredictor

        from ..refine.sam_refine import sam_refine

        timer = timer or _StageTimer(self.device)
        if self.models.sam is None:
            raise S2ClipError("SAM refinement requested but no SAM model was loaded")
        if self._predictor is None:
            self._predictor = SamPredictor(self.models.sam)
        rc = self.config.refine
        if coarse_thresh is not None:
            rc = replace(rc, coarse_thresh=coarse_thresh)
        with timer("sam_encoder"), torch.no_grad(), self._autocast():
            self._predictor.set_image(image)
        with timer("sam_refine"), torch.no_grad():
            result = sam_refine(
                image, labels[None], probs, self.queries.num_classes, self._predictor,
                coarse_thresh=rc.coarse_thresh, min_area=rc.min_area, mask_coeff=rc.mask_coeff,
                iou_thresh=rc.iou_thresh, impl=rc.impl, use_cca=rc.use_cca, use_box=rc.use_box,
                use_mask=rc.use_mask, use_point=rc.use_point,
            )
        return result.labels[0], result.probs

    def __call__(self, image: np.ndarray, *, refine: bool | None = None) -> SegmentationResult:
        """Segment one H×W×3 uint8 RGB image at its own size."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise S2ClipError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
        timer = _StageTimer(self.device)
        with torch.no_grad():
            logits = self.predict_logits(image, timer)
            with timer("classify"):
                labels, probs = self.classify(logits, image.shape[:2])
            do_refine = (self.models.sam is not None) if refine is None else refine
            if do_refine:
                labels, probs = self.refine(image, labels, probs, timer)
        return SegmentationResult(labels.cpu().numpy().astype(np.int64), probs, timer.times)
