"""CorrCLIP (``zdk258/CorrCLIP``, ``CorrCLIPv1``): patch correlations limited by class-agnostic masks.

Per window (its ``corrclip_segmentor.py`` ``forward_slide``/``forward_feature`` and the modified
``open_clip/transformer.py`` ``VisionTransformer.forward``), with the window's instance mask (the
image's mask resized to the working image by nearest neighbour, padded with id ``PAD_ID``):

1. Windows are padded (centred, zeros after normalisation) to a multiple of 56, as
   ``compute_padsize(H, W, 56)``; the mask with ``PAD_ID``. The whole-image protocol is one window
   of the whole image (CorrCLIP's slide inference with a crop no smaller than the image).
2. DINO (ViT-B/8) sees the window un-normalised with CLIP's constants and normalised for ImageNet;
   its features are ``q + k`` of the last block's ``qkv`` (patch tokens), L2-normalised.
3. *Mask merging* (`merge_regions`): the mask resized (nearest) to the DINO grid; when it holds more
   than two ids, each region's mean feature (normalised) is clustered with scikit-learn's DBSCAN
   (``metric='precomputed'``, ``eps=0.2``, ``min_samples=1``) on ``max(S) − S`` of their cosines,
   the first (smallest) id excluded; every other region takes id ``PAD_ID + cluster``.
4. *Scope reconstruction* (`scoped_attention`): ``S`` = cosines of the DINO features; an entry is
   kept where both patches lie in one region other than the first, or where either lies in the first
   region (the uncovered pixels) and ``S > mean(S)``; the rest is −inf; ``A = softmax(τ·S)``, τ = 4.
5. CLIP blocks 0…L−2 run on the class token, the patches and one *mask class token* per region of
   the merged mask at the CLIP grid (a copy of the class token input that attends to the class
   token and its region's patches only; the other tokens never attend to it).
6. Last block, no residual/FFN for the first two branches: main = ``out_proj(A · resample(v))`` of
   the last block's input, spatial = the same on the mean of the residual streams after blocks
   ``L−2−S … L−3`` (S = 5 for 12 blocks, 12 for 24, 28 for 32, L − 4 otherwise); semantic = each
   region's mask class token after the full last block, spread over its region. ``ln_post`` on each,
   ``main + 1.0·spatial + 0.5·semantic``, ``proj``; cosines with the class embeddings on the DINO grid,
   bilinearly resized to the padded window and cropped.
7. After classification (prob_thd included), *map correction* (`correct_labels`): each region of
   the image's mask other than the smallest id takes its most common label (ties: the smallest, as
   ``torch.mode``).

Differences from the reference (documented in the methods table): float32 attention arithmetic under
any precision; a DINO-grid row left without any kept entry attends to itself (the reference: NaN).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import S2ClipError
from ..models.clip import ClipBackbone
from ..models.precision import autocast, full_precision
from ..profiling import StageTimer
from .method_features import FeatureHead
from .transforms import clip_to_imagenet
from .windows import Stitcher, centred_padding, sliding_windows

PAD_ID = 10000  # CorrCLIP's padding id for masks (and the base of merged region ids)
PAD_MULTIPLE = 56  # CorrCLIP pads windows to a multiple of 56 (compute_padsize)
TAU = 4.0  # temperature of the scope-reconstructed attention
ALPHA, BETA = 1.0, 0.5  # weights of the spatial and semantic branches
DBSCAN_EPS, DBSCAN_MIN_SAMPLES = 0.2, 1


def spatial_layers(num_blocks: int) -> list[int]:
    """Blocks whose output streams the spatial branch averages: ``L−2−S … L−3``."""
    count = {12: 5, 24: 12, 32: 28}.get(num_blocks, num_blocks - 4)
    return [i for i in range(num_blocks - 1) if num_blocks - 2 - count <= i <= num_blocks - 3]


# ------------------------------------------------------------------------------------ DINO features
class _Captured(Exception):
    """Stops the VFM once the last block's qkv is computed."""


