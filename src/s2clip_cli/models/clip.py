"""CLIP through open_clip: building, and the hierarchical feature path of S2CLIP.

`ClipBackbone` wraps an open_clip ``CLIP`` model. Its image path runs the ViT on a window with
the positional embedding resampled to the window's patch grid as the lineage does
(`pos_embed.resample_pos_embed`: bicubic, scale factor (g + 0.1) / N, no antialias),
keeps the residual stream after each selected block, and applies the *correlation block* — the
last block with its attention replaced by a given (proxy) attention, no residual and no MLP — to
every kept stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import S2ClipError, first_line
from .pos_embed import resample_pos_embed
from .registry import ModelSpec
from .weights import checkpoint_damage, checkpoint_error

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A small CLIP of the real architecture family, for `--models tiny`: an open_clip model config
# shipped in models/configs/ and registered with open_clip's factory.
TINY_CLIP_NAME = "s2clip-tiny-clip"


def _register_tiny_config() -> None:
    """Make the tiny configuration known to open_clip's factory (once)."""
    if TINY_CLIP_NAME in open_clip.list_models():
        return
    open_clip.add_model_config(Path(str(resources.files("s2clip_cli.models"))) / "configs" / f"{TINY_CLIP_NAME}.json")


def default_layers(num_blocks: int) -> list[int]:
    """The deeper half of the network up to the input of the last block.

    ViT-B/16 (12 blocks, 0-11): 6..10. Block 10's output is the last block's input.
    """
    return list(range(num_blocks // 2, num_blocks - 1))


def build_clip(spec: ModelSpec, *, weights: str | Path | None, tiny: bool = False) -> nn.Module:
    """Build an open_clip CLIP model; load `weights` when given (random otherwise)."""
    arch = spec.arch
    if tiny:
        _register_tiny_config()
        arch = TINY_CLIP_NAME
    try:
        logging.disable(logging.WARNING)  # open_clip logs "initialized randomly"; we warn ourselves
        try:
            model = open_clip.create_model(arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        raise S2ClipError(f"cannot build CLIP {spec.name}: {first_line(exc)}") from None
    if weights is not None:
        damage = checkpoint_damage(weights)  # (also: a FIFO or device is refused before anything reads it)
        if damage is not None:
            raise S2ClipError(f"CLIP {spec.name} checkpoint {weights} {damage}")
        try:
            open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a truncated, corrupt or foreign file: one line naming it
            raise checkpoint_error(weights, exc, f"CLIP {spec.name}") from None
    return model.eval()


def sdpa_block(block: nn.Module, x: Tensor) -> Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` (batch-first, no mask) with its attention
    computed by ``F.scaled_dot_product_attention`` from the block's own weights — the fused kernel
    instead of ``nn.MultiheadAttention``'s explicit softmax. Other block types run unchanged."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or hasattr(block, "ln_1_kv") or not attn.batch_first:
        return block(x)
    b, n, d = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    x = x + block.ls_1(attn.out_proj(y))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@dataclass
class ClipLayerStreams:
    """Residual streams after the selected blocks, for a batch of windows."""

    layers: list[int]
    streams: list[Tensor]  # each [B, 1 + h*w, D] (class token first)
    grid: tuple[int, int]


class ClipBackbone(nn.Module):
    """The CLIP pieces S2CLIP uses: text tower, patch embedding and blocks, correlation block."""

    def __init__(self, model: nn.Module, name: str, tokenizer_name: str = "ViT-B-16") -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.visual = model.visual
        self.tokenizer = open_clip.get_tokenizer(tokenizer_name)
        patch = self.visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        grid = self.visual.grid_size
        self.native_grid = (int(grid[0]), int(grid[1]))
        self.num_blocks = len(self.visual.transformer.resblocks)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    # ------------------------------------------------------------------ text
    @property
    def embed_dim(self) -> int:
        return int(self.visual.proj.shape[1])

    @torch.no_grad()
    def encode_text_names(self, names: list[str], templates, batch_size: int = 8) -> Tensor:
        """[len(names), E] unit text embeddings: each name's templates embedded, normalized,
        averaged, normalized (open_clip's `build_zero_shot_classifier`)."""
        device = next(self.model.parameters()).device
        weights = open_clip.build_zero_shot_classifier(
            self.model, self.tokenizer, names, templates,
            num_classes_per_batch=batch_size, device=device, use_tqdm=False,
        )
        return weights.T.float().contiguous()

    # ------------------------------------------------------------------ image
    @torch.no_grad()
    def positional_embedding(self, grid: tuple[int, int]) -> Tensor:
        """The class + patch positional embedding ``[1 + gh·gw, D]`` (float32) resampled to `grid`
        as ProxyCLIP and Trident do (see `pos_embed`), cached per grid."""
        cached = self._pos_cache.get(grid)
        pos = self.visual.positional_embedding
        if cached is not None and cached.device == pos.device:
            return cached
        resampled = resample_pos_embed(pos, grid, num_prefix_tokens=1)
        self._pos_cache[grid] = resampled
        return resampled

    def embed(self, images: Tensor) -> Tensor:
        """Patch + class tokens with positional embedding and ln_pre: [B, 1 + h*w, D]."""
        v = self.visual
        x = v.conv1(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding(grid).to(x.dtype)
        return v.ln_pre(x)

    def residual_streams(self, images: Tensor, layers: list[int]) -> ClipLayerStreams:
        """Run blocks 0..max(layers) and keep the residual stream after each selected block.

        `layers` index blocks 0..L-2 (block L-1 is replaced by the correlation block)."""
        bad = [layer for layer in layers if not 0 <= layer <= self.num_blocks - 2]
        if bad:
            raise S2ClipError(
                f"CLIP layer(s) {bad} out of range for {self.name}: choose from 0..{self.num_blocks - 2}"
            )
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        x = self.embed(images)
        wanted = set(layers)
        kept: dict[int, Tensor] = {}
        blocks = self.visual.transformer.resblocks
        for i in range(max(layers) + 1):
            x = sdpa_block(blocks[i], x)
            if i in wanted:
                kept[i] = x
        ordered = sorted(wanted)
        return ClipLayerStreams(ordered, [kept[i] for i in ordered], grid)

    def _fused_value_output(self) -> tuple[Tensor, Tensor | None]:
        """``W_o·W_v`` and ``W_o·b_v + b_o`` of the last block (cached per device/dtype)."""
        attn: nn.MultiheadAttention = self.visual.transformer.resblocks[-1].attn
        w = attn.in_proj_weight
        cached = getattr(self, "_wov", None)
        if cached is not None and cached[0].device == w.device and cached[0].dtype == w.dtype:
            return cached
        dim = w.shape[1]
        with torch.no_grad():
            w_v, w_o = w[2 * dim:], attn.out_proj.weight
            fused_w = w_o @ w_v
            b_v = attn.in_proj_bias[2 * dim:] if attn.in_proj_bias is not None else torch.zeros_like(w_v[:, 0])
            fused_b = w_o @ b_v + (attn.out_proj.bias if attn.out_proj.bias is not None else 0)
        self._wov = (fused_w, fused_b)
        return self._wov

    def value_tokens(self, stream: Tensor) -> Tensor:
        """``W_o·(W_v·LN1(x) + b_v) + b_o`` on the patch tokens: [B, h*w, D].

        The correlation block is ``y = W_o·(A·R·v)`` (R: bilinear resampling to the VFM grid). A and
        R are row-stochastic, so the output projection commutes with them and is applied here, on
        the coarser CLIP grid, fused with the value projection into one matmul."""
        last = self.visual.transformer.resblocks[-1]
        weight, bias = self._fused_value_output()
        return F.linear(last.ln_1(stream[:, 1:]), weight, bias)

    def project_values(self, mixed: Tensor) -> Tensor:
        """ln_post, then proj: the attended values [..., M, D] -> patch embeddings [..., M, E]."""
        return self.visual.ln_post(mixed) @ self.visual.proj
