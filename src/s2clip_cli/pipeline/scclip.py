"""SC-CLIP (``SuleBai/SC-CLIP``, ``clip/model.py`` ``VisionTransformer.forward``): self-calibrated
CLIP features, and its head.

On a window (one at a time in the reference; here per window inside a batch), with ``x_i`` the
residual stream after block i (ViT-B/16 indices; `reference_blocks` for other depths):

1. **Anomaly repair.** Local outlier factors of the patch tokens of ``x_10`` (the last block's
   input; 30 neighbours, SC-CLIP's own LOF variant in `lof_scores`); tokens above the 0.95 quantile
   (``torch.quantile``) are outliers, and each is replaced by the mean of its non-outlier 3×3
   neighbours (`repair_anomalies`) — in ``x_10`` and in ``x_8``. The class token is set aside.
2. **Self-calibration.** ``S = cos(x̂_8)`` between repaired patches; the patch tokens of ``x_10``
   are aggregated with ``S`` thresholded at 0.4 and row-normalised (`aggregate`).
3. **Last block** (no residual, no FFN, patches only): ``A = ½(softmax(3·(S − mean S)), negatives
   masked) + ½ softmax(s·k·kᵀ)`` per head, ``out_proj(A·v)``, plus 0.3 × the class token.
4. Aggregated again with ``cos(x_3)`` thresholded at 0.4 (not repaired).
5. **Multi-level fusion.** ``Σ_{i=3..9} x_i`` (class token included) through the same last block
   (its class token × 0.3 added), aggregated with the same ``cos(x_3)`` matrix, added to step 4.
6. ``ln_post`` and ``proj``.

Outliers are indexed on the window's own grid, row-major: token i is patch ``(i // w, i % w)``.
SC-CLIP's code indexes them as ``(i // h, i % h)``, which is the same only on a square grid (its
sliding windows are square; its whole-image path fails with an IndexError, or repairs the wrong
patches, on any other). The LOF needs more than one token: with N patches it uses
``min(30, N − 1)`` neighbours (SC-CLIP's ``torch.topk`` fails below 31 patches).

The arithmetic after the early blocks is float32 with autocast disabled; the LOF and the 0.95
quantile are SC-CLIP's operations in its order, because a score that sits on the quantile is an
outlier or not by its last bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import S2ClipError
from ..models.clip import ClipBackbone, sdpa_block
from ..models.precision import autocast, full_precision
from ..profiling import StageTimer
from .method_features import FeatureHead
from .reference_blocks import reference_block, reference_range

# Bytes of the [rows, N, D] difference tensor the LOF distances are computed over at once.
LOF_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ScclipParams:
    """SC-CLIP's knobs, named as its code spells them (``configs/base_config.py`` and the
    ``VisionTransformer`` attributes); block indices are a 12-block ViT's."""

    pre_adjust_idx: int = 8  # block whose (repaired) output calibrates the last block
    post_adjust_idx: int = 3  # block whose output re-aggregates the result
    multi_start_idx: int = 3  # multi-level fusion: blocks multi_start_idx..multi_end_idx-1
    multi_end_idx: int = 10
    res_cls: float = 0.3  # class token weight added to the last block's patch outputs
    beta: float = 0.4  # similarity threshold of the aggregations
    attn_scale: float = 3.0  # temperature of the calibrated attention, (S − mean S) × 3
    n_neighbors: int = 30
    contamination: float = 0.05

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ScclipParams:
        """The defaults with the method options that name a field (others belong to other heads)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


@dataclass(frozen=True)
class ScclipBlocks:
    """The blocks SC-CLIP reads on a CLIP of a given depth."""

    last_input: int
    pre: int
    post: int
    multi: list[int]

    @classmethod
    def for_depth(cls, params: ScclipParams, num_blocks: int) -> ScclipBlocks:
        blocks = cls(num_blocks - 2, reference_block(params.pre_adjust_idx, num_blocks),
                     reference_block(params.post_adjust_idx, num_blocks),
                     reference_range(params.multi_start_idx, params.multi_end_idx, num_blocks))
        if not all(0 <= i <= num_blocks - 2 for i in (blocks.pre, blocks.post, *blocks.multi)):
            raise S2ClipError(f"SC-CLIP's blocks {blocks} do not fit a CLIP with {num_blocks} blocks")
        return blocks

    def used(self) -> list[int]:
        return sorted({self.last_input, self.pre, self.post, *self.multi})


# ------------------------------------------------------------------------------ anomaly tokens
def lof_scores(tokens: Tensor, n_neighbors: int = 30) -> tuple[Tensor, Tensor]:
    """SC-CLIP's ``lof_pytorch`` scores of ``tokens`` ``[N, D]``: (scores ``[N]``, neighbour indices).

    Squared Euclidean distances; the k nearest other tokens (k = `n_neighbors`, at most N − 1);
    reach distances ``max(d(p, o), k-distance(p))`` — p's own k-distance, as SC-CLIP; local
    reachability density ``k / mean reach``; the score is the mean density ratio of p's neighbours
    to p. The distance rows are computed in chunks (each entry's arithmetic is unchanged)."""
    n = tokens.shape[0]
    k = min(n_neighbors, n - 1)
    if k < 1:
        raise S2ClipError(f"the local outlier factor needs at least two tokens, got {n}")
    rows = max(1, LOF_CHUNK_BYTES // max(1, n * tokens.shape[1] * tokens.element_size()))
    distances = torch.cat([torch.linalg.vector_norm(tokens[i : i + rows, None] - tokens[None, :], ord=2, dim=2) ** 2
                           for i in range(0, n, rows)])
    knn_distances, knn_indices = torch.topk(distances, k=k + 1, largest=False)
    knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]
    k_distances = knn_distances[:, -1].unsqueeze(1).expand_as(knn_distances)
    reach_distances = torch.max(knn_distances, k_distances)
    lrd = k / torch.nan_to_num(reach_distances.mean(dim=1), nan=1e-6)
    scores = (lrd[knn_indices] / lrd.unsqueeze(1)).mean(dim=1)
    return scores, knn_indices


def lof_outliers(tokens: Tensor, n_neighbors: int = 30, contamination: float = 0.05) -> Tensor:
    """Indices of the tokens whose score exceeds ``torch.quantile(scores, 1 − contamination)``
    (SC-CLIP: the top 5 %; strictly above, so a score equal to the quantile is not an outlier).
    Fewer than two tokens: none."""
    if tokens.shape[0] < 2:
        return torch.zeros(0, dtype=torch.long, device=tokens.device)
    scores, _ = lof_scores(tokens, n_neighbors)
    threshold = torch.quantile(scores.to(torch.float32), 1 - contamination)
    return torch.where(scores > threshold)[0]


def outlier_mask(indices: Tensor, grid: tuple[int, int]) -> Tensor:
    """A ``[h, w]`` boolean map of the outlier tokens (row-major: token i is ``(i // w, i % w)``)."""
    h, w = grid
    mask = torch.zeros(h * w, dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask.view(h, w)


def repair_anomalies(tokens: Tensor, outliers: Tensor, grid: tuple[int, int]) -> Tensor:
    """SC-CLIP's ``mean_interpolation``: each outlier of ``tokens`` ``[B, h*w, C]`` (``outliers``
    ``[B, h, w]`` bool) replaced by the mean of its 8 neighbours that are not outliers (zero
    padding outside the grid); an outlier without such a neighbour keeps its value."""
    b, _, c = tokens.shape
    h, w = grid
    fmap = tokens.transpose(1, 2).reshape(b, c, h, w)
    keep = (~outliers).to(fmap.dtype).unsqueeze(1)  # [B, 1, h, w]: 1 = not an outlier
    kernel = torch.ones(c, 1, 3, 3, dtype=fmap.dtype, device=fmap.device)
    kernel[:, 0, 1, 1] = 0
    neighbour_sum = F.conv2d(F.pad(fmap * keep, (1, 1, 1, 1)), kernel, groups=c)
    valid = F.conv2d(F.pad(keep, (1, 1, 1, 1)), kernel[:1])  # [B, 1, h, w] non-outlier neighbours
    mean = neighbour_sum / torch.where(valid == 0, torch.ones_like(valid), valid)
    update = outliers.unsqueeze(1) & (valid > 0)
    repaired = torch.where(update, mean, fmap)
    return repaired.reshape(b, c, h * w).transpose(1, 2)


# ------------------------------------------------------------------------------ calibration
def unit_similarity(tokens: Tensor) -> Tensor:
    """``[B, N, N]`` cosine similarity of ``tokens`` ``[B, N, C]`` (divided by their norms, as SC-CLIP)."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return torch.matmul(unit, unit.transpose(1, 2))


def thresholded(similarity: Tensor, beta: float) -> Tensor:
    """The similarity with entries under `beta` set to 0 (SC-CLIP's ``simi[simi < beta] = 0``)."""
    return similarity.masked_fill(similarity < beta, 0.0)


def aggregate(tokens: Tensor, weights: Tensor) -> Tensor:
    """SC-CLIP's ``adaptively_aggregate``: ``tokens`` ``[B, N, C]`` mixed by ``weights`` ``[B, N, N]``
    normalised by their row sums (+1e-6)."""
    return torch.matmul(weights / (weights.sum(dim=-1, keepdim=True) + 1e-6), tokens)


def calibrated_attention(similarity: Tensor, scale: float = 3.0) -> Tensor:
    """``softmax((S − mean S) · scale)`` over ``[B, N, N]``, entries with negative logits masked to
    −inf; the mean is each window's own (``torch.mean`` of its matrix)."""
    mean = torch.stack([torch.mean(window) for window in similarity]).view(-1, 1, 1)
    logits = (similarity - mean) * scale
    return torch.softmax(logits.masked_fill(logits < 0.0, float("-inf")), dim=-1)


def calibrated_block(block: nn.Module, stream: Tensor, calibrated: Tensor) -> Tensor:
    """SC-CLIP's ``custom_attn`` of the last `block` on patch tokens ``stream`` ``[B, N, D]``:
    ``out_proj(½(calibrated + softmax(s·k·kᵀ)) · v)`` per head, ``calibrated`` ``[B, N, N]``."""
    attn: nn.MultiheadAttention = block.attn
    b, n, d = stream.shape
    heads = attn.num_heads
    _, k, v = F.linear(block.ln_1(stream), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    k = k.reshape(b, n, heads, d // heads).transpose(1, 2)
    v = v.reshape(b, n, heads, d // heads).transpose(1, 2)
    scale = (d // heads) ** -0.5
    weights = (calibrated.unsqueeze(1) + torch.softmax(torch.matmul(k, k.transpose(-1, -2)) * scale, dim=-1)) / 2
    mixed = torch.matmul(weights, v).transpose(1, 2).reshape(b, n, d)
    return attn.out_proj(mixed)


def scclip_features(clip: ClipBackbone, images: Tensor, params: ScclipParams | None = None) -> Tensor:
    """SC-CLIP's dense patch embeddings ``[B, h*w, E]`` (not normalised) of CLIP-normalised windows
    ``[B, 3, H, W]`` (H, W multiples of the patch size). Blocks 0..L−2 run under the caller's
    precision; everything after in float32."""
    params = params or ScclipParams()
    p = clip.patch_size
    if images.ndim != 4 or images.shape[-2] % p or images.shape[-1] % p:
        raise S2ClipError(f"SC-CLIP needs images [B, 3, H, W] with H, W multiples of {p}, got {list(images.shape)}")
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    blocks = ScclipBlocks.for_depth(params, clip.num_blocks)
    wanted = set(blocks.used())
    resblocks = clip.visual.transformer.resblocks
    x = clip.embed(images)
    outputs: dict[int, Tensor] = {}
    for i in range(clip.num_blocks - 1):
        x = sdpa_block(resblocks[i], x)
        if i in wanted:
            outputs[i] = x
    with full_precision(images.device):
        return _calibrate(clip, {i: t.float() for i, t in outputs.items()}, blocks, params, grid)


def _calibrate(clip: ClipBackbone, outputs: dict[int, Tensor], blocks: ScclipBlocks, params: ScclipParams,
               grid: tuple[int, int]) -> Tensor:
    """Steps 1–6 of the module docstring on the kept streams (float32)."""
    last = clip.visual.transformer.resblocks[-1]
    stream = outputs[blocks.last_input]
    outliers = torch.stack([outlier_mask(lof_outliers(window[1:], params.n_neighbors, params.contamination), grid)
                            for window in stream])  # [B, h, w]
    patches = repair_anomalies(stream[:, 1:], outliers, grid)
    mid = unit_similarity(repair_anomalies(outputs[blocks.pre][:, 1:], outliers, grid))
    calibrated = calibrated_attention(mid, params.attn_scale)
    x = aggregate(patches, thresholded(mid, params.beta))
    x = calibrated_block(last, x, calibrated) + params.res_cls * stream[:, :1]
    after = thresholded(unit_similarity(outputs[blocks.post][:, 1:]), params.beta)
    x = aggregate(x, after)
    fused = torch.zeros_like(stream)
    for i in blocks.multi:
        fused += outputs[i]
    levels = calibrated_block(last, fused[:, 1:], calibrated) + params.res_cls * fused[:, :1]
    x = x + aggregate(levels, after)
    return clip.project_values(x)


class ScclipHead(FeatureHead):
    """SC-CLIP: `scclip_features`, cosines on the CLIP grid (windows unpadded, as SC-CLIP)."""

    @property
    def params(self) -> ScclipParams:
        return ScclipParams.from_options(self.seg.config.method_options)

    def layers(self) -> list[int]:
        return ScclipBlocks.for_depth(self.params, self.seg.models.clip.num_blocks).used()

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        seg = self.seg
        clip = seg.models.clip
        with timer("clip"), autocast(seg.device, seg.dtype):
            tokens = scclip_features(clip, self._clip_input(windows), self.params)
        with timer("fusion"), full_precision(seg.device):
            grid = (windows.shape[-2] // clip.patch_size, windows.shape[-1] // clip.patch_size)
            cosines = F.normalize(tokens.float(), dim=-1) @ seg.text.T  # [B, h*w, Q]
            return cosines.transpose(1, 2).reshape(windows.shape[0], -1, *grid)


__all__ = [
    "ScclipBlocks", "ScclipHead", "ScclipParams", "aggregate", "calibrated_attention", "calibrated_block",
    "lof_outliers", "lof_scores", "outlier_mask", "repair_anomalies", "scclip_features",
    "thresholded", "unit_similarity",
]
