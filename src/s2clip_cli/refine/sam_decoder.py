"""Batched SAM prompt decoding: many prompts of several classes through SAM's mask decoder at once.

The optimized refinement decodes prompts in chunks that span classes. Each prompt has its own
sparse embedding (point and/or box); the dense embedding (the mask prompt) is per class and is
shared by the class's prompts, so a chunk is given as ``dense`` ``[k, 256, h, w]`` (one per class
in the chunk) and ``group_of`` ``[n]`` (the row of ``dense`` for each prompt).

Two decoders with one interface (`decode`, then `low_res_masks` for the prompts that passed):

- `SamDecoder` (the default, ``"sam"``): SAM's own `MaskDecoder`, called once per chunk with
  per-prompt dense embeddings. `MaskDecoder.predict_masks` repeats the single image embedding
  ``[1, 256, h, w]`` once per prompt (`repeat_interleave`) and adds the dense embeddings
  ``[n, 256, h, w]`` to it, so a chunk mixing classes computes exactly what one `predict_torch`
  call per class computes.
- `FastDecoder` (``"fast"``, opt-in): the same modules and weights, the same mathematics,
  rearranged so that the 4096 image tokens are touched as few times as possible (see its
  docstring), and the mask upscaling done only for prompts that passed. It re-derives SAM's
  `TwoWayTransformer` from its submodules, so it is not the default; it is kept because it pays:
  `benchmarks/bench_sam.py` (SAM ViT-B, 448x608, 21 classes, 113 prompts, CPU, 1 thread) measured
  the refinement 2.3x (all prompts pass) to 3.9x (none pass) faster than with `SamDecoder`.

`class_dense_embeddings` forms each class's dense embedding as the reference does.
Decoding runs in float32 (the caller holds a `full_precision` region): mask logits are thresholded
at 0 and IoU predictions at the IoU threshold.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import Tensor

DECODERS = ("sam", "fast")


def class_dense_embeddings(sam: Sam, mask_prompts: Tensor | None) -> Tensor:
    """Dense prompt embeddings ``[K, 256, h, w]`` of the classes' ``[K, 256, 256]`` mask prompts, or
    SAM's no-mask embedding ``[1, 256, h, w]`` when `mask_prompts` is None.

    As the reference, each class's prompt goes through the prompt encoder as a 3-D
    ``[1, 256, 256]`` tensor, which SAM takes as unbatched: its `LayerNorm2d` then normalises over
    the wrong axis, and the embedding differs from a proper ``[1, 1, 256, 256]`` batch's. `vmap`
    keeps that per-class view (SAM's code sees one ``[1, 256, 256]`` prompt) while running all
    classes as one batch: bit-identical to a loop over the classes, and on a busy 2-core CPU about
    14x faster than 21 separate calls."""
    encoder = sam.prompt_encoder
    if mask_prompts is None:
        return encoder(points=None, boxes=None, masks=None)[1]

    def one_class(prompt: Tensor) -> Tensor:  # [256, 256] -> [256, h, w]
        return encoder(points=None, boxes=None, masks=prompt[None])[1]

    return torch.func.vmap(one_class)(mask_prompts)


class ClassBatchDecoder(Protocol):
    """Decodes a chunk of prompts; the low-res masks are asked for only where the IoU passed."""

    def decode(self, dense: Tensor, group_of: Tensor, sparse: Tensor) -> Tensor:
        """IoU predictions ``[n]`` of `sparse` ``[n, T, 256]`` prompts with dense embeddings
        ``dense[group_of]``; the decoder keeps what `low_res_masks` needs until the next call."""
        ...

    def low_res_masks(self, passing: Tensor) -> Tensor:
        """Low-res mask logits ``[m, 1, 256, 256]`` of the last chunk's prompts where `passing`."""
        ...


def make_decoder(name: str, sam: Sam, features: Tensor) -> ClassBatchDecoder:
    """The decoder called `name` (one of `DECODERS`) for the ``[1, 256, h, w]`` image embedding."""
    if name == "sam":
        return SamDecoder(sam, features)
    if name == "fast":
        return FastDecoder(sam, features)
    raise ValueError(f"unknown decoder {name!r}")


class SamDecoder:
    """SAM's own `MaskDecoder` (single-mask output), one call per chunk of prompts of any classes."""

    def __init__(self, sam: Sam, features: Tensor) -> None:
        self.sam = sam
        self.features = features  # [1, 256, h, w]
        self.image_pe = sam.prompt_encoder.get_dense_pe()
        self._low_res: Tensor | None = None

    def decode(self, dense: Tensor, group_of: Tensor, sparse: Tensor) -> Tensor:
        # One dense embedding broadcasts over the prompts; several are gathered per prompt.
        per_prompt = dense if dense.shape[0] == 1 else dense[group_of]
        low_res, iou = self.sam.mask_decoder(image_embeddings=self.features, image_pe=self.image_pe,
                                             sparse_prompt_embeddings=sparse,
                                             dense_prompt_embeddings=per_prompt, multimask_output=False)
        self._low_res = low_res
        return iou[:, 0]

    def low_res_masks(self, passing: Tensor) -> Tensor:
        assert self._low_res is not None, "decode first"
        return self._low_res if bool(passing.all()) else self._low_res[passing]


class FastDecoder:
    """SAM's mask decoder (single-mask output) for many prompts of several classes at once.

    The same modules and weights as `MaskDecoder.predict_masks` + `TwoWayTransformer`, the
    same mathematics, rearranged so that the 4096 image tokens are touched as few times as
    possible (the original spends most of its time in copies and elementwise passes over them):

    - what depends only on the class (image embedding + dense embedding, + positional
      encoding) is formed once per class; the first layer attends to it without a per-prompt copy;
    - attention projections are folded into the few prompt tokens: token→image scores are
      ``(q W_k) · x`` and values ``(softmax · x) W_v``; image→token scores are
      ``x · (W_q^T k)`` and outputs ``softmax · (v W_o^T)``, so no ``[4096, 128]`` projection of
      the image tokens is ever built (softmax rows sum to one, so the value bias carries over);
    - the final attention is computed for the two tokens that are read (IoU and first mask);
    - the output upscaling (two stride-2 transposed convolutions) runs as matrix products in a
      channels-last layout, and only for the prompts that passed, with only the first mask token.

    Results equal SAM's own `predict_torch` to float tolerance (see tests/test_sam_refine.py).
    """

    def __init__(self, sam: Sam, features: Tensor) -> None:
        self.decoder = sam.mask_decoder
        self.transformer = self.decoder.transformer
        self.features = features  # [1, 256, h, w]
        pe = sam.prompt_encoder.get_dense_pe()
        self.image_pe = pe.flatten(2).permute(0, 2, 1)[0]  # [hw, 256]
        self.grid = features.shape[-2:]
        self._final: Tensor | None = None
        self._keys: Tensor | None = None

    def decode(self, dense: Tensor, group_of: Tensor, sparse: Tensor) -> Tensor:
        if dense.shape[0] == 1:
            group_of = torch.zeros_like(group_of)
        iou, self._final, self._keys = self.run(dense, group_of, sparse)
        return iou

    def low_res_masks(self, passing: Tensor) -> Tensor:
        assert self._final is not None and self._keys is not None, "decode first"
        if bool(passing.all()):  # no copy of the image tokens when every prompt passed
            return self.masks(self._final, self._keys)
        return self.masks(self._final[passing], self._keys[passing])

    def run(self, dense: Tensor, group_of: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """IoU predictions ``[n]``, the two read output tokens ``[n, 2, 256]`` and the image keys
        ``[n, hw, 256]`` for `sparse` ``[n, T, 256]`` prompts whose dense embedding is
        ``dense[group_of]`` (``dense``: ``[k, 256, h, w]``)."""
        d, t = self.decoder, self.transformer
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        src = (self.features + dense).flatten(2).permute(0, 2, 1)  # [k, hw, 256]
        queries, keys = self._first_layer(tokens, src, group_of)
        for layer in t.layers[1:]:
            queries, keys = self._layer(layer, queries, keys, tokens)
        read = slice(0, 2)  # IoU token, first mask token
        q = queries[:, read] + tokens[:, read]
        attn_out = _token_to_image(t.final_attn_token_to_image, q, keys, key_pe=self.image_pe)
        final = t.norm_final_attn(queries[:, read] + attn_out)
        iou = d.iou_prediction_head(final[:, 0, :])[:, 0]
        return iou, final, keys

    def _first_layer(self, tokens: Tensor, src: Tensor, group_of: Tensor) -> tuple[Tensor, Tensor]:
        """Layer 0 (skip_first_layer_pe), attending to each prompt's class-level image tokens."""
        layer = self.transformer.layers[0]
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        key_in = src + self.image_pe  # [k, hw, 256]
        spans = _group_spans(group_of)
        attn_out = torch.cat([
            _token_to_image(layer.cross_attn_token_to_image, queries[span] + tokens[span], src[g], key_in[g])
            for g, span in enumerate(spans)])
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        keys = src.new_empty(tokens.shape[0], src.shape[1], src.shape[2])
        for g, span in enumerate(spans):
            _image_to_token(layer.cross_attn_image_to_token, key_in[g], q[span], queries[span], src[g],
                            out=keys[span])
        return queries, layer.norm4(keys)

    def _layer(self, layer: torch.nn.Module, queries: Tensor, keys: Tensor,
               query_pe: Tensor) -> tuple[Tensor, Tensor]:
        """`TwoWayAttentionBlock.forward` (with positional encodings) on per-prompt image tokens."""
        q = queries + query_pe
        queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        key_in = keys + self.image_pe
        attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, key_in=key_in)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys = _image_to_token(layer.cross_attn_image_to_token, key_in, q, queries, keys, out=torch.empty_like(keys))
        return queries, layer.norm4(keys)

    def masks(self, final: Tensor, keys: Tensor) -> Tensor:
        """Low-res logits ``[n, 1, 256, 256]`` of the first mask token (`output_upscaling`, then
        the hypernetwork product), channels-last: ConvTranspose2d(k=2, s=2) is a per-pixel matmul."""
        d = self.decoder
        conv1, norm, act1, conv2, act2 = d.output_upscaling
        n, hw, _ = keys.shape
        gh, gw = self.grid
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.weight.shape[0], -1)  # [256, (a, b, o)]
        y = torch.addmm(conv1.bias.repeat(4), keys.reshape(n * hw, -1), w1).view(n, hw, 4, -1)
        y = act1(F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.weight.shape[0], -1)  # [64, (c, d, p)]
        z = act2(torch.addmm(conv2.bias.repeat(4), y.reshape(n * hw * 4, -1), w2))
        hyper = d.output_hypernetworks_mlps[0](final[:, 1, :])  # [n, 32]
        logits = torch.bmm(z.view(n, hw * 16, -1), hyper.unsqueeze(-1))  # [n, hw*(a,b,c,d), 1]
        logits = logits.view(n, gh, gw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return logits.reshape(n, 1, gh * 4, gw * 4)


def _group_spans(group_of: Tensor) -> list[slice]:
    """Slices of the consecutive runs of group 0, 1, ... in `group_of` (prompts sorted by class)."""
    counts = torch.bincount(group_of).tolist()
    starts = np.cumsum([0, *counts])
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _softmax_short_rows(x: Tensor) -> Tensor:
    """Softmax over a short last dimension (the few prompt tokens), in place on `x`.

    PyTorch's CPU softmax is slow on rows of ~8 elements (about 6x slower than this)."""
    x = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[..., heads * d]`` -> ``[..., heads, d]``."""
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads)


def _token_to_image(attn: torch.nn.Module, q: Tensor, values: Tensor, key_in: Tensor | None = None,
                    key_pe: Tensor | None = None) -> Tensor:
    """`Attention(q=q, k=key_in, v=values)` for few query tokens and many image tokens.

    `q`: ``[n, T, 256]``; `values` and `key_in`: ``[hw, 256]`` (shared) or ``[n, hw, 256]``; when
    `key_in` is None it is ``values + key_pe`` (not formed: the scores are split in two).
    Scores ``(q W_k) · key_in + q · b_k`` and output ``(softmax · values) W_v^T + b_v`` never
    build per-head projections of the image tokens; the 1/sqrt(d) scale is folded into q."""
    heads = attn.num_heads
    qh = _split_heads(attn.q_proj(q), heads)  # [n, T, h, d]
    qh = qh / math.sqrt(qh.shape[-1])
    wk = _split_heads(attn.k_proj.weight.t(), heads)  # [256, h, d]
    q_fold = torch.einsum("nthd,chd->nhtc", qh, wk)  # [n, h, T, 256]
    n, h, t, c = q_fold.shape
    bias = torch.einsum("nthd,hd->nht", qh, _split_heads(attn.k_proj.bias, heads)).reshape(n, h * t, 1)
    flat = q_fold.reshape(n, h * t, c)
    if key_in is not None:
        scores = torch.matmul(flat, key_in.transpose(-1, -2)) + bias
    else:
        scores = torch.baddbmm(bias + flat @ key_pe.t(), flat, values.transpose(-1, -2))
    weights = torch.softmax(scores, dim=-1)
    pooled = torch.matmul(weights, values)  # [n, h*T, 256]
    wv = _split_heads(attn.v_proj.weight.t(), heads)  # [256, h, d]
    out = torch.einsum("nhtc,chd->nthd", pooled.view(n, h, t, c), wv) + _split_heads(attn.v_proj.bias, heads)
    return attn.out_proj(out.reshape(n, t, -1))


def _image_to_token(attn: torch.nn.Module, q_image: Tensor, k: Tensor, v: Tensor, residual: Tensor,
                    out: Tensor) -> Tensor:
    """``residual + Attention(q=q_image, k=k, v=v)`` for many image queries and few tokens,
    written into `out` ``[n, hw, 256]``.

    `q_image`, `residual`: ``[hw, 256]`` (shared) or ``[n, hw, 256]``; `k`, `v`: ``[n, T, 256]``.
    Scores ``q_image · (W_q^T k_h) + b_q · k_h``; output ``softmax · (v_h W_o,h^T + b_o / h)``
    (each head's weights sum to one, so the output bias is spread over the heads). Float32 only:
    `out=` bypasses autocast (the caller decodes inside `full_precision`)."""
    heads = attn.num_heads
    kh = _split_heads(attn.k_proj(k), heads)  # [n, T, h, d]
    kh = kh / math.sqrt(kh.shape[-1])
    vh = _split_heads(attn.v_proj(v), heads)
    wq = _split_heads(attn.q_proj.weight.t(), heads)  # [256, h, d]
    a = torch.einsum("chd,nthd->ncht", wq, kh)  # [n, 256, h, T]
    n, c, h, t = a.shape
    bias = torch.einsum("hd,nthd->nht", _split_heads(attn.q_proj.bias, heads), kh).reshape(n, 1, h * t)
    scores = torch.matmul(q_image, a.reshape(n, c, h * t)).add_(bias)  # [n, hw, h*T]
    weights = _softmax_short_rows(scores.view(n, -1, h, t)).view(n, -1, h * t)
    wo = attn.out_proj.weight.view(attn.out_proj.weight.shape[0], heads, -1)  # [256, h, d]
    v_fold = torch.einsum("nthd,chd->nhtc", vh, wo).reshape(n, h * t, -1) + attn.out_proj.bias / heads
    torch.matmul(weights, v_fold, out=out)
    return out.add_(residual)