@torch.no_grad()
def dino_qk_features(vfm: nn.Module, images: Tensor) -> Tensor:
    """``q + k`` of the VFM's last block (timm ViT, `models.vfm.TimmVFM`) on ImageNet-normalised
    ``images`` ``[B, 3, H, W]``: ``[B, C, h, w]`` on the patch grid (prefix tokens dropped), not
    normalised. The forward stops at that block's ``qkv`` (the rest is never used)."""
    model = getattr(vfm, "model", None)
    if model is None or not hasattr(model, "blocks"):
        raise S2ClipError("corrclip needs a DINO/DINOv2 VFM (timm ViT) for its q+k features")
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: Tensor) -> None:
        captured.append(output)
        raise _Captured

    handle = model.blocks[-1].attn.qkv.register_forward_hook(hook)
    try:
        vfm.tokens(images)
    except _Captured:
        pass
    finally:
        handle.remove()
    qkv = captured[0]
    b, n, _ = qkv.shape
    q, k, _v = qkv.reshape(b, n, 3, -1).permute(2, 0, 1, 3)
    feats = (q + k)[:, vfm.num_prefix_tokens:]
    h, w = vfm.grid(images.shape[-2], images.shape[-1])
    return feats.transpose(1, 2).reshape(b, -1, h, w)


