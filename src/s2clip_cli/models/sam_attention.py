"""Attention probabilities and values of SAM's last (global) image-encoder block.

segment-anything's ``Attention.forward`` does not expose its attention map. Trident patches the
library to store it; here nothing is patched: a forward pre-hook on the encoder's last block keeps
the block's input, and the block's attention is recomputed from its own weights exactly as
``segment_anything.modeling.image_encoder.Attention.forward`` computes it —
``qkv = W·LN1(x) + b``, ``logits = (q·scale)·kᵀ``, plus the decomposed relative-position terms
(segment-anything's own ``add_decomposed_rel_pos``), softmax over keys — all in float32, with
autocast switched off, whatever precision the encoder itself ran in.

Tokens are numbered row-major over the block's ``H x W`` grid (64 x 64 for a 1024 input).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT, add_decomposed_rel_pos
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import S2ClipError


@dataclass
class BlockQKV:
    """Per-head queries, keys and values of one image: each ``[heads, H*W, head_dim]`` float32."""

    q: Tensor
    k: Tensor
    v: Tensor
    grid: tuple[int, int]  # (H, W) token grid

    @property
    def heads(self) -> int:
        return int(self.q.shape[0])

    def values_grid(self) -> Tensor:
        """The values as a ``[heads, H, W, head_dim]`` map (Trident's ``last_v``)."""
        return self.v.reshape(self.heads, *self.grid, -1)


class BlockInputCapture:
    """Context manager that keeps the input ``[B, H, W, C]`` of `block`'s last forward call.

    >>> with BlockInputCapture(encoder.blocks[-1]) as capture:
    ...     encoder(images)          # or SamPredictor.set_image(image)
    >>> x = capture.input
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self._input: Tensor | None = None
        self._handle: RemovableHandle | None = None

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        self._input = args[0].detach()

    def __enter__(self) -> BlockInputCapture:
        self._input = None
        self._handle = self.block.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def input(self) -> Tensor:
        """The captured block input; an error if the block has not run inside the context."""
        if self._input is None:
            raise S2ClipError("SAM's last image-encoder block did not run: no attention to read")
        return self._input


def last_global_block(encoder: ImageEncoderViT) -> Block:
    """The encoder's last block, which must use global (not windowed) attention, as in every
    released SAM (ViT-B/L/H: the last block is one of the global-attention blocks)."""
    block = encoder.blocks[-1]
    if not isinstance(block, Block) or block.window_size != 0:
        raise S2ClipError("SAM's last image-encoder block is not a global-attention block")
    return block


def last_block_input(encoder: ImageEncoderViT, images: Tensor) -> Tensor:
    """The input ``[B, H, W, C]`` of `encoder`'s last block for its input ``images`` ``[B, 3, S, S]``:
    the first steps of ``ImageEncoderViT.forward`` (patch embedding, absolute positions, every block
    but the last) with the encoder's own modules — without the last block and the neck, whose
    outputs the attention read from that block does not need."""
    x = encoder.patch_embed(images)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks[:-1]:
        x = block(x)
    return x


def block_qkv(block: Block, x: Tensor) -> BlockQKV:
    """Recompute `block`'s per-head q, k, v (float32) from its input ``x`` ``[1, H, W, C]``."""
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected the block input of one image [1, H, W, C], got {tuple(x.shape)}")
    _, h, w, c = x.shape
    attn = block.attn
    heads = attn.num_heads
    norm = block.norm1
    with torch.autocast(device_type=x.device.type, enabled=False):
        xn = F.layer_norm(
            x.float(), norm.normalized_shape,
            None if norm.weight is None else norm.weight.float(),
            None if norm.bias is None else norm.bias.float(), norm.eps,
        )
        bias = None if attn.qkv.bias is None else attn.qkv.bias.float()
        qkv = F.linear(xn, attn.qkv.weight.float(), bias)
    # Same layout as segment-anything: (3, heads, H*W, head_dim).
    q, k, v = qkv.reshape(h * w, 3, heads, c // heads).permute(1, 2, 0, 3).unbind(0)
    return BlockQKV(q.contiguous(), k.contiguous(), v.contiguous(), (h, w))


def iter_head_attention(block: Block, qkv: BlockQKV) -> Iterator[Tensor]:
    """Attention probabilities ``[H*W, H*W]`` (float32, rows sum to 1) of each head in turn —
    one head at a time, so a 64x64 grid holds one 4096x4096 map, not twelve."""
    attn = block.attn
    with torch.autocast(device_type=qkv.q.device.type, enabled=False):
        rel_h = attn.rel_pos_h.float() if attn.use_rel_pos else None
        rel_w = attn.rel_pos_w.float() if attn.use_rel_pos else None
        for head in range(qkv.heads):
            q = qkv.q[head : head + 1]  # [1, M, d]
            logits = (q * attn.scale) @ qkv.k[head : head + 1].transpose(-2, -1)
            if attn.use_rel_pos:
                logits = add_decomposed_rel_pos(logits, q, rel_h, rel_w, qkv.grid, qkv.grid)
            yield torch.softmax(logits[0], dim=-1)


def block_attention(block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
    """(attention ``[heads, H*W, H*W]``, values ``[heads, H, W, head_dim]``), float32, of `block`
    for its input ``x`` ``[1, H, W, C]`` — Trident's ``last_attn`` / ``last_v`` for one image."""
    qkv = block_qkv(block, x)
    return torch.stack(list(iter_head_attention(block, qkv))), qkv.values_grid()
