"""Trident's splice-then-segment guidance: SAM's last-block attention over the spliced CLIP map.

Trident (``YuHengsss/Trident``, ``open_clip/transformer.py`` ``guidance_attn``/``get_sam_sim``,
``trident.py`` ``get_sam_feat``) stitches the per-window CLIP outputs of its last block into one
full-image token map, then mixes the tokens once more with an attention matrix read from SAM:

1. SAM's image encoder runs on the image resized to long side 1024 and padded to 1024x1024
   (``SamPredictor.set_image``); its *valid* feature area is ``input_size // 16`` (≤ 64x64).
2. The last (global) block's per-head attention (with relative positions) and values ``v`` are
   cropped to the valid area (queries and keys; no renormalisation yet).
3. Per query ``m``: threshold ``t_m = cos_fac · mean over heads and valid keys of cos(v_hm, v_hn)``;
   with ``refine_neg_cos=False`` a negative ``t_m`` becomes 0.6; then ``t_m`` is capped at 0.9.
   An entry ``(h, m, n)`` is kept where ``cos(v_hm, v_hn) > t_m`` (strictly), else zeroed. The
   mean is taken in Trident's order (cosine matrix, mean over heads, then over keys), so the float32
   threshold is Trident's and no entry on the cut flips (`_mean_value_cosine`).
4. Mean over heads, rows renormalised to sum to 1: the guidance ``A`` ``[M, M]``.
5. The spliced CLIP map ``[D, h, w]`` (out_proj already applied, before ``ln_post``) is resized
   bilinearly (align_corners=False) to the valid grid and mixed: ``out[:, m] = Σ_n A[m, n]·x[:, n]``.
   The caller then applies ``ln_post`` and ``proj``.

Everything from step 2 on is float32 with autocast off. Departure from Trident (documented): a row
with no kept entry (impossible unless a value vector is all zeros, since ``cos(v_hm, v_hm) = 1 > t_m``)
keeps its own token instead of becoming NaN.

Cityscapes (``halves=True`` in `guide_token_map`): Trident runs SAM separately on the left and
right halves of the image (split at ``W // 2``), splits the spliced CLIP map at ``w // 2`` likewise,
guides each half with its own SAM attention and concatenates the two results along the width.
"""

from __future__ import annotations

from collections.abc import Iterable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from ..models.sam_attention import block_qkv, iter_head_attention, last_block_input, last_global_block

# Trident's fixed constants in `get_sam_sim`.
NEGATIVE_THRESHOLD_REPLACEMENT = 0.6
MAX_THRESHOLD = 0.9


def round_up_to_multiple(image: np.ndarray, multiple: int = 16) -> np.ndarray:
    """Trident's SAM-branch image: `image` (H x W x 3 uint8) resized (cv2, bilinear) so both
    sides are the next multiples of `multiple` (unchanged if they already are)."""
    h, w = image.shape[:2]
    new_h, new_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if (new_h, new_w) == (h, w):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def encoder_patch_size(encoder: ImageEncoderViT) -> int:
    """Pixels per SAM feature cell (16 for every released SAM)."""
    stride = encoder.patch_embed.proj.stride
    return int(stride[0] if isinstance(stride, tuple) else stride)