# ------------------------------------------------------------------------------------ masks
def nearest(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """An integer map ``[H, W]`` resized by nearest neighbour (as CorrCLIP: through float32)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.int()
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].int()


def merge_regions(regions: Tensor, features: Tensor) -> Tensor:
    """CorrCLIP's mask merging on one window: `regions` ``int32 [h, w]`` ids on the DINO grid,
    `features` ``[h*w, C]`` L2-normalised DINO tokens. Returns the merged ids (a new tensor)."""
    from sklearn.cluster import DBSCAN

    merged = regions.clone()
    values = torch.unique(regions)
    if values.shape[0] <= 2:
        return merged
    region_masks = [v == regions for v in values]
    grid_feats = features.reshape(*regions.shape, -1)
    inst = torch.stack([grid_feats[m].mean(dim=0) for m in region_masks])
    inst = F.normalize(inst, dim=1)[1:]
    sim = torch.einsum("mc,nc->mn", inst, inst)
    dbscan = DBSCAN(metric="precomputed", eps=DBSCAN_EPS, min_samples=DBSCAN_MIN_SAMPLES)
    cluster = dbscan.fit_predict((sim.max() - sim).cpu().numpy())
    for idx, c in enumerate(cluster.tolist(), start=1):
        if c != -1:
            merged[region_masks[idx]] = c + PAD_ID
    return merged


def scoped_attention(features: Tensor, regions: Tensor, tau: float = TAU) -> Tensor:
    """CorrCLIP's scope-reconstructed attention ``[B, M, M]`` from VFM features ``[B, C, h, w]``
    (normalised here) and region ids ``[B, h, w]`` (the first, smallest id of each window = the
    uncovered pixels). float32."""
    b = features.shape[0]
    f = F.normalize(features.float().flatten(2).transpose(1, 2).contiguous(), dim=-1)  # [B, M, C]
    sim = torch.einsum("bmc,bnc->bmn", f, f)
    out = []
    for i in range(b):
        s = sim[i]
        ids = regions[i].reshape(-1)
        first = torch.unique(ids)[0]
        same = (ids[:, None] == ids[None, :]) & (ids != first)[:, None]
        uncovered = ids == first
        keep = same | ((uncovered[:, None] | uncovered[None, :]) & (s > s.mean()))
        empty = ~keep.any(dim=-1)
        if bool(empty.any()):  # the reference would give NaN here: attend to itself instead
            keep = keep | (torch.eye(keep.shape[0], dtype=torch.bool, device=keep.device) & empty[:, None])
        out.append(torch.softmax(s.masked_fill(~keep, float("-inf")) * tau, dim=-1))
    return torch.stack(out)


def correct_labels(labels: Tensor, instance_mask: Tensor) -> Tensor:
    """CorrCLIP's map correction: every region of `instance_mask` (``[H, W]`` ids) except the one
    of its smallest id takes the most common label of `labels` ``[H, W]`` inside it (ties: the
    smallest label, as ``torch.mode``). Returns new labels."""
    if tuple(instance_mask.shape) != tuple(labels.shape):
        instance_mask = nearest(instance_mask.to(labels.device), tuple(labels.shape))
    _, region = torch.unique(instance_mask.to(labels.device), return_inverse=True)
    n_regions = int(region.max()) + 1 if region.numel() else 0
    if n_regions <= 1:
        return labels.clone()
    n_labels = int(labels.max()) + 1
    counts = torch.bincount((region * n_labels + labels).reshape(-1), minlength=n_regions * n_labels)
    mode = counts.view(n_regions, n_labels).argmax(dim=1)
    return torch.where(region == 0, labels, mode[region])


# ------------------------------------------------------------------------------------ CLIP side
def masked_block(block: nn.Module, x: Tensor, allowed: Tensor) -> Tensor:
    """open_clip's residual block on ``x`` ``[B, T, D]`` with a boolean attention mask ``[T, T]``
    (True = may attend), through ``F.scaled_dot_product_attention``."""
    attn = block.attn
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(1, 2).reshape(b, n, d)
    x = x + block.ls_1(attn.out_proj(y))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def semantic_mask(token_regions: Tensor) -> tuple[Tensor, Tensor]:
    """(region masks ``[R, h*w]`` of the CLIP-grid ids, allowed-attention ``[R+1+N, R+1+N]``): the R
    mask class tokens come first and attend to the class token and their region's patches; the class
    token and patches attend to each other only."""
    ids = token_regions.reshape(-1)
    values = torch.unique(ids)
    regions = values[:, None] == ids[None, :]  # [R, N]
    r, n = regions.shape
    allowed = torch.zeros(r + 1 + n, r + 1 + n, dtype=torch.bool, device=ids.device)
    allowed[r:, r:] = True
    allowed[:r, r] = True
    allowed[:r, r + 1:] = regions
    return regions, allowed


def corrclip_window_tokens(clip: ClipBackbone, window: Tensor, attention: Tensor, regions: Tensor,
                           feat_grid: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Patch embeddings ``[M, E]`` (float32, on the DINO grid) of one normalised window ``[1, 3, H, W]``
    from the scoped attention ``[1, M, M]`` and the merged region ids on the DINO grid ``[h', w']``."""
    device = window.device
    p = clip.patch_size
    grid = (window.shape[-2] // p, window.shape[-1] // p)
    blocks = clip.visual.transformer.resblocks
    token_ids = nearest(regions, grid)
    region_masks, allowed = semantic_mask(token_ids)
    n_regions = region_masks.shape[0]
    keep = set(spatial_layers(clip.num_blocks))
    with autocast(device, dtype):
        x = clip.embed(window)  # [1, 1+N, D]
        x = torch.cat([x[:, :1].expand(-1, n_regions, -1), x], dim=1)
        spatial: list[Tensor] = []
        for i, block in enumerate(list(blocks)[:-1]):
            x = masked_block(block, x, allowed)
            if i in keep:
                spatial.append(x[:, n_regions:])
        last = blocks[-1]
        semantic = masked_block(last, x, allowed)[0, :n_regions]  # [R, D]
        streams = torch.cat([x[:, n_regions:], torch.stack(spatial).mean(0)], dim=0)  # [2, 1+N, D]
        d = streams.shape[-1]
        attn = last.attn
        v = F.linear(last.ln_1(streams), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
    with full_precision(device):
        v = v.float()[:, 1:].transpose(1, 2).reshape(2, d, *grid)
        v = F.interpolate(v, size=feat_grid, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        mixed = torch.bmm(attention.float().expand(2, -1, -1), v)  # [2, M, D]
        mixed = F.linear(mixed, attn.out_proj.weight.float(), attn.out_proj.bias.float())
        spread = F.interpolate(region_masks.view(n_regions, 1, *grid).float(), size=feat_grid,
                               mode="nearest").flatten(1)  # [R, M]
        sem = spread.T @ semantic.float()  # [M, D]
        visual = clip.visual
        branches = F.layer_norm(torch.cat([mixed, sem[None]]), visual.ln_post.normalized_shape,
                                visual.ln_post.weight.float(), visual.ln_post.bias.float(), visual.ln_post.eps)
        combined = branches[0] + branches[1] * ALPHA + branches[2] * BETA
        return combined @ visual.proj.float()


# ------------------------------------------------------------------------------------ the head
class CorrClipHead(FeatureHead):
    """CorrCLIP on the whole prepared image: its own windows (padded to 56), one at a time, each with
    its crop of the instance mask; the map correction after classification (`correct_labels`)."""

    def layers(self) -> list[int]:
        return spatial_layers(self.seg.models.clip.num_blocks) + [self.seg.models.clip.num_blocks - 2]

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        raise S2ClipError("corrclip works on the whole image with its instance mask (image_logits)")

    def image_logits(self, x: Tensor, image: np.ndarray, timer: StageTimer) -> Tensor:
        seg = self.seg
        cfg = seg.config
        h, w = x.shape[-2:]
        with timer("instance_masks"):
            full = torch.from_numpy(seg.instance_mask(image)).to(seg.device)
            mask = nearest(full, (h, w))
        boxes = [(0, 0, h, w)] if cfg.whole_image else sliding_windows(h, w, cfg.crop, cfg.stride)
        stitcher = Stitcher(len(seg.queries.names), h, w, device=seg.device)
        for y1, x1, y2, x2 in boxes:
            top, bottom, left, right = centred_padding(y2 - y1, x2 - x1, PAD_MULTIPLE)
            crop = F.pad(x[None, :, y1:y2, x1:x2], (left, right, top, bottom))
            crop_mask = F.pad(mask[None, y1:y2, x1:x2], (left, right, top, bottom), value=PAD_ID)[0]
            cos = self._window(crop, crop_mask, timer)  # [Q, h', w']
            with timer("stitch"):
                up = F.interpolate(cos[None], size=crop.shape[-2:], mode="bilinear", align_corners=False)[0]
                stitcher.add((y1, x1, y2, x2), up[:, top:top + y2 - y1, left:left + x2 - x1])
        with timer("stitch"):
            return stitcher.result()

    def _window(self, crop: Tensor, crop_mask: Tensor, timer: StageTimer) -> Tensor:
        seg = self.seg
        vfm, clip = seg.models.vfm, seg.models.clip
        with timer("vfm"), autocast(seg.device, seg.dtype):
            qk = dino_qk_features(vfm, clip_to_imagenet(crop))  # [1, C, h', w']
        feat_grid = (int(qk.shape[-2]), int(qk.shape[-1]))
        with timer("fusion"), full_precision(seg.device):
            feats = F.normalize(qk.float().flatten(2).transpose(1, 2).contiguous(), dim=-1)[0]  # [M, C]
            regions = merge_regions(nearest(crop_mask, feat_grid), feats)
            attention = scoped_attention(qk.float(), regions[None])
        with timer("clip"):
            emb = corrclip_window_tokens(clip, crop, attention, regions, feat_grid, seg.dtype)
        with timer("fusion"), full_precision(seg.device):
            cos = F.normalize(emb, dim=-1) @ seg.text.T  # [M, Q]
            return cos.T.reshape(-1, *feat_grid)

    def correct_labels(self, image: np.ndarray, labels: Tensor) -> Tensor:
        mask = torch.from_numpy(self.seg.instance_mask(image)).to(labels.device)
        return correct_labels(labels, mask)


__all__ = [
    "ALPHA", "BETA", "PAD_ID", "PAD_MULTIPLE", "TAU", "CorrClipHead", "corrclip_window_tokens", "correct_labels",
    "dino_qk_features", "masked_block", "merge_regions", "nearest", "scoped_attention", "semantic_mask",
    "spatial_layers",
]
