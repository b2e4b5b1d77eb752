"""ResCLIP (``yvhangyang/ResCLIP``, ``clip/model.py`` ``VisionTransformer``): residual attention
over NACLIP's last block, and its head.

Its default configuration (``test_all.sh wo_resi resclip 5``, the README's main results) is the
plug-in over NACLIP: arch ``wo_resi`` (the last block without residual and FFN) and attention
``resclip`` (k-k plus NACLIP's Gaussian over patch positions, σ = 5). On a window:

1. **RCS.** Blocks 0..L−2 run unchanged; the mean of the per-head q-k attention maps of blocks 5–8
   (``rcs``, class token included) is kept.
2. **First pass.** ``A₁ = τ_r((1 − λ_r)·softmax(s·k·kᵀ + G) + λ_r·rcs)`` (``attn_rcs_weights``
   = (τ_r, λ_r); rows sum to τ_r), ``out_proj(A₁·v)``, ``ln_post``/``proj``; the patch cosines with
   every class name, stretched (bilinear) to the window, refined by PAMR (10 iterations, dilations
   8/16) with the window's normalised pixels, softmax over the names × the logit scale.
3. **SFR.** Per pixel the top name (name 0 where its probability is under ``temp_thd``); per patch
   the most frequent of its pixels' names (``torch.mode``). ``M[i, j] = 1`` where patches i and j
   carry the same name; with ``delete_same_entity``, a pair whose straight path is not uniform
   (ResCLIP's ``check_path``, see `entity_paths`) is decayed by ``exp(−steps / max steps)``; each row
   is smoothed by a 1-D Gaussian over the *flattened* patch index (kernel ``min(N, 6σ + 1)`` taps,
   made odd), clamped at 0 and normalised; the class token's row and column are 0.
4. **Last block.** ``A = τ_r((1 − λ_r)·softmax(τ_s((1 − λ_s)·s·k·kᵀ + λ_s·M / max M) + G) + λ_r·rcs)``
   (``attn_sfr_weights`` = (τ_s, λ_s)), ``out_proj(A·v)``, ``ln_post``/``proj``.

Differences from the reference, all numerical or device plumbing: it runs on any device (ResCLIP
calls ``.cuda()`` in the SFR and builds the PAMR on ``'cuda'``); ``M / max M`` stays float32
(ResCLIP casts it to float16 — ``sfr_half`` reproduces that cast); the first pass's PAMR always
runs (ResCLIP wraps it in ``try/except RuntimeError``, so an out-of-memory error would skip it
silently). Its ``use_rcs=use_rcs,`` stores a tuple, so RCS and SFR are always on, as here.
Everything after the early blocks is float32 with autocast disabled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import S2ClipError
from ..models.clip import ClipBackbone, sdpa_block
from ..models.precision import autocast, full_precision
from ..profiling import StageTimer
from ..refine.pamr import pamr
from .attention import gaussian_addition, head_attention
from .method_features import FeatureHead, floor_to_multiple
from .reference_blocks import reference_range

# Path points checked at once (bounds the [starts, h, w, steps] index tensor).
PATH_CHUNK_POINTS = 2**22


@dataclass(frozen=True)
class ResclipParams:
    """ResCLIP's knobs, named as its configs spell them. Defaults: its Context59 config."""

    temp_thd: float = 0.25  # AdaThr of the first pass's labels
    attn_rcs_weights: tuple[float, float] = (2.0, 0.4)  # (τ, λ) of RCS
    attn_sfr_weights: tuple[float, float] = (1.8, 0.7)  # (τ, λ) of SFR
    delete_same_entity: bool = True
    rcs_blocks: tuple[int, int] = (5, 9)  # blocks 5..8 of a 12-block ViT (end exclusive)
    sfr_pamr_steps: int = 10
    sfr_pamr_dilations: tuple[int, ...] = (8, 16)
    sfr_half: bool = False  # round λ_s·M / max M to float16, as ResCLIP's cast does

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ResclipParams:
        """The defaults with the method options that name a field (lists become tuples)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if k in names})


# ------------------------------------------------------------------------------ attentions
def rcs_attention(maps: Sequence[Tensor]) -> Tensor:
    """RCS: the mean of per-head attention maps ``[B, heads, N, N]`` of the chosen blocks."""
    return torch.stack(list(maps)).mean(dim=0)


def residual_mix(attention: Tensor, other: Tensor, weights: tuple[float, float]) -> Tensor:
    """``τ·((1 − λ)·attention + λ·other)`` with ``weights`` = (τ, λ)."""
    tau, lam = weights
    return tau * ((1 - lam) * attention + lam * other)


def sfr_logits(key_logits: Tensor, sfr: Tensor, weights: tuple[float, float], *, half: bool = False) -> Tensor:
    """``τ·((1 − λ)·s·k·kᵀ + λ·M / max M)`` per head: ``key_logits`` ``[B, heads, N, N]``, ``sfr``
    ``[B, N, N]`` (max per window). With `half`, ``M / max M`` is cast to float16 and ``λ·M / max M``
    computed in float16, as ResCLIP's ``attn_sfr.to(torch.float16)``."""
    tau, lam = weights
    scaled = sfr / sfr.amax(dim=(-2, -1), keepdim=True)
    term = lam * (scaled.to(torch.float16) if half else scaled)
    return tau * ((1 - lam) * key_logits + term.unsqueeze(1))


