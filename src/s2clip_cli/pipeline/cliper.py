"""CLIPer's coarse map (``linsun449/cliper.code`` ``CLIPer.forward``), from its layer features.

Given the L layer-slot patch embeddings of `attention.cliper_layer_features` and the attention its
last slot used:

1. per slot, cosine with the text queries × logit scale, softmax over the queries — CLIPer's
   queries are [classes, background words, mean of the class embeddings]; ours are every name of
   every class (background names included) plus that mean of the foreground names, which is dropped
   after the softmax;
2. the last slot's map: values under ``attention_thr`` × its per-name spatial maximum set to 0
   (in place, so the layer mean of step 4 sees the thresholded map, as in CLIPer);
3. propagated by the head-mean attention without the class token: ``seg_last @ A`` (CLIPer's
   ``seg_last.flatten(-2, -1) @ attn.mean(0)[1:, 1:]``);
4. coarse map = propagated last map + mean over the L slots' maps.

The result is not normalised over the names (the propagated term is not a distribution); the
Segmenter classifies it as probabilities, normalised per pixel. float32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def foreground_mean_query(text: Tensor, name_to_class: list[int], has_background: bool) -> Tensor:
    """CLIPer's extra query: the normalised mean of the foreground names' embeddings ``[1, E]``
    (every name when there is no background class)."""
    keep = [i for i, c in enumerate(name_to_class) if not (has_background and c == 0)]
    if not keep:
        keep = list(range(text.shape[0]))
    return F.normalize(text[keep].float().mean(dim=0, keepdim=True), dim=-1)


def cliper_coarse_map(features: Tensor, attention: Tensor, text: Tensor, extra_query: Tensor | None,
                      grid: tuple[int, int], *, logit_scale: float, attention_thr: float) -> Tensor:
    """CLIPer's coarse per-name map ``[B, Q, h, w]`` (float32).

    ``features``: ``[L, B, h*w, E]`` layer-slot patch embeddings (not normalised), the last slot
    last; ``attention``: ``[B, heads, N, N]`` the last slot's attention (class token first);
    ``text``: ``[Q, E]`` unit name embeddings; ``extra_query``: ``[1, E]`` queried in the softmax
    and then dropped (None: no extra query)."""
    _, b, n, _ = features.shape
    queries = text.float() if extra_query is None else torch.cat([text.float(), extra_query.float()])
    emb = F.normalize(features.float(), dim=-1)
    probs = torch.softmax(emb @ queries.T * logit_scale, dim=-1)[..., : text.shape[0]]  # [L, B, h*w, Q]
    probs = probs.transpose(-1, -2).contiguous()  # [L, B, Q, h*w]
    last = probs[-1]
    last[last < last.amax(dim=-1, keepdim=True) * attention_thr] = 0.0  # in place: the mean sees it
    propagate = attention.float().mean(dim=1)[:, 1:, 1:]  # [B, h*w, h*w]
    if propagate.shape[-1] != n:
        raise ValueError(f"attention over {propagate.shape[-1]} patches for {n} patch features")
    coarse = torch.bmm(last, propagate) + probs.mean(dim=0)  # [B, Q, h*w]
    return coarse.reshape(b, -1, *grid)


__all__ = ["cliper_coarse_map", "foreground_mean_query"]
