"""SAM 2 through the `sam2` package: building a model for the automatic mask generator (CorrCLIP's
class-agnostic masks), loading its checkpoint safely, and a tiny test model.

`build_sam2_model(spec)` is what ``sam2.build_sam.build_sam2(config, ckpt, apply_postprocessing=False)``
builds (CorrCLIP calls it so): the package's Hydra config instantiated, no extra overrides; the
checkpoint (``{"model": state dict}``) is read with ``torch.load(weights_only=True)`` and loaded
strictly, every failure one line naming the file.

`--models tiny` (`tiny=True`): the same `SAM2Base` with a two-channel-wide Hiera trunk and a
32-wide neck (seconds on a CPU), whose mask decoder is replaced by `PointBlobDecoder`: with random
weights SAM 2's decoder gives logits near zero, so every mask fails the generator's stability
threshold and a test would see no mask at all. The stub keeps the decoder's interface and returns,
for each point prompt, a blob around the point (the similarity of the point's positional encoding
with the image grid's, the prompt encoder's own random Fourier features) — masks that pass the
thresholds and move with the points, so the generator's real code (point grid, batching, stability,
NMS, RLE) runs on them. It is for tests only; its masks mean nothing about the image.
`--models random` builds the full-size architecture with random weights (timing only; its masks
mostly fail the thresholds, as the notes found).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import S2ClipError
from .registry import ModelSpec
from .weights import checkpoint_damage, checkpoint_error

INSTALL_HINT = ("`make install` installs it; by hand: `pip install wheel`, then "
                "`SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2`")

# Hydra overrides of the tiny test model (the Hiera-L config shrunk; image size stays 1024, which
# SAM2ImagePredictor hard-codes).
TINY_OVERRIDES: tuple[str, ...] = (
    "++model.image_encoder.trunk.embed_dim=8", "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[8,4,4,2]",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]", "++model.image_encoder.neck.d_model=32",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=32",
    "++model.memory_attention.d_model=32", "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=32", "++model.memory_attention.layer.dim_feedforward=32",
    "++model.memory_attention.layer.self_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.embedding_dim=32",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=16",
    "++model.memory_encoder.out_dim=16", "++model.memory_encoder.position_encoding.num_pos_feats=16",
    "++model.memory_encoder.mask_downsampler.embed_dim=32", "++model.memory_encoder.fuser.layer.dim=32",
)


def sam2_installed() -> bool:
    """Whether the `sam2` package can be imported."""
    try:
        import sam2  # noqa: F401
    except ImportError:
        return False
    return True


def _instantiate(config_name: str, overrides: tuple[str, ...]) -> nn.Module:
    try:
        import sam2  # noqa: F401 - initialises Hydra's config module
        from hydra import compose
        from hydra.utils import instantiate
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise S2ClipError(f"SAM 2 needs the `sam2` package ({exc.name or exc} is missing): {INSTALL_HINT}") from None
    cfg = compose(config_name=config_name, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return instantiate(cfg.model, _recursive_=True)


class PointBlobDecoder(nn.Module):
    """The tiny model's mask decoder (tests only): `sam2.modeling.sam.mask_decoder.MaskDecoder`'s call
    signature and outputs; for each prompt, logits ``sharpness · (k − threshold)`` on the low-res grid,
    where k is the mean cosine of the prompt point's and each cell's random Fourier features (1 at the
    point, falling off with distance) — a blob around the point, with a fixed predicted IoU."""

    def __init__(self, decoder: nn.Module, prompt_encoder: nn.Module, *, threshold: float = 0.6,
                 sharpness: float = 40.0, iou: float = 0.9) -> None:
        super().__init__()
        # The high-resolution feature convolutions SAM2Base.forward_image calls on the decoder.
        self.conv_s0, self.conv_s1 = decoder.conv_s0, decoder.conv_s1
        self.prompt_encoder = [prompt_encoder]  # a list: not a sub-module (its weights stay the model's)
        self.threshold, self.sharpness, self.iou = threshold, sharpness, iou

    def forward(self, image_embeddings: Tensor, image_pe: Tensor, sparse_prompt_embeddings: Tensor,
                dense_prompt_embeddings: Tensor, multimask_output: bool, repeat_image: bool,
                high_res_features: list[Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        encoder = self.prompt_encoder[0]
        point_pe = sparse_prompt_embeddings[:, 0] - encoder.point_embeddings[1].weight  # the positive point's PE
        dims = point_pe.shape[-1] // 2
        grid = image_pe[0].flatten(1)  # [C, h*w]
        kernel = (point_pe.float() @ grid.float()) / dims  # mean of cos over the frequencies
        h, w = image_pe.shape[-2:]
        logits = (self.sharpness * (kernel - self.threshold)).view(-1, 1, h, w)
        low_res = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
        n_masks = 3 if multimask_output else 1
        masks = low_res.expand(-1, n_masks, -1, -1).to(image_embeddings.dtype)
        iou = torch.full((masks.shape[0], n_masks), self.iou, device=masks.device, dtype=masks.dtype)
        tokens = torch.zeros(masks.shape[0], n_masks, point_pe.shape[-1], device=masks.device)
        scores = torch.full((masks.shape[0], 1), 10.0, device=masks.device)
        return masks, iou, tokens, scores


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    damage = checkpoint_damage(path)  # (also: a FIFO or device is refused before anything reads it)
    if damage is not None:
        raise S2ClipError(f"SAM 2 checkpoint {path} {damage}")
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickle that is not plain tensors, ...
        raise checkpoint_error(path, exc, "SAM 2") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise S2ClipError(f"SAM 2 checkpoint {path} does not hold a state dict (it holds {type(state).__name__})")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - wrong keys or shapes
        raise checkpoint_error(path, exc, "SAM 2") from None


def build_sam2_model(spec: ModelSpec, *, checkpoint: str | Path | None = None, tiny: bool = False) -> nn.Module:
    """A SAM 2 model (eval mode) for `spec` (`registry.SAM2_SPECS`): the package's config, random
    weights unless `checkpoint`; `tiny`: the small test model with `PointBlobDecoder` (see the
    module docstring). The caller seeds the randomness and warns about random weights."""
    if checkpoint is not None:  # a damaged file is refused before the model is built
        damage = checkpoint_damage(checkpoint)
        if damage is not None:
            raise S2ClipError(f"SAM 2 checkpoint {checkpoint} {damage}")
    model = _instantiate(spec.arch, TINY_OVERRIDES if tiny else ())
    if tiny:
        model.sam_mask_decoder = PointBlobDecoder(model.sam_mask_decoder, model.sam_prompt_encoder)
    if checkpoint is not None:
        _load_checkpoint(model, Path(checkpoint))
    return model.eval().requires_grad_(False)


__all__ = ["INSTALL_HINT", "PointBlobDecoder", "TINY_OVERRIDES", "build_sam2_model", "sam2_installed"]