# ------------------------------------------------------------------------------ SFR
def patch_labels(probs: Tensor, temp_thd: float, patch: int, grid: tuple[int, int]) -> Tensor:
    """``[B, h, w]`` per-patch labels from per-pixel name probabilities ``[B, Q, H, W]``: the top
    name, 0 where its probability is under `temp_thd`, then each patch's most frequent label over its
    ``patch × patch`` pixels (``torch.mode``; pixels beyond the grid ignored)."""
    pred = probs.argmax(dim=1)
    pred = torch.where(probs.max(dim=1)[0] < temp_thd, torch.zeros_like(pred), pred)
    h, w = grid
    blocks = pred[:, : h * patch, : w * patch].unfold(1, patch, patch).unfold(2, patch, patch)
    return torch.mode(blocks.reshape(pred.shape[0], h, w, -1), dim=-1)[0]


def entity_paths(labels: Tensor) -> Tensor:
    """ResCLIP's ``check_path`` on per-patch labels ``[h, w]``: ``[N, N]`` bool, True where patch j
    is reached from patch i along a straight path that keeps i's label.

    Points ``round(i·(1 − t) + j·t)`` at ``t = k / S`` (S = the largest Chebyshev distance of any
    pair, ``torch.linspace``) for k = 0..steps(i, j) — so a pair closer than S is checked only on
    the first steps/S of its segment, as ResCLIP. Each axis's rounded coordinates depend only on its
    start, end and k, so they are computed once per axis (the same float32 arithmetic as ResCLIP's,
    element by element) and the pairs are checked in chunks of start patches."""
    h, w = labels.shape
    n = h * w
    max_steps = max(h, w) - 1  # the Chebyshev distance between opposite corners
    t = torch.linspace(0, 1, steps=max_steps + 1, device=labels.device)

    def axis(size: int) -> Tensor:  # [start, end, k] rounded coordinates along one axis
        ends = torch.arange(size, device=labels.device)
        return (ends[:, None, None] * (1 - t) + ends[None, :, None] * t).round().long()

    rows, cols = axis(h), axis(w)
    flat = labels.reshape(-1)
    index = torch.arange(n, device=labels.device)
    start_r, start_c = torch.div(index, w, rounding_mode="floor"), index % w
    k = torch.arange(max_steps + 1, device=labels.device)
    per_chunk = max(1, PATH_CHUNK_POINTS // max(1, n * (max_steps + 1)))
    out = []
    for first in range(0, n, per_chunk):
        r, c = start_r[first : first + per_chunk], start_c[first : first + per_chunk]
        points = rows[r][:, :, None, :] * w + cols[c][:, None, :, :]  # [P, h, w, S+1] flat path indices
        same = flat[points] == flat[first : first + per_chunk].view(-1, 1, 1, 1)
        steps = torch.maximum((torch.arange(h, device=r.device) - r[:, None]).abs()[:, :, None],
                              (torch.arange(w, device=c.device) - c[:, None]).abs()[:, None, :])  # [P, h, w]
        out.append((same | (k > steps.unsqueeze(-1))).all(dim=-1).reshape(-1, n))
    return torch.cat(out)


def sfr_matrix(labels: Tensor, sigma: float, *, delete_same_entity: bool = True) -> Tensor:
    """ResCLIP's ``generate_attention_sfr`` for per-patch labels ``[h, w]``: ``[N + 1, N + 1]``
    float32, class token first (its row and column 0)."""
    h, w = labels.shape
    n = h * w
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    same.diagonal().fill_(1)
    if delete_same_entity and n > 1:
        index = torch.arange(n, device=labels.device)
        coords = torch.stack((torch.div(index, w, rounding_mode="floor"), index % w), dim=-1)
        steps = (coords[:, None] - coords[None]).abs().max(dim=-1)[0]  # [N, N] Chebyshev distances
        max_steps = steps.max().item()
        same = torch.where(entity_paths(labels), same, same * torch.exp(-steps / max_steps))
    size = min(n, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device) - size // 2
    gauss = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = gauss / gauss.sum()
    blurred = F.relu(F.conv1d(same.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1))
    normalized = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return F.pad(normalized, (1, 0, 1, 0))


# ------------------------------------------------------------------------------ features
@dataclass
class ResclipEarly:
    """Blocks 0..L−2 on a batch: the last block's input and the RCS attention."""

    last_input: Tensor  # [B, 1 + h*w, D]
    rcs: Tensor  # [B, heads, N, N] float32
    grid: tuple[int, int]


def early_pass(clip: ClipBackbone, images: Tensor, rcs_blocks: Sequence[int]) -> ResclipEarly:
    """Run blocks 0..L−2 on CLIP-normalised ``images`` (multiples of the patch size), keeping the
    q-k attention of `rcs_blocks`."""
    p = clip.patch_size
    if images.ndim != 4 or images.shape[-2] % p or images.shape[-1] % p:
        raise S2ClipError(f"ResCLIP needs images [B, 3, H, W] with H, W multiples of {p}, got {list(images.shape)}")
    wanted = set(rcs_blocks)
    if not wanted or not all(0 <= i <= clip.num_blocks - 2 for i in wanted):
        raise S2ClipError(f"ResCLIP's RCS blocks {sorted(wanted)} do not fit a CLIP with {clip.num_blocks} blocks")
    x = clip.embed(images)
    maps = []
    for i, block in enumerate(list(clip.visual.transformer.resblocks)[:-1]):
        if i in wanted:
            maps.append(head_attention(block.ln_1(x), block.attn))
        x = sdpa_block(block, x)
    return ResclipEarly(x, rcs_attention(maps), (images.shape[-2] // p, images.shape[-1] // p))


def _keys_values(block: nn.Module, stream: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head ``k, v`` ``[B, heads, N, head_dim]`` of the last `block` on ``stream`` ``[B, N, D]``."""
    attn: nn.MultiheadAttention = block.attn
    b, n, d = stream.shape
    _, k, v = F.linear(block.ln_1(stream), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    heads = attn.num_heads
    return (k.reshape(b, n, heads, d // heads).transpose(1, 2), v.reshape(b, n, heads, d // heads).transpose(1, 2))


def _embed(clip: ClipBackbone, block: nn.Module, attention: Tensor, v: Tensor) -> Tensor:
    """``ln_post(out_proj(A·v)) @ proj`` on the patch tokens: ``[B, h*w, E]``."""
    b, heads, n, hd = v.shape
    mixed = torch.matmul(attention, v).transpose(1, 2).reshape(b, n, heads * hd)
    return clip.project_values(block.attn.out_proj(mixed))[:, 1:]


def first_pass_probs(tokens: Tensor, text: Tensor, windows: Tensor, grid: tuple[int, int], *, logit_scale: float,
                     params: ResclipParams) -> Tensor:
    """The first pass's name probabilities ``[B, Q, H, W]`` at the windows' size: cosines of the
    patch embeddings ``tokens`` ``[B, h*w, E]`` with ``text`` ``[Q, E]``, stretched to the windows
    ``[B, 3, H, W]`` (normalised pixels), PAMR with their pixels, softmax × `logit_scale`."""
    b = tokens.shape[0]
    cosines = (tokens / tokens.norm(dim=-1, keepdim=True)) @ text.T  # [B, h*w, Q]
    maps = cosines.permute(0, 2, 1).reshape(b, -1, *grid)
    maps = F.interpolate(maps, size=windows.shape[-2:], mode="bilinear", align_corners=False)
    maps = pamr(windows.float(), maps, iterations=params.sfr_pamr_steps, dilations=params.sfr_pamr_dilations)
    return torch.softmax(maps * logit_scale, dim=1)


@dataclass
class _LastBlockInputs:
    """What both passes of the last block share: its values, ``s·k·kᵀ`` and NACLIP's Gaussian."""

    block: nn.Module
    values: Tensor  # [B, heads, N, head_dim]
    key_logits: Tensor  # [B, heads, N, N]
    gauss: Tensor  # [N, N]


def _last_block_inputs(clip: ClipBackbone, early: ResclipEarly, sigma: float) -> _LastBlockInputs:
    block = clip.visual.transformer.resblocks[-1]
    k, v = _keys_values(block, early.last_input.float())
    key_logits = torch.matmul(k, k.transpose(-1, -2)) * (k.shape[-1] ** -0.5)
    return _LastBlockInputs(block, v, key_logits, gaussian_addition(early.grid, sigma, device=v.device))


def _first_pass_labels(clip: ClipBackbone, early: ResclipEarly, inputs: _LastBlockInputs, windows: Tensor,
                       text: Tensor, logit_scale: float, params: ResclipParams) -> Tensor:
    first = residual_mix(torch.softmax(inputs.key_logits + inputs.gauss, dim=-1), early.rcs, params.attn_rcs_weights)
    probs = first_pass_probs(_embed(clip, inputs.block, first, inputs.values), text.float(), windows, early.grid,
                             logit_scale=logit_scale, params=params)
    return patch_labels(probs, params.temp_thd, clip.patch_size, early.grid)


def first_pass_labels(clip: ClipBackbone, early: ResclipEarly, windows: Tensor, text: Tensor, *, logit_scale: float,
                      sigma: float, params: ResclipParams) -> Tensor:
    """Steps 2–3's per-patch labels ``[B, h, w]`` (name indices) that the SFR matrix is built from."""
    inputs = _last_block_inputs(clip, early, sigma)
    return _first_pass_labels(clip, early, inputs, windows, text, logit_scale, params)


def last_block(clip: ClipBackbone, early: ResclipEarly, windows: Tensor, text: Tensor, *, logit_scale: float,
               sigma: float, params: ResclipParams) -> Tensor:
    """Steps 2–4 of the module docstring (float32): ResCLIP's patch embeddings ``[B, h*w, E]``.
    ``windows``: the normalised windows at their own size (the remainder beyond the patch grid
    included, as ResCLIP's first pass stretches its logits over the whole window)."""
    inputs = _last_block_inputs(clip, early, sigma)
    labels = _first_pass_labels(clip, early, inputs, windows, text, logit_scale, params)
    sfr = torch.stack([sfr_matrix(window, sigma, delete_same_entity=params.delete_same_entity) for window in labels])
    logits = sfr_logits(inputs.key_logits, sfr, params.attn_sfr_weights, half=params.sfr_half) + inputs.gauss
    final = residual_mix(torch.softmax(logits, dim=-1), early.rcs, params.attn_rcs_weights)
    return _embed(clip, inputs.block, final, inputs.values)


def resclip_features(clip: ClipBackbone, windows: Tensor, text: Tensor, *, logit_scale: float, sigma: float = 5.0,
                     params: ResclipParams | None = None) -> Tensor:
    """ResCLIP's dense patch embeddings ``[B, h*w, E]`` (not normalised) of normalised windows
    ``[B, 3, H, W]`` (a remainder beyond the patch grid is dropped by the patch convolution and
    kept for the first pass's PAMR), given the name embeddings ``text`` ``[Q, E]``."""
    params = params or ResclipParams()
    rcs = reference_range(*params.rcs_blocks, clip.num_blocks)
    early = early_pass(clip, floor_to_multiple(windows, clip.patch_size), rcs)
    with full_precision(windows.device):
        return last_block(clip, early, windows, text, logit_scale=logit_scale, sigma=sigma, params=params)


class ResclipHead(FeatureHead):
    """ResCLIP over NACLIP (``wo_resi``, ``resclip`` attention): cosines on the CLIP grid, windows
    unpadded (as ResCLIP)."""

    @property
    def params(self) -> ResclipParams:
        return ResclipParams.from_options(self.seg.config.method_options)

    def layers(self) -> list[int]:
        clip = self.seg.models.clip
        return sorted({*reference_range(*self.params.rcs_blocks, clip.num_blocks), clip.num_blocks - 2})

    def window_logits(self, windows: Tensor, timer: StageTimer) -> Tensor:
        seg = self.seg
        clip = seg.models.clip
        params = self.params
        with timer("clip"), autocast(seg.device, seg.dtype):
            early = early_pass(clip, self._clip_input(windows),
                               reference_range(*params.rcs_blocks, clip.num_blocks))
        with timer("fusion"), full_precision(seg.device):
            tokens = last_block(clip, early, windows, seg.text, logit_scale=seg.config.logit_scale,
                                sigma=seg.config.sigma, params=params)
            cosines = F.normalize(tokens, dim=-1) @ seg.text.T  # [B, h*w, Q]
            return cosines.transpose(1, 2).reshape(windows.shape[0], -1, *early.grid)


__all__ = [
    "ResclipEarly", "ResclipHead", "ResclipParams", "early_pass", "entity_paths", "first_pass_labels", "first_pass_probs",
    "last_block",
    "patch_labels", "rcs_attention", "resclip_features", "residual_mix", "sfr_logits", "sfr_matrix",
]