def sam_input_from_image(sam: Sam, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
    """(encoder input ``[1, 3, S, S]`` float, valid feature grid ``(gh, gw)``) for an H x W x 3
    uint8 RGB image, exactly as ``SamPredictor.set_image`` prepares it: segment-anything's
    ``ResizeLongestSide`` to the encoder size S (1024), then ``Sam.preprocess`` (normalise, pad).
    The valid grid is ``resized_size // patch`` (Trident's ``input_size // 16``)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    encoder = sam.image_encoder
    resized = ResizeLongestSide(encoder.img_size).apply_image(image)
    tensor = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous()[None]
    patch = encoder_patch_size(encoder)
    return sam.preprocess(tensor), (resized.shape[0] // patch, resized.shape[1] // patch)


def _check_valid(valid_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    gh, gw = int(valid_hw[0]), int(valid_hw[1])
    if not (1 <= gh <= grid[0] and 1 <= gw <= grid[1]):
        raise ValueError(f"valid area {valid_hw} does not fit the {grid[0]}x{grid[1]} SAM grid")
    return gh, gw


def _crop_square(attn: Tensor, grid: tuple[int, int], valid: tuple[int, int]) -> Tensor:
    """``[N, N]`` attention on the full grid → ``[M, M]`` on the top-left ``valid`` area."""
    gh, gw = valid
    return attn.reshape(*grid, *grid)[:gh, :gw, :gh, :gw].reshape(gh * gw, gh * gw)


THRESHOLD_ROWS = 256  # query rows per chunk of the threshold's cosine matrix (memory: heads x 256 x M)


def _mean_value_cosine(v: Tensor) -> Tensor:
    """``[M]``: per query m, the mean over heads and keys of ``cos(v_hm, v_hn)`` for unit values
    ``v`` ``[heads, M, d]``, computed as Trident's ``get_sam_sim`` does — the full cosine matrix
    (``einsum``), its mean over heads, then over keys — a chunk of query rows at a time. The order
    matters: the result is a hard threshold on those very cosines, so another summation order (the
    cheaper ``mean_h v̂_hm · mean_n v̂_hn``) moves it by rounding and flips the entries that sit on
    it. Row chunks give the same float32 values as Trident's single einsum."""
    rows = []
    for start in range(0, v.shape[1], THRESHOLD_ROWS):
        sim = torch.einsum("hmc,hnc->hmn", v[:, start:start + THRESHOLD_ROWS], v)  # [heads, r, M]
        rows.append(sim.mean(dim=0).mean(dim=-1))
    return torch.cat(rows)


def guidance_from_attention(
    head_attention: Iterable[Tensor] | Tensor,
    values: Tensor,
    valid_hw: tuple[int, int],
    cos_fac: float,
    refine_neg_cos: bool = True,
) -> Tensor:
    """Trident's ``get_sam_sim`` for one image: the guidance ``[M, M]`` (float32, rows sum to 1,
    M = gh·gw) from SAM's per-head attention on the full ``H x W`` grid (``[heads, H*W, H*W]``,
    or an iterable of ``[H*W, H*W]`` maps, one per head) and per-head values ``[heads, H, W, d]``.
    Steps 2–4 of the module docstring."""
    heads, grid_h, grid_w, _ = values.shape
    grid = (grid_h, grid_w)
    gh, gw = _check_valid(valid_hw, grid)
    m = gh * gw
    with torch.autocast(device_type=values.device.type, enabled=False):
        v = F.normalize(values[:, :gh, :gw].float().reshape(heads, m, -1), dim=-1)  # [heads, M, d]
        thresh = cos_fac * _mean_value_cosine(v)
        if not refine_neg_cos:
            thresh = torch.where(thresh < 0.0, torch.full_like(thresh, NEGATIVE_THRESHOLD_REPLACEMENT), thresh)
        thresh = thresh.clamp(max=MAX_THRESHOLD)[:, None]
        kept = torch.zeros(m, m, dtype=torch.float32, device=values.device)
        seen = 0
        for head, attn in enumerate(head_attention):
            if seen >= heads:
                raise ValueError(f"more attention maps than the {heads} heads of the values")
            sim = v[head] @ v[head].T  # [M, M]
            cropped = _crop_square(attn.float(), grid, (gh, gw))
            kept += torch.where(sim > thresh, cropped, torch.zeros_like(cropped))
            seen += 1
        if seen != heads:
            raise ValueError(f"{seen} attention maps for {heads} heads of values")
        kept /= heads
        totals = kept.sum(dim=-1, keepdim=True)
        empty = totals[:, 0] <= 0
        if bool(empty.any()):  # Trident would divide by zero here; keep the token itself instead.
            kept[empty] = torch.eye(m, device=kept.device)[empty]
            totals = kept.sum(dim=-1, keepdim=True)
        return kept / totals


@torch.no_grad()
def sam_guidance_attention(
    sam_image_encoder: ImageEncoderViT,
    sam_input: Tensor,
    valid_hw: tuple[int, int],
    cos_fac: float,
    refine_neg_cos: bool = True,
) -> Tensor:
    """The guidance attention ``[M, M]`` (float32, rows sum to 1; M = gh·gw, row-major over the
    valid grid) for one SAM input ``[1, 3, S, S]`` (see `sam_input_from_image`).

    Runs the encoder up to its last block (under whatever autocast the caller set), then computes
    that block's attention from its input in float32 (`models.sam_attention`)."""
    if sam_input.ndim != 4 or sam_input.shape[0] != 1:
        raise ValueError(f"expected one SAM input [1, 3, S, S], got {tuple(sam_input.shape)}")
    block = last_global_block(sam_image_encoder)
    qkv = block_qkv(block, last_block_input(sam_image_encoder, sam_input))
    return guidance_from_attention(
        iter_head_attention(block, qkv), qkv.values_grid(), valid_hw, cos_fac, refine_neg_cos
    )


def apply_guidance(attn: Tensor, token_map: Tensor, valid_hw: tuple[int, int]) -> Tensor:
    """Mix the spliced CLIP token map ``[D, h, w]`` with the guidance ``attn`` ``[M, M]``:
    bilinear resize (align_corners=False) to ``valid_hw``, then ``out[:, m] = Σ_n attn[m, n]·x[:, n]``.
    Returns ``[D, gh, gw]`` float32 (before ``ln_post``/``proj``)."""
    gh, gw = int(valid_hw[0]), int(valid_hw[1])
    if attn.shape != (gh * gw, gh * gw):
        raise ValueError(f"attention {tuple(attn.shape)} does not match the valid grid {gh}x{gw}")
    if token_map.ndim != 3:
        raise ValueError(f"expected a token map [D, h, w], got {tuple(token_map.shape)}")
    with torch.autocast(device_type=token_map.device.type, enabled=False):
        x = token_map.float()
        if tuple(x.shape[-2:]) != (gh, gw):
            x = F.interpolate(x[None], size=(gh, gw), mode="bilinear", align_corners=False)[0]
        mixed = x.reshape(x.shape[0], -1) @ attn.float().T  # [D, M]
    return mixed.reshape(-1, gh, gw)


def _guide_one(sam: Sam, image: np.ndarray, token_map: Tensor, cos_fac: float, refine_neg_cos: bool) -> Tensor:
    sam_input, valid = sam_input_from_image(sam, image)
    attn = sam_guidance_attention(sam.image_encoder, sam_input, valid, cos_fac, refine_neg_cos)
    return apply_guidance(attn, token_map, valid)


@torch.no_grad()
def guide_token_map(
    sam: Sam,
    image: np.ndarray,
    token_map: Tensor,
    *,
    cos_fac: float,
    refine_neg_cos: bool = True,
    halves: bool = False,
) -> Tensor:
    """Trident's splice-then-segment step for one image: the spliced CLIP map ``[D, h, w]`` guided
    by SAM's attention on `image` (H x W x 3 uint8 RGB, Trident's ×16-rounded image, see
    `round_up_to_multiple`). Returns ``[D, gh, gw]`` on SAM's valid grid, float32.

    ``halves=True`` (Trident's Cityscapes path): the image is split at ``W // 2`` and the map at
    ``w // 2``; each half is guided by SAM run on that half alone; the two results are concatenated
    along the width (``[D, gh, gw_left + gw_right]``). If the halves' valid heights differ (only for
    an odd-width image), the right result is resized bilinearly to the left's height."""
    if not halves:
        return _guide_one(sam, image, token_map, cos_fac, refine_neg_cos)
    img_half, map_half = image.shape[1] // 2, token_map.shape[-1] // 2
    if img_half < 1 or map_half < 1:
        raise ValueError(f"image width {image.shape[1]} / map width {token_map.shape[-1]} too small to halve")
    left = _guide_one(sam, np.ascontiguousarray(image[:, :img_half]), token_map[..., :map_half],
                      cos_fac, refine_neg_cos)
    right = _guide_one(sam, np.ascontiguousarray(image[:, img_half:]), token_map[..., map_half:],
                       cos_fac, refine_neg_cos)
    if right.shape[-2] != left.shape[-2]:
        size = (left.shape[-2], right.shape[-1])
        right = F.interpolate(right[None], size=size, mode="bilinear", align_corners=False)[0]
    return torch.cat([left, right], dim=-1)
