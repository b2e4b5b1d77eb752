"""What each method computes from the image: per-name score maps, one *head* per family.

A `FeatureHead` turns a batch of windows (``[B, 3, H, W]`` in its input space, `to_input`: the
mmseg-normalised image for every head but CLIPer's) into per-name maps ``[B, Q, h, w]`` on the
backbone's patch grid, which the Segmenter stitches, classifies and refines. A window that is not a
multiple of a backbone's patch size loses its right/bottom remainder to that backbone's patch
convolution, as in the references' unpadded passes (the Segmenter pads the windows of the methods
whose references pad them).
Seven families (``s2clip_cli.methods`` names the method → family mapping):

- `ProxyLayersHead` — S2CLIP and ProxyCLIP: the VFM's proxy attention on the value path of each kept
  CLIP stream (S2CLIP: several layers combined; ProxyCLIP: the last block's input only), cosines
  on the VFM grid.
- `LastBlockHead` — CLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP: `attention.dense_clip_features` with
  the method's strategy and residual/FFN handling, cosines on the CLIP grid.
- `TridentHead` — per-window proxy-attention *tokens* (before ``ln_post``) spliced on the image's
  token grid, guided by SAM's last-block attention (`pipeline.trident`), then ``ln_post``/``proj``
  and cosines on SAM's grid. It works on the whole image (`image_logits`), not window by window.
- `corrclip.CorrClipHead` — CorrCLIP: DINO attention limited to the regions of class-agnostic
  instance masks, spatial and semantic branches, windows of its own (`pipeline.corrclip`).
- `CliperHead` — CLIPer's layer fusion and attention propagation (`pipeline.cliper`) on the whole
  image; its maps are already probabilities over the names (``scores = "probability"``).
- `pipeline.scclip.ScclipHead`, `pipeline.resclip.ResclipHead` — SC-CLIP's self-calibrated
  features and ResCLIP's residual attention over NACLIP, cosines on the CLIP grid.

Backbones run under the run's autocast; attention arithmetic, projections onto the text
embeddings and everything after in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import S2ClipError
from ..methods import (
    LAYERS_CLIPER,
    LAYERS_HIERARCHICAL,
    LAYERS_RESCLIP,
    LAYERS_SCCLIP,
    PROXY_MEAN_BATCH,
    Method,
)
from ..models.clip import CLIP_MEAN, CLIP_STD, ClipLayerStreams, default_layers
from ..models.precision import autocast, full_precision
from ..profiling import StageTimer
from .attention import cliper_layer_features, dense_clip_features
from .cliper import cliper_coarse_map, foreground_mean_query
from .fusion import proxy_attention
from .spatial_entropy import layer_entropy_weights, spatial_entropy
from .transforms import clip_to_imagenet, normalize_pixels
from .trident import guide_token_map, round_up_to_multiple
from .windows import Stitcher

if TYPE_CHECKING:
    from .segmenter import Segmenter

COSINE = "cosine"  # classification applies the logit scale and the softmax over names
PROBABILITY = "probability"  # already probabilities over the names: classification normalises per pixel


class FeatureHead:
    """Base: holds the Segmenter whose models, text embeddings and configuration it reads."""

    scores: str = COSINE

    def __init__(self, seg: Segmenter) -> None:
        self.seg = seg

    def layers(self) -> list[int]:
        """The CLIP layers (residual streams after these blocks) this head reads."""
        return [self.seg.models.clip.num_blocks - 2]

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        """Per-name maps ``[B, Q, h, w]`` of windows ``[B, 3, H, W]`` in the head's input space."""
        raise NotImplementedError

    def image_logits(self, x: Tensor, image: np.ndarray, timer: StageTimer) -> Tensor | None:
        """Per-name maps ``[Q, h, w]`` of the whole prepared image ``x`` ``[3, H, W]`` (and the
        original `image`), or None when the head works window by window."""
        return None

    def correct_labels(self, image: np.ndarray, labels: Tensor) -> Tensor:
        """Labels after the method's own correction of the classified map (CorrCLIP's map
        correction); unchanged by default."""
        return labels

    def to_input(self, pixels: Tensor) -> Tensor:
        """The resized image ``[3, H, W]`` (float32 0–255 RGB values) in the head's input space:
        mmseg's normalisation (`transforms.normalize_pixels`), then `adjust`. Padding a window
        with zeros in this space pads it with mmseg's mean colour, as the references do."""
        return self.adjust(normalize_pixels(pixels))

    def adjust(self, x: Tensor) -> Tensor:
        """The normalised image ``[3, H, W]`` brought to the size the head needs."""
        return x

    def _clip_input(self, windows: Tensor) -> Tensor:
        """CLIP's input: the windows themselves (already normalised), cut to whole patches."""
        return floor_to_multiple(windows, self.seg.models.clip.patch_size)

    def _vfm_input(self, windows: Tensor) -> Tensor:
        """The VFM's input as ProxyCLIP/Trident make it (`transforms.clip_to_imagenet`), cut to
        whole patches for VFMs whose grid follows the input size."""
        vfm = self.seg.models.vfm
        patch = int(getattr(vfm, "patch_size", 1))
        h, w = windows.shape[-2:]
        if hasattr(vfm, "grid") and tuple(vfm.grid(h, w)) != (h // patch, w // patch):
            return clip_to_imagenet(windows)  # resizes its input itself (SAM's encoder)
        return clip_to_imagenet(floor_to_multiple(windows, patch))


def floor_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """``x`` ``[..., H, W]`` without its bottom/right remainder modulo `multiple` (what a patch
    convolution with stride = kernel ignores); the tensor itself when there is none."""
    h, w = x.shape[-2:]
    if h % multiple == 0 and w % multiple == 0:
        return x
    return x[..., : h - h % multiple, : w - w % multiple]


class ProxyLayersHead(FeatureHead):
    """S2CLIP's hierarchical correlation block (DESIGN steps 3–4); ProxyCLIP with one layer."""

    def layers(self) -> list[int]:
        cfg, clip = self.seg.config, self.seg.models.clip
        if cfg.layers:
            return sorted(set(cfg.layers))
        if self.seg.method.layers == LAYERS_HIERARCHICAL:
            return default_layers(clip.num_blocks)
        return [clip.num_blocks - 2]

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        feats, streams = self._backbones(windows, timer)
        with timer("fusion"), full_precision(self.seg.device):
            return self._fuse(feats.float(), streams.streams, streams.grid)

    def _backbones(self, windows: Tensor, timer: StageTimer) -> tuple[Tensor, ClipLayerStreams]:
        """The VFM's patch features and the kept CLIP streams of normalised windows ``[B, 3, H, W]``,
        under the run's precision."""
        seg = self.seg
        with timer("vfm"), autocast(seg.device, seg.dtype):
            feats = seg.models.vfm(self._vfm_input(windows))
        with timer("clip"), autocast(seg.device, seg.dtype):
            streams = seg.models.clip.residual_streams(self._clip_input(windows), seg.layers)
        return feats, streams

    def mixed_values(self, feats: Tensor, streams: list[Tensor], clip_grid: tuple[int, int]) -> Tensor:
        """``out_proj(A·R·v)`` of every stream, ``[B, L, M, D]`` on the VFM grid (before ``ln_post``)."""
        seg = self.seg
        clip = seg.models.clip
        b, _, gh, gw = feats.shape
        attn = proxy_attention(feats, seg.config.beta, seg.config.gamma,
                               batch_mean=seg.method.proxy_mean == PROXY_MEAN_BATCH)  # [B, M, M]
        # A · resample(v) == (A · R) · v: resample once per window instead of once per layer.
        attn_r = torch.matmul(attn, seg.resample(clip_grid, (gh, gw)))  # [B, M, N]
        values = torch.cat([clip.value_tokens(s.float()) for s in streams], dim=-1)  # [B, N, L*D]
        mixed = torch.bmm(attn_r, values)  # [B, M, L*D]
        return mixed.view(b, gh * gw, len(streams), -1).permute(0, 2, 1, 3)  # [B, L, M, D]

    def _fuse(self, feats: Tensor, streams: list[Tensor], clip_grid: tuple[int, int]) -> Tensor:
        """Correlation block on every kept stream with the proxy attention, then cosine similarity
        with the class-name embeddings, layers combined (DESIGN step 3)."""
        b, _, gh, gw = feats.shape
        mixed = self.mixed_values(feats, streams, clip_grid)
        emb = F.normalize(self.seg.models.clip.project_values(mixed), dim=-1)  # [B, L, M, E]
        per_layer = emb @ self.seg.text.T  # [B, L, M, Q]
        weights = self._layer_weights(emb, (gh, gw))  # [B, L]
        cosines = (per_layer * weights[:, :, None, None]).sum(dim=1)  # [B, M, Q]
        return cosines.transpose(1, 2).reshape(b, -1, gh, gw)

    def _layer_weights(self, emb: Tensor, grid: tuple[int, int]) -> Tensor:
        """Per-window layer weights: uniform (`mean`) or softmax(−H_l/τ) of each layer's spatial
        entropy (Algorithm 1) on that window's token map (`entropy`)."""
        cfg = self.seg.config
        b, num_layers = emb.shape[:2]
        if cfg.combine == "mean":
            return torch.full((b, num_layers), 1.0 / num_layers, device=emb.device)
        rows = []
        for i in range(b):
            maps = emb[i].transpose(1, 2).reshape(num_layers, -1, *grid)  # [L, E, h, w]
            entropies = [spatial_entropy(maps[j : j + 1])["entropy"] for j in range(num_layers)]
            rows.append(layer_entropy_weights(entropies, cfg.entropy_tau).to(emb.device, emb.dtype))
        return torch.stack(rows)


class LastBlockHead(FeatureHead):
    """The last block's attention replaced by the method's strategy (its residual/FFN as the
    method keeps them), cosines on the CLIP grid."""

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        seg, method = self.seg, self.seg.method
        clip = seg.models.clip
        with timer("clip"), autocast(seg.device, seg.dtype):
            tokens = dense_clip_features(clip, self._clip_input(windows), method.strategy, residual=method.residual,
                                         ffn=method.ffn, sigma=seg.config.sigma)
        with timer("fusion"), full_precision(seg.device):
            b = windows.shape[0]
            grid = (windows.shape[-2] // clip.patch_size, windows.shape[-1] // clip.patch_size)  # remainder dropped
            cosines = F.normalize(tokens.float(), dim=-1) @ seg.text.T  # [B, h*w, Q]
            return cosines.transpose(1, 2).reshape(b, -1, *grid)


class TridentHead(ProxyLayersHead):
    """Trident: sub-image proxy-attention tokens spliced on the image grid, SAM-guided."""

    def layers(self) -> list[int]:
        return [self.seg.models.clip.num_blocks - 2]

    def adjust(self, x: Tensor) -> Tensor:
        """Trident's ``preprocess_image`` on the normalised image (as Trident): both sides brought up
        to multiples of the patch multiple (keeping the aspect ratio of the long side), at least the
        crop, bilinear."""
        h, w = x.shape[-2:]
        size = stride_aligned_size(h, w, self.seg.pad_multiple(), self.seg.config.crop)
        if size == (h, w):
            return x
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]

    def image_logits(self, x: Tensor, image: np.ndarray, timer: StageTimer) -> Tensor:
        seg = self.seg
        cfg, clip, sam = seg.config, seg.models.clip, seg.models.sam
        if sam is None:
            raise S2ClipError("trident needs a SAM model for its splice-then-segment guidance (--sam)")
        patch = int(getattr(seg.models.vfm, "patch_size", clip.patch_size))
        h, w = x.shape[-2:]
        spliced: Stitcher | None = None
        for batch in seg.windows(x):
            if any((c % patch) for box in batch.boxes for c in box) or batch.offset != (0, 0):
                raise S2ClipError(f"trident's windows must lie on the {patch}-pixel token grid (crop {cfg.crop}, "
                                  f"stride {cfg.stride})")
            feats, streams = self._backbones(batch.crops, timer)
            with timer("fusion"), full_precision(seg.device):
                tokens = self.mixed_values(feats.float(), streams.streams, streams.grid)[:, 0]  # [B, M, D]
                gh, gw = feats.shape[-2:]
                maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, gh, gw)
                if spliced is None:
                    spliced = Stitcher(maps.shape[1], h // patch, w // patch, device=seg.device)
                for (y1, x1, y2, x2), values in zip(batch.boxes, maps, strict=True):
                    spliced.add((y1 // patch, x1 // patch, y2 // patch, x2 // patch), values)
        assert spliced is not None
        sam_image = round_up_to_multiple(image, 16)
        with timer("sam_guidance"), autocast(seg.device, seg.sam_dtype):
            guided = guide_token_map(sam, sam_image, spliced.result(), cos_fac=cfg.cos_fac,
                                     refine_neg_cos=cfg.refine_neg_cos, halves=cfg.sam_halves)  # [D, gh, gw]
        with timer("fusion"), full_precision(seg.device):
            d, gh, gw = guided.shape
            emb = F.normalize(clip.project_values(guided.reshape(d, -1).T.float()), dim=-1)  # [M, E]
            return (emb @ seg.text.T).T.reshape(-1, gh, gw)


def stride_aligned_size(height: int, width: int, stride: int, crop: int) -> tuple[int, int]:
    """Trident's ``preprocess_image`` size: unchanged when both sides are multiples of `stride`;
    otherwise the long side goes up to the next multiple, the short side scales with it (truncated)
    and is rounded up to a multiple too; both at least `crop`."""
    if height % stride == 0 and width % stride == 0:
        return height, width
    longer = max(height, width)
    target = -(-longer // stride) * stride
    new_h, new_w = int(height * target / longer), int(width * target / longer)
    new_h, new_w = -(-new_h // stride) * stride, -(-new_w // stride) * stride
    return max(new_h, crop), max(new_w, crop)


class CliperHead(FeatureHead):
    """CLIPer (`pipeline.cliper`): fused attention, all-layer fusion and attention propagation on
    the whole image; probabilities over the names."""

    scores = PROBABILITY

    def layers(self) -> list[int]:
        return list(range(self.seg.models.clip.num_blocks))  # layer slots: every block's input

    def to_input(self, pixels: Tensor) -> Tensor:
        """CLIPer's own transform (not mmseg's): [0, 1] values, `adjust`, then CLIP's
        ``Normalize``."""
        return normalize_pixels(self.adjust(pixels / 255.0), CLIP_MEAN, CLIP_STD)

    def adjust(self, x: Tensor) -> Tensor:
        """CLIPer's ``_resize`` of the [0, 1] image: both sides rounded to the nearest multiple of the
        patch size (bicubic)."""
        patch = self.seg.models.clip.patch_size
        h, w = x.shape[-2:]
        size = (max(patch, int(h / patch + 0.5) * patch), max(patch, int(w / patch + 0.5) * patch))
        if size == (h, w):
            return x
        return F.interpolate(x[None], size=size, mode="bicubic", align_corners=False)[0].clamp_(0.0, 1.0)

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        seg = self.seg
        clip = seg.models.clip
        with timer("clip"), autocast(seg.device, seg.dtype):
            fused = cliper_layer_features(clip, self._clip_input(windows), seg.method.strategy, sigma=seg.config.sigma)
        with timer("fusion"), full_precision(seg.device):
            grid = (windows.shape[-2] // clip.patch_size, windows.shape[-1] // clip.patch_size)
            extra = foreground_mean_query(seg.text, seg.queries.name_to_class, seg.queries.has_background)
            return cliper_coarse_map(fused.features.float(), fused.attention.weights, seg.text, extra, grid,
                                     logit_scale=seg.config.logit_scale, attention_thr=seg.config.attention_thr)


def make_head(seg: Segmenter, method: Method) -> FeatureHead:
    """The head of `method`'s family."""
    if method.instance_masks:
        from .corrclip import CorrClipHead

        return CorrClipHead(seg)
    if method.name == "trident":
        return TridentHead(seg)
    if method.layers == LAYERS_CLIPER:
        return CliperHead(seg)
    if method.layers == LAYERS_SCCLIP:  # heads in modules of their own (they import this one)
        from .scclip import ScclipHead

        return ScclipHead(seg)
    if method.layers == LAYERS_RESCLIP:
        from .resclip import ResclipHead

        return ResclipHead(seg)
    if method.strategy == "proxy":
        return ProxyLayersHead(seg)
    return LastBlockHead(seg)


__all__ = [
    "COSINE", "PROBABILITY", "CliperHead", "FeatureHead", "LastBlockHead", "ProxyLayersHead", "TridentHead",
    "floor_to_multiple", "make_head", "stride_aligned_size",
]
