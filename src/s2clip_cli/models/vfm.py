"""Vision foundation models (the proxy for spatial grouping): DINO/DINOv2 via timm, SAM's image
encoder via segment-anything. Each returns last-layer patch features ``[B, C, h, w]`` for a batch
of ImageNet-normalized windows.

The timm ViTs run timm's own modules, except that the positional embedding is resampled to the
window's grid as the DINO and DINOv2 hubs do (`pos_embed.resample_pos_embed`), not by timm's
antialiased resize: our features must match the lineage's."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models import load_state_dict
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn

from ..errors import S2ClipError
from .pos_embed import resample_pos_embed
from .registry import ModelSpec
from .weights import checkpoint_damage, checkpoint_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Small timm ViT arguments for `--models tiny` (same VisionTransformer class, fewer/narrower blocks).
TINY_VIT_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}
SAM_INPUT_SIZE = 1024


class TimmVFM(nn.Module):
    """A timm ViT (DINO / DINOv2) returning its final-norm patch tokens as a feature map."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        patch = model.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The model's positional embedding resampled to `grid` as the DINO/DINOv2 hubs do (cached):
        ``[1, P + gh·gw, C]``, P = 0 for models whose embedding skips the prefix tokens (registers)."""
        cached = self._pos_cache.get(grid)
        pos = self.model.pos_embed
        if cached is None or cached.device != pos.device:
            prefix = 0 if self.model.no_embed_class else self.num_prefix_tokens
            cached = resample_pos_embed(pos[0].detach(), grid, num_prefix_tokens=prefix)[None]
            self._pos_cache[grid] = cached
        return cached

    def tokens(self, images: Tensor) -> Tensor:
        """All output tokens ``[B, P + h·w, C]`` (timm's `forward_features` with the lineage's
        positional embedding): patch embedding, prefix tokens, blocks, final norm."""
        m = self.model
        x = m.patch_embed(images)  # [B, h, w, C] (dynamic image size)
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c)
        pos = self.positional_embedding((gh, gw)).to(x.dtype)
        prefix = [t.expand(b, -1, -1).to(x.dtype) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
        return m.norm(m.blocks(x))

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.tokens(images)
        h, w = self.grid(images.shape[-2], images.shape[-1])
        patches = tokens[:, self.num_prefix_tokens:]
        return patches.transpose(1, 2).reshape(images.shape[0], -1, h, w)


class SamEncoderVFM(nn.Module):
    """SAM's image encoder on a window resized to 1024x1024 (its native input, as ProxyCLIP does):
    a 64x64 grid of 256-d features."""

    patch_size = 16

    def __init__(self, image_encoder: nn.Module, name: str = "sam_vitb16") -> None:
        super().__init__()
        self.encoder = image_encoder
        self.name = name

    def grid(self, height: int, width: int) -> tuple[int, int]:
        n = SAM_INPUT_SIZE // self.patch_size
        return n, n

    def forward(self, images: Tensor) -> Tensor:
        x = F.interpolate(images, size=(SAM_INPUT_SIZE, SAM_INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.encoder(x)


def build_timm_vit(spec: ModelSpec, *, weights: str | Path | None, tiny: bool = False) -> nn.Module:
    """Create the timm ViT for `spec` (dynamic image size, no head) and load `weights`.

    Checkpoints are read with ``weights_only=True`` (or safetensors) and converted by timm's own
    ``checkpoint_filter_fn``, so both timm's hub files and the original DINO/DINOv2 ``.pth``
    files load."""
    kwargs = dict(TINY_VIT_KWARGS) if tiny else {}
    model = timm.create_model(spec.arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    if weights is not None:
        damage = checkpoint_damage(weights)  # (also: a FIFO or device is refused before anything reads it)
        if damage is not None:
            raise S2ClipError(f"{spec.name} checkpoint {weights} {damage}")
        try:
            state = load_state_dict(str(weights), weights_only=True)
            state = checkpoint_filter_fn(state, model)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
                old = int((state["pos_embed"].shape[1] - model.num_prefix_tokens) ** 0.5)
                state["pos_embed"] = resample_abs_pos_embed(
                    state["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=[old, old],
                    num_prefix_tokens=model.num_prefix_tokens,
                )
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001 - every failure is a bad checkpoint for the user
            raise checkpoint_error(weights, exc, spec.name) from None
    return model.eval()


def build_vfm(spec: ModelSpec, *, weights: str | Path | None, tiny: bool = False) -> nn.Module:
    """Build the VFM named by `spec`: `TimmVFM` or `SamEncoderVFM`."""
    if spec.name == "sam_vitb16":
        from .sam import build_sam

        sam = build_sam("vit_b", tiny=tiny, checkpoint=weights)
        return SamEncoderVFM(sam.image_encoder).eval()
    return TimmVFM(build_timm_vit(spec, weights=weights, tiny=tiny), spec.name).eval()

