"""SAM (segment-anything) models built from segment-anything's own building blocks.

`build_sam("vit_b")` is exactly what `segment_anything.sam_model_registry["vit_b"]` builds;
`tiny=True` keeps the same `Sam` class, prompt encoder and mask decoder but swaps in a two-block
image encoder so tests run in seconds. Checkpoints are loaded strictly with `weights_only=True`.
The image encoder's attention runs through `scaled_dot_product_attention` (`sam_fused`: the same
function, modules and state dict; `use_reference_attention` puts segment-anything's forward back).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from ..errors import S2ClipError
from .sam_fused import use_float32_convolutions_on_cpu, use_sdpa_attention
from .weights import checkpoint_damage, checkpoint_error

SAM_VARIANTS = ("vit_b", "vit_l", "vit_h")

SAM_CHECKPOINT_FILES = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}

# (embed_dim, depth, num_heads, global_attn_indexes), as segment_anything/build_sam.py sets them.
_ENCODER_SHAPES: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}
_TINY_ENCODER = (64, 2, 2, (1,))

_PROMPT_EMBED_DIM = 256
_IMAGE_SIZE = 1024
_PATCH_SIZE = 16


def _image_encoder(embed_dim: int, depth: int, num_heads: int, global_attn: tuple[int, ...]) -> ImageEncoderViT:
    """SAM's ViT image encoder with segment-anything's fixed settings (1024 input, 16 px patches)."""
    return ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=_IMAGE_SIZE,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=_PATCH_SIZE,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(global_attn),
        window_size=14,
        out_chans=_PROMPT_EMBED_DIM,
    )


def _assemble(image_encoder: ImageEncoderViT) -> Sam:
    """A `Sam` with segment-anything's prompt encoder and mask decoder around `image_encoder`."""
    grid = _IMAGE_SIZE // _PATCH_SIZE
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=_PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(_IMAGE_SIZE, _IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=_PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=_PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _load_checkpoint(sam: Sam, checkpoint: str | Path) -> None:
    """Load a segment-anything state dict strictly; any failure names the file."""
    path = Path(checkpoint)
    if not path.exists():
        raise S2ClipError(f"SAM checkpoint {path} does not exist")
    damage = checkpoint_damage(path)  # (also: a FIFO or device is refused before anything reads it)
    if damage is not None:
        raise S2ClipError(f"SAM checkpoint {path} {damage}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt file, pickle that is not plain tensors, ...
        raise checkpoint_error(path, exc, "SAM") from None
    if not isinstance(state, dict):
        raise S2ClipError(f"SAM checkpoint {path} does not hold a state dict (it holds {type(state).__name__})")
    try:
        sam.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - wrong keys or shapes, or values that are not tensors
        raise checkpoint_error(path, exc, "SAM") from None


def build_sam(variant: str = "vit_b", *, tiny: bool = False, checkpoint: str | Path | None = None) -> Sam:
    """Build a SAM model (in eval mode) for `variant` (vit_b, vit_l or vit_h).

    `tiny=True` builds the same architecture family with a small image encoder (random
    weights; for tests). Without `checkpoint` the weights are random; the caller warns.
    """
    if variant not in _ENCODER_SHAPES:
        raise S2ClipError(f"unknown SAM variant {variant!r}: use one of {', '.join(SAM_VARIANTS)}")
    shape = _TINY_ENCODER if tiny else _ENCODER_SHAPES[variant]
    sam = _assemble(_image_encoder(*shape))
    use_sdpa_attention(sam.image_encoder)
    use_float32_convolutions_on_cpu(sam.image_encoder)
    if checkpoint is not None:
        _load_checkpoint(sam, checkpoint)
    return sam.eval()
