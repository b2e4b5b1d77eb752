"""SAM's image-encoder attention through ``scaled_dot_product_attention`` (fused kernels).

segment-anything's ``Attention.forward`` materializes each head's ``N x N`` logits, adds the
decomposed relative-position terms to them in two broadcast additions (each a new ``N x N``
tensor), takes the softmax (another) and multiplies by the values: at 1024 px a global block's
``N`` is 4096, so every step streams 0.8 GB per image through memory (fp32, ViT-B's 12 heads), and
the additions alone are a third of the encoder's time on a CPU.

`SdpaAttention` computes the same function in one fused kernel: the relative-position terms are
summed once into an additive ``attn_mask`` (the decomposition of segment-anything-fast), and
PyTorch's ``scaled_dot_product_attention`` takes the logits, mask, softmax and values together
(flash attention on the CPU, memory-efficient attention on CUDA), never holding the probabilities.
The mask is built for a few heads at a time (`MASK_BUDGET_BYTES`), so a global block holds a
fraction of one ``N x N`` map per image, not three per head.

It is segment-anything's own module: `use_sdpa_attention` changes the class of the encoder's
``Attention`` instances (their weights, names and state-dict keys stay) and the relative-position
lookup is segment-anything's ``get_rel_pos``. `use_reference_attention` puts the original back
(for comparisons and benchmarks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import Tensor, nn

MASK_BUDGET_BYTES = 256 * 2**20  # the additive mask of one SDPA call holds at most this much


def rel_pos_mask(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]) -> Tensor:
    """The decomposed relative-position terms of segment-anything's ``add_decomposed_rel_pos`` as one
    additive mask ``[..., N, N]`` for queries ``q`` ``[..., N, d]`` (unscaled, as there) on an
    ``H x W`` grid (queries and keys on the same grid): ``mask[i, j] = q_i·R_h[h_i - h_j] +
    q_i·R_w[w_i - w_j]``."""
    h, w = size
    r_h = get_rel_pos(h, h, rel_pos_h).to(q.dtype)  # [H, H, d]
    r_w = get_rel_pos(w, w, rel_pos_w).to(q.dtype)  # [W, W, d]
    r_q = q.reshape(*q.shape[:-2], h, w, q.shape[-1])
    rel_h = torch.einsum("...hwc,hkc->...hwk", r_q, r_h)  # [..., H, W, H]
    rel_w = torch.einsum("...hwc,wkc->...hwk", r_q, r_w)  # [..., H, W, W]
    # summed straight into a contiguous mask (einsum's outputs are permuted views: a plain sum
    # would follow their layout and need one more N x N copy to be reshaped)
    mask = torch.empty((*q.shape[:-1], h, w), dtype=q.dtype, device=q.device)
    torch.add(rel_h[..., :, None], rel_w[..., None, :], out=mask.view(*q.shape[:-2], h, w, h, w))
    return mask.view(*q.shape[:-1], h * w)


class SdpaAttention(Attention):
    """segment-anything's ``Attention`` (same parameters and state dict) computed by SDPA."""

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        n = h * w
        # (3, B, heads, N, d), as segment-anything lays the projections out
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            # a few (image, head) pairs per call, so that the mask stays within the budget
            q, k, v = (t.reshape(b * self.num_heads, n, -1) for t in (q, k, v))
            step = max(1, MASK_BUDGET_BYTES // (n * n * q.element_size()))
            parts = []
            for i in range(0, b * self.num_heads, step):
                qi = q[i : i + step]
                mask = rel_pos_mask(qi, self.rel_pos_h, self.rel_pos_w, (h, w))
                parts.append(F.scaled_dot_product_attention(qi, k[i : i + step], v[i : i + step],
                                                            attn_mask=mask.to(qi.dtype), scale=self.scale))
            out = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(b, self.num_heads, n, -1)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class CpuFloat32Conv2d(nn.Conv2d):
    """A ``Conv2d`` that computes in float32 under CPU autocast. CPU autocast casts convolutions to
    bf16/fp16, which most CPUs (no AVX512-BF16/FP16) run through PyTorch's slow reference kernel:
    SAM's three encoder convolutions (patch embedding, neck) then took 18 s per image instead of
    0.1 s. They are ~1 % of the encoder's work, so float32 costs nothing and rounds less; CUDA and
    float32 runs are unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())


def _set_class(encoder: nn.Module, base: type[nn.Module], cls: type[nn.Module]) -> nn.Module:
    """Give every module of ``encoder`` that is a ``base`` the class ``cls`` (in place: the same
    parameters, names and state dict)."""
    for module in encoder.modules():
        if isinstance(module, base):
            module.__class__ = cls
    return encoder


def use_float32_convolutions_on_cpu(encoder: nn.Module) -> nn.Module:
    """Make every ``Conv2d`` in ``encoder`` a `CpuFloat32Conv2d` (in place)."""
    return _set_class(encoder, nn.Conv2d, CpuFloat32Conv2d)


def use_reference_convolutions(encoder: nn.Module) -> nn.Module:
    """Put PyTorch's own ``Conv2d.forward`` back (in place; under CPU autocast: its bf16/fp16)."""
    return _set_class(encoder, nn.Conv2d, nn.Conv2d)


def use_sdpa_attention(encoder: nn.Module) -> nn.Module:
    """Make every segment-anything ``Attention`` in ``encoder`` an `SdpaAttention` (in place)."""
    return _set_class(encoder, Attention, SdpaAttention)


def use_reference_attention(encoder: nn.Module) -> nn.Module:
    """Put segment-anything's own ``Attention.forward`` back (in place)."""
    return _set_class(encoder, Attention, Attention)
