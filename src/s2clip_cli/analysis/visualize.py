"""Figure 6: dense features as colour, one PCA per panel.

`strategy_feature_map` and `vfm_feature_map` compute a ``[C, h, w]`` map for one image (CLIP's
dense features under a last-block attention strategy, a VFM's last-layer features);
`pca_rgb` turns a map into an RGB image of its first three principal components;
`cosine_map` gives the cosine similarity of every position to one point; `feature_figure`
draws the grid (the image, then one panel per map, optionally a second row of similarity maps)
and writes it atomically as PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from ..errors import S2ClipError
from ..io.files import atomic_path
from ..models.clip import CLIP_MEAN, CLIP_STD, ClipBackbone
from ..models.precision import autocast, full_precision
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD
from ..pipeline.attention import STRATEGIES, dense_clip_features
from .features import normalized

# Strategies that need more than the image (a VFM's features) cannot be drawn from CLIP alone.
DRAWABLE_STRATEGIES: tuple[str, ...] = tuple(name for name, s in STRATEGIES.items() if not s.needs_vfm)
STRATEGY_TITLES = {"vanilla": "CLIP", "qq": "CLIP (q-q)", "kk": "CLIP (k-k)", "vv": "CLIP (v-v)",
                   "identity": "CLIP (identity)", "csa": "CLIP (csa)", "neighbourhood": "CLIP (neighbourhood)",
                   "fused": "CLIP (fused)"}


@dataclass
class FeaturePanel:
    """One panel: its title and its feature map ``[C, h, w]`` (float32)."""

    title: str
    features: Tensor


def image_tensor(image: np.ndarray, patch: int, device: torch.device | str = "cpu") -> Tensor:
    """An H×W×3 uint8 image as ``[1, 3, h, w]`` in [0, 1], both sides rounded to the nearest multiple
    of `patch` (at least one patch; bilinear)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float().div_(255.0)
    h, w = image.shape[:2]
    size = (max(patch, int(h / patch + 0.5) * patch), max(patch, int(w / patch + 0.5) * patch))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return x


@torch.no_grad()
def strategy_feature_map(clip: ClipBackbone, image: np.ndarray, strategy: str, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> Tensor:
    """CLIP's dense patch embeddings ``[E, h, w]`` (float32) of `image` with the last block's
    attention replaced by `strategy` (residual and FFN dropped, as CLIPer's `--attn-type` draws
    them); `vanilla` is CLIP's own attention."""
    if strategy not in DRAWABLE_STRATEGIES:
        raise S2ClipError(f"cannot draw strategy {strategy!r} from CLIP alone; choose from: "
                          f"{', '.join(DRAWABLE_STRATEGIES)} (VFM features: --vfm)")
    device = torch.device(device)
    x = normalized(image_tensor(image, clip.patch_size, device), CLIP_MEAN, CLIP_STD)
    grid = (x.shape[-2] // clip.patch_size, x.shape[-1] // clip.patch_size)
    with autocast(device, dtype):
        tokens = dense_clip_features(clip, x, strategy)  # [1, h*w, E]
    return tokens[0].float().T.reshape(-1, *grid)


@torch.no_grad()
def vfm_feature_map(vfm: nn.Module, image: np.ndarray, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Tensor:
    """A VFM's last-layer patch features ``[C, h, w]`` (float32) of `image`, at the image's own
    resolution rounded to the VFM's patch size."""
    device = torch.device(device)
    patch = int(getattr(vfm, "patch_size", 16))
    x = normalized(image_tensor(image, patch, device), IMAGENET_MEAN, IMAGENET_STD)
    with autocast(device, dtype):
        feats = vfm(x)
    return feats[0].float()


def pca_rgb(features: Tensor, *, clip_percent: float = 1.0) -> np.ndarray:
    """The first three principal components of a ``[C, h, w]`` map as an ``h×w×3`` uint8 image:
    one PCA (SVD of the centred positions × channels matrix) for this map; each component's sign
    fixed so its largest loading is positive, clipped at the `clip_percent` / 100 − `clip_percent`
    percentiles and scaled to 0–255. Maps with fewer than three channels or positions pad with 0."""
    with full_precision(features.device):
        c, h, w = features.shape
        x = features.float().reshape(c, -1).T  # [N, C]
        x = x - x.mean(dim=0, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        comps = vh[:3]  # [k, C]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
        comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
        proj = (x @ comps.T).cpu().numpy()  # [N, k]
    out = np.zeros((h * w, 3), dtype=np.float64)
    for k in range(proj.shape[1]):
        lo, hi = np.percentile(proj[:, k], [clip_percent, 100.0 - clip_percent])
        out[:, k] = np.clip((proj[:, k] - lo) / (hi - lo), 0.0, 1.0) if hi > lo else 0.5
    return (out.reshape(h, w, 3) * 255.0 + 0.5).astype(np.uint8)


def cosine_map(features: Tensor, point: tuple[float, float]) -> np.ndarray:
    """Cosine similarity ``h×w`` (float32) of every position of a ``[C, h, w]`` map to the position
    under `point` = (x, y) given as fractions of the width and height (0–1)."""
    c, h, w = features.shape
    fx, fy = point
    col = min(w - 1, max(0, int(fx * w)))
    row = min(h - 1, max(0, int(fy * h)))
    f = F.normalize(features.float().reshape(c, -1), dim=0)
    return (f[:, row * w + col] @ f).reshape(h, w).cpu().numpy().astype(np.float32)


def feature_figure(image: np.ndarray, panels: Sequence[FeaturePanel], path: str | os.PathLike[str], *,
                   point: tuple[float, float] | None = None, panel_inches: float = 2.6, dpi: int = 100) -> Path:
    """Write the Figure-6 grid for one image to `path` (PNG, atomically): row 1 the image and each
    panel's PCA colours (patch grid, nearest-neighbour); with `point` (x, y as fractions of the
    image), row 2 the image with the point marked and each panel's cosine similarity to it."""
    if not panels:
        raise S2ClipError("no feature panels to draw")
    cols = 1 + len(panels)
    rows = 1 if point is None else 2
    fig = Figure(figsize=(panel_inches * cols, panel_inches * rows + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    h, w = image.shape[:2]
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=9)
    for ax, panel in zip(axes[0, 1:], panels, strict=True):
        ax.imshow(pca_rgb(panel.features), interpolation="nearest", extent=(0, w, h, 0))
        ax.set_title(panel.title, fontsize=9)
    if point is not None:
        px, py = point[0] * w, point[1] * h
        axes[1, 0].imshow(image)
        axes[1, 0].plot([px], [py], marker="*", color="red", markersize=12, markeredgecolor="white")
        axes[1, 0].set_title("point", fontsize=9)
        for ax, panel in zip(axes[1, 1:], panels, strict=True):
            sim = cosine_map(panel.features, point)
            ax.imshow(sim, cmap="jet", vmin=float(sim.min()), vmax=1.0, interpolation="nearest", extent=(0, w, h, 0))
            ax.plot([px], [py], marker="*", color="white", markersize=8)
            ax.set_title(f"{panel.title}: cos to point", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


__all__ = ["DRAWABLE_STRATEGIES", "STRATEGY_TITLES", "FeaturePanel", "cosine_map", "feature_figure", "image_tensor",
           "pca_rgb", "strategy_feature_map", "vfm_feature_map"]
