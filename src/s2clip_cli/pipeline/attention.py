"""Last-block attention strategies of the training-free CLIP family, as one registry.

Every baseline in ``shared/notes/attention-strategies.md`` replaces the attention ``A`` of CLIP's
last block and keeps ``out_proj(A·v)``; they differ in ``A`` (this module's registry), in whether
the block's residual skip and its FFN are kept, and in what else they do (``s2clip_cli.methods``).

``STRATEGIES`` maps a name to an ``AttentionStrategy``; its ``compute`` turns
``AttentionInputs`` (the last block's per-head ``q, k, v`` and whatever extra input the strategy
needs) into an ``AttentionMap``. All attention arithmetic (logits, softmax, normalisations) runs in
float32 with autocast disabled; head_dim^-0.5 is the scale.

=============  =======================================================  ===========================
name           A (per head unless noted)                                reference
=============  =======================================================  ===========================
vanilla        softmax(s·q·kᵀ)                                          CLIP
identity       I (value path only)                                      MaskCLIP
csa            softmax(s·q·qᵀ) + softmax(s·k·kᵀ) (rows sum to 2)        SCLIP
qq / kk / vv   softmax(s·X·Xᵀ), X ∈ {q, k, v}                           ClearCLIP / NACLIP / CLIPer
neighbourhood  softmax(s·k·kᵀ + G), G Gaussian over patch positions     NACLIP
proxy          ProxyCLIP's attention from VFM features, shared by heads ProxyCLIP
fused          CLIPer's normalised sum of blocks 0…L−2's attention      CLIPer
scoped         softmax(τ·S), S = VFM cosines kept within mask regions   CorrCLIP
=============  =======================================================  ===========================

The class token takes part (as query and key) in every strategy except ``proxy``, which — as in
ProxyCLIP — works on patch tokens only, on the VFM's grid: the CLIP values of the patch tokens are
bilinearly resampled (``align_corners=False``) to the VFM grid before ``A·v``, so ``proxy``
outputs live on the (finer) VFM grid. (``fusion.proxy_attention`` takes ``mean(S)`` per window, as
ProxyCLIP's one-window batches do; ``batch_mean=True`` over the batch, as Trident's batch of all
windows of an image; DESIGN step 4.)

``fused`` and CLIPer's in-place quirk: CLIPer's ``custom_attn`` divides the shared sum of early
attention maps by its column sums, then its row sums, *in place*, once for each of the L layer
slots it processes (the rest of the normalisation works on a copy); the slot of the last block's
own input is processed last, so its attention — and the one CLIPer returns for its attention
propagation — has seen L such passes, and layer slot i has seen i + 1. ``fused_attention`` takes
the number of passes explicitly; ``dense_clip_features`` and ``attention_matrix`` default to L
(what CLIPer's last-block features and its propagation use); ``fused_attention_sequence`` yields
the per-slot attentions of CLIPer's all-layer fusion, which ``cliper_layer_features`` runs.

Entry points: ``dense_clip_features`` (one strategy, last block only: the baselines' features);
``attention_matrix`` + ``correlation_tokens`` (an attention applied to any kept stream's value
path, then ``ClipBackbone.project_values``: S2CLIP's hierarchical layers);
``cliper_layer_features`` (CLIPer). A row left without positive entries after the clamp becomes
all-zero instead of CLIPer's NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import BETA, GAMMA
from ..errors import S2ClipError
from ..models.clip import ClipBackbone, sdpa_block
from .fusion import proxy_attention

DEFAULT_SIGMA = 5.0  # NACLIP's Gaussian std, in patches


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class HeadProjections:
    """The last block's ``q, k, v`` per head, float32, each ``[B, heads, N, head_dim]`` (CLS first)."""

    q: Tensor
    k: Tensor
    v: Tensor

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5


@dataclass(frozen=True)
class AttentionInputs:
    """What a strategy may read. ``qkv`` is None only for strategies that do not need it."""

    qkv: HeadProjections | None
    grid: tuple[int, int]  # CLIP patch grid (h, w) of the N − 1 patch tokens
    sigma: float = DEFAULT_SIGMA
    vfm_features: Tensor | None = None  # [B, C, h', w'] (proxy)
    early_attention: Tensor | None = None  # [B, heads, N, N] sum over blocks 0…L−2 (fused)
    fused_passes: int = 1
    beta: float = BETA
    gamma: float = GAMMA
    regions: Tensor | None = None  # [B, h', w'] instance-mask ids on the VFM grid (scoped)


@dataclass(frozen=True)
class AttentionMap:
    """A last-block attention.

    ``weights``: ``[B, heads or 1, M, M]`` float32 (1 = shared by all heads), rows sum to 1 (2 for
    ``csa``; a ``fused`` row may be all zero). ``with_cls``: token 0 of both axes is the class
    token and the other ``M − 1`` are the patches of ``grid``; otherwise the ``M`` tokens are the
    patches of ``grid``. ``grid`` may differ from the CLIP grid (``proxy``: the VFM grid).
    """

    weights: Tensor
    with_cls: bool
    grid: tuple[int, int]


@dataclass(frozen=True)
class AttentionStrategy:
    """One registry entry: how to compute ``A`` and what it needs."""

    name: str
    summary: str
    compute: Callable[[AttentionInputs], AttentionMap]
    needs_qkv: bool = True
    needs_vfm: bool = False
    needs_early_attention: bool = False
    with_cls: bool = True  # False: patch tokens only (no residual/FFN possible on the CLIP stream)


# ---------------------------------------------------------------------------------------- maths
def _softmax_self(x: Tensor, scale: float) -> Tensor:
    return torch.softmax(torch.matmul(x, x.transpose(-1, -2)) * scale, dim=-1)


def gaussian_addition(grid: tuple[int, int], sigma: float, *, with_cls: bool = True,
                      device: torch.device | str = "cpu") -> Tensor:
    """NACLIP's additive neighbourhood term ``G[p, p'] = exp(−‖p − p'‖² / 2σ²)`` over patch
    positions (row-major, in patches; peak 1, not normalised), ``[N, N]`` with a zero class-token
    row and column when ``with_cls``."""
    if sigma <= 0:
        raise S2ClipError(f"neighbourhood attention needs a positive sigma, got {sigma}")
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # [h*w, 2]
    dist2 = (pos[:, None, :] - pos[None, :, :]).pow(2).sum(-1)
    gauss = torch.exp(-dist2 / (2.0 * sigma * sigma))
    return F.pad(gauss, (1, 0, 1, 0)) if with_cls else gauss


def fused_attention(attention_sum: Tensor, passes: int = 1) -> Tensor:
    """CLIPer's fused attention from the summed early attention maps ``[..., N, N]``.

    ``passes`` × (divide by column sums, then by row sums); symmetrise ``(A + Aᵀ)/2``; subtract each
    column's mean; clamp at 0; renormalise rows. float32."""
    if passes < 1:
        raise S2ClipError(f"fused attention needs at least one normalisation pass, got {passes}")
    a = attention_sum.float()
    for _ in range(passes):
        a = _sinkhorn_pass(a)
    return _fused_tail(a)


def fused_attention_sequence(attention_sum: Tensor, count: int) -> Iterator[Tensor]:
    """The attentions CLIPer's ``custom_attn`` hands out on ``count`` successive calls (layer slots
    0…count−1): call i has seen i + 1 in-place normalisation passes."""
    a = attention_sum.float()
    for _ in range(count):
        a = _sinkhorn_pass(a)
        yield _fused_tail(a)


def _sinkhorn_pass(a: Tensor) -> Tensor:
    a = a / a.sum(dim=-2, keepdim=True)
    return a / a.sum(dim=-1, keepdim=True)


def _fused_tail(a: Tensor) -> Tensor:
    a = (a + a.transpose(-1, -2)) / 2
    a = (a - a.mean(dim=-2, keepdim=True)).clamp_min(0)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)


def head_attention(x_normed: Tensor, attn: nn.MultiheadAttention) -> Tensor:
    """Per-head ``softmax(s·q·kᵀ)`` ``[B, heads, N, N]`` (float32) of a block's own attention on its
    normalised input ``[B, N, D]``."""
    qkv = _heads(x_normed, attn)
    with _fp32(qkv.q):
        return torch.softmax(torch.matmul(qkv.q, qkv.k.transpose(-1, -2)) * qkv.scale, dim=-1)


# ---------------------------------------------------------------------------------------- strategies
def _need_qkv(inputs: AttentionInputs, name: str) -> HeadProjections:
    if inputs.qkv is None:
        raise S2ClipError(f"attention strategy {name!r} needs the last block's q, k, v")
    return inputs.qkv


def _vanilla(inputs: AttentionInputs) -> AttentionMap:
    p = _need_qkv(inputs, "vanilla")
    weights = torch.softmax(torch.matmul(p.q, p.k.transpose(-1, -2)) * p.scale, dim=-1)
    return AttentionMap(weights, True, inputs.grid)


def _identity(inputs: AttentionInputs) -> AttentionMap:
    p = _need_qkv(inputs, "identity")
    b, _, n, _ = p.v.shape
    eye = torch.eye(n, dtype=torch.float32, device=p.v.device)
    return AttentionMap(eye.expand(b, 1, n, n), True, inputs.grid)


def _csa(inputs: AttentionInputs) -> AttentionMap:
    p = _need_qkv(inputs, "csa")
    return AttentionMap(_softmax_self(p.q, p.scale) + _softmax_self(p.k, p.scale), True, inputs.grid)


def _self_self(which: str) -> Callable[[AttentionInputs], AttentionMap]:
    def compute(inputs: AttentionInputs) -> AttentionMap:
        p = _need_qkv(inputs, which * 2)
        return AttentionMap(_softmax_self(getattr(p, which), p.scale), True, inputs.grid)

    return compute


def _neighbourhood(inputs: AttentionInputs) -> AttentionMap:
    p = _need_qkv(inputs, "neighbourhood")
    gauss = gaussian_addition(inputs.grid, inputs.sigma, device=p.k.device)
    logits = torch.matmul(p.k, p.k.transpose(-1, -2)) * p.scale + gauss
    return AttentionMap(torch.softmax(logits, dim=-1), True, inputs.grid)


def _proxy(inputs: AttentionInputs) -> AttentionMap:
    if inputs.vfm_features is None:
        raise S2ClipError("attention strategy 'proxy' needs VFM features (vfm_features=[B, C, h, w])")
    feats = inputs.vfm_features
    weights = proxy_attention(feats.float(), inputs.beta, inputs.gamma)  # [B, M, M]
    return AttentionMap(weights.unsqueeze(1), False, (int(feats.shape[-2]), int(feats.shape[-1])))


def _scoped(inputs: AttentionInputs) -> AttentionMap:
    from .corrclip import scoped_attention

    if inputs.vfm_features is None or inputs.regions is None:
        raise S2ClipError("attention strategy 'scoped' needs VFM features and instance-mask regions on their grid")
    feats = inputs.vfm_features
    weights = scoped_attention(feats.float(), inputs.regions)  # [B, M, M]
    return AttentionMap(weights.unsqueeze(1), False, (int(feats.shape[-2]), int(feats.shape[-1])))


def _fused(inputs: AttentionInputs) -> AttentionMap:
    if inputs.early_attention is None:
        raise S2ClipError("attention strategy 'fused' needs the summed attention maps of blocks 0…L−2")
    return AttentionMap(fused_attention(inputs.early_attention, inputs.fused_passes), True, inputs.grid)


STRATEGIES: dict[str, AttentionStrategy] = {
    s.name: s
    for s in [
        AttentionStrategy("vanilla", "softmax(s·q·kᵀ): CLIP's own attention", _vanilla),
        AttentionStrategy("identity", "identity: value path only (MaskCLIP)", _identity),
        AttentionStrategy("csa", "softmax(s·q·qᵀ) + softmax(s·k·kᵀ) (SCLIP)", _csa),
        AttentionStrategy("qq", "softmax(s·q·qᵀ) (ClearCLIP)", _self_self("q")),
        AttentionStrategy("kk", "softmax(s·k·kᵀ)", _self_self("k")),
        AttentionStrategy("vv", "softmax(s·v·vᵀ)", _self_self("v")),
        AttentionStrategy("neighbourhood", "softmax(s·k·kᵀ + Gaussian over patch positions) (NACLIP)",
                          _neighbourhood),
        AttentionStrategy("proxy", "VFM cosine similarity, γ(S − β·mean S), negatives masked (ProxyCLIP)",
                          _proxy, needs_qkv=False, needs_vfm=True, with_cls=False),
        AttentionStrategy("fused", "normalised sum of blocks 0…L−2's attention (CLIPer)", _fused,
                          needs_qkv=False, needs_early_attention=True),
        AttentionStrategy("scoped", "softmax(τ·S) of VFM q+k cosines, kept within instance-mask regions (CorrCLIP)",
                          _scoped, needs_qkv=False, needs_vfm=True, with_cls=False),
    ]
}


def get_strategy(name: str) -> AttentionStrategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise S2ClipError(f"unknown attention strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None


# ---------------------------------------------------------------------------------------- model plumbing
def _fp32(like: Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled on ``like``'s device, so the attention arithmetic stays float32."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _heads(x_normed: Tensor, attn: nn.MultiheadAttention) -> HeadProjections:
    """``q, k, v`` of ``attn`` on ``x_normed`` ``[B, N, D]``, split per head, float32."""
    b, n, d = x_normed.shape
    qkv = F.linear(x_normed, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.float().view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
    return HeadProjections(q, k, v)


def _backbone(model: nn.Module) -> ClipBackbone:
    if isinstance(model, ClipBackbone):
        return model
    if not hasattr(model, "visual"):
        raise S2ClipError("dense_clip_features needs an open_clip CLIP model or a ClipBackbone")
    return ClipBackbone(model, type(model).__name__)


def _blocks(backbone: ClipBackbone) -> nn.Sequential:
    return backbone.visual.transformer.resblocks


@dataclass
class EarlyPass:
    """Blocks 0…L−2 on a batch: the last block's input and, when asked, their attention."""

    last_input: Tensor  # [B, 1 + h*w, D] residual stream entering the last block
    grid: tuple[int, int]
    attention_sum: Tensor | None  # [B, heads, N, N] float32: Σ_i softmax(s·q_i·k_iᵀ), i = 0…L−2
    block_inputs: list[Tensor] | None  # ln_1^{(i)}(x_i) of blocks 0…L−2 (CLIPer's layer embeddings)


def early_blocks(model: nn.Module, images: Tensor, *, attention_sum: bool = False,
                 block_inputs: bool = False) -> EarlyPass:
    """Run blocks 0…L−2 unchanged (``sdpa_block``) on CLIP-normalised ``images`` ``[B, 3, H, W]``.

    With ``attention_sum`` also sum every block's per-head attention maps (CLS included), as
    CLIPer's early-layer fusion does; with ``block_inputs`` keep each block's ``ln_1`` output."""
    backbone = _backbone(model)
    blocks = _blocks(backbone)
    if not attention_sum and not block_inputs:
        streams = backbone.residual_streams(images, [backbone.num_blocks - 2])
        return EarlyPass(streams.streams[0], streams.grid, None, None)
    p = backbone.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    x = backbone.embed(images)
    total: Tensor | None = None
    kept: list[Tensor] = []
    for block in list(blocks)[:-1]:
        normed = block.ln_1(x)
        if block_inputs:
            kept.append(normed)
        if attention_sum:
            maps = head_attention(normed, block.attn)
            total = maps if total is None else total + maps
        x = sdpa_block(block, x)
    return EarlyPass(x, grid, total, kept if block_inputs else None)


def _check_grid(images: Tensor, patch: int) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise S2ClipError(f"expected images [B, 3, H, W], got {list(images.shape)}")
    h, w = images.shape[-2:]
    if h % patch or w % patch:
        raise S2ClipError(f"image size {h}x{w} is not a multiple of the patch size {patch}")


def attention_matrix(model: nn.Module, strategy: str, last_input: Tensor | None, grid: tuple[int, int], *,
                     sigma: float = DEFAULT_SIGMA, vfm_features: Tensor | None = None,
                     early_attention: Tensor | None = None, fused_passes: int | None = None,
                     beta: float = BETA, gamma: float = GAMMA, regions: Tensor | None = None) -> AttentionMap:
    """The strategy's last-block attention alone.

    ``last_input``: residual stream entering the last block ``[B, 1 + h*w, D]`` (its ``ln_1`` gives
    q, k, v; may be None for ``proxy``/``fused``); ``grid``: the CLIP patch grid. ``fused_passes``
    defaults to the number of blocks (CLIPer's last slot). Apply it to any stream's value path
    with ``correlation_tokens``."""
    entry = get_strategy(strategy)
    backbone = _backbone(model)
    last = _blocks(backbone)[-1]
    qkv = None
    if entry.needs_qkv:
        if last_input is None:
            raise S2ClipError(f"attention strategy {strategy!r} needs the last block's input stream")
        qkv = _heads(last.ln_1(last_input), last.attn)
    inputs = AttentionInputs(
        qkv, grid, sigma=sigma, vfm_features=vfm_features, early_attention=early_attention,
        fused_passes=backbone.num_blocks if fused_passes is None else fused_passes, beta=beta, gamma=gamma,
        regions=regions,
    )
    with _fp32(last.attn.in_proj_weight):
        return entry.compute(inputs)


def _values(stream: Tensor, block: nn.Module) -> Tensor:
    """``v`` of the last block on ``stream`` ``[B, N, D]``, per head ``[B, heads, N, head_dim]``."""
    attn: nn.MultiheadAttention = block.attn
    b, n, d = stream.shape
    w_v = attn.in_proj_weight[2 * d:]
    b_v = attn.in_proj_bias[2 * d:] if attn.in_proj_bias is not None else None
    v = F.linear(block.ln_1(stream), w_v, b_v)
    return v.view(b, n, attn.num_heads, d // attn.num_heads).transpose(1, 2)


def _attend(attention: AttentionMap, v: Tensor, clip_grid: tuple[int, int]) -> Tensor:
    """``A·v`` per head, heads merged: ``[B, M, D]``. Patch-only attentions drop the class token
    and resample the values bilinearly to the attention's grid when it differs from CLIP's."""
    b, heads, _, hd = v.shape
    if not attention.with_cls:
        v = v[:, :, 1:]
        if attention.grid != clip_grid:
            maps = v.transpose(-1, -2).reshape(b * heads, hd, *clip_grid)
            maps = F.interpolate(maps, size=attention.grid, mode="bilinear", align_corners=False)
            v = maps.reshape(b, heads, hd, -1).transpose(-1, -2)
    elif attention.grid != clip_grid:
        raise S2ClipError(f"attention grid {attention.grid} does not match the CLIP grid {clip_grid}")
    if v.shape[2] != attention.weights.shape[-1]:
        raise S2ClipError(f"attention over {attention.weights.shape[-1]} tokens cannot attend {v.shape[2]} values")
    mixed = torch.matmul(attention.weights.to(v.dtype), v)  # [B, heads, M, hd]
    return mixed.transpose(1, 2).reshape(b, mixed.shape[2], heads * hd)


def correlation_tokens(model: nn.Module, attention: AttentionMap, stream: Tensor, clip_grid: tuple[int, int]) -> Tensor:
    """The last block's attention branch with ``attention`` on any ``stream`` ``[B, 1 + h*w, D]``:
    ``out_proj(A·v)``, ``v`` from the last block's ``ln_1`` and value projection. Returns
    ``[B, M, D]`` — class token first when ``attention.with_cls`` — before ``ln_post``/``proj``."""
    last = _blocks(_backbone(model))[-1]
    return last.attn.out_proj(_attend(attention, _values(stream, last), clip_grid))


def dense_clip_features(model: nn.Module, images: Tensor, strategy: str, *, residual: bool = False,
                        ffn: bool = False, sigma: float = DEFAULT_SIGMA, vfm_features: Tensor | None = None,
                        fused_passes: int | None = None, beta: float = BETA, gamma: float = GAMMA,
                        regions: Tensor | None = None) -> Tensor:
    """Dense CLIP patch embeddings with the last block's attention replaced by ``strategy``.

    ``model``: an open_clip ``CLIP`` (or a ``ClipBackbone``); ``images``: CLIP-normalised
    ``[B, 3, H, W]``, H and W multiples of the patch size (the positional embedding is resampled by
    ``ClipBackbone.positional_embedding``). Blocks 0…L−2 run unchanged; the last block outputs
    ``out_proj(A·v)`` (+ its input with ``residual``; + ``ln_2``/MLP with its skip with ``ffn``);
    then ``ln_post`` and ``proj``. Returns ``[B, h*w, E]`` patch tokens (class token dropped), not
    normalised — on the VFM grid ``h'*w'`` for ``proxy`` (needs ``vfm_features`` ``[B, C, h', w']``,
    e.g. DINO's last-layer patch features of the same image) and ``scoped`` (also ``regions``
    ``[B, h', w']``, instance-mask ids on that grid: CorrCLIP's main branch alone).
    """
    entry = get_strategy(strategy)
    backbone = _backbone(model)
    _check_grid(images, backbone.patch_size)
    if entry.needs_vfm and vfm_features is None:
        raise S2ClipError(f"attention strategy {strategy!r} needs VFM features (vfm_features=[B, C, h, w])")
    if (residual or ffn) and not entry.with_cls:
        raise S2ClipError(f"attention strategy {strategy!r} works on patch tokens of another grid: "
                          "it cannot keep the last block's residual or FFN")
    if vfm_features is not None and vfm_features.shape[0] != images.shape[0]:
        raise S2ClipError(f"vfm_features batch {vfm_features.shape[0]} != images batch {images.shape[0]}")
    early = early_blocks(backbone, images, attention_sum=entry.needs_early_attention)
    x, grid = early.last_input, early.grid
    attention = attention_matrix(backbone, strategy, x, grid, sigma=sigma, vfm_features=vfm_features,
                                 early_attention=early.attention_sum, fused_passes=fused_passes,
                                 beta=beta, gamma=gamma, regions=regions)
    last = _blocks(backbone)[-1]
    out = correlation_tokens(backbone, attention, x, grid)
    if residual:
        out = x + getattr(last, "ls_1", nn.Identity())(out)
    if ffn:
        out = out + getattr(last, "ls_2", nn.Identity())(last.mlp(last.ln_2(out)))
    tokens = backbone.project_values(out)
    return tokens[:, 1:] if attention.with_cls else tokens


@dataclass
class LayerFeatures:
    """CLIPer's all-layer fusion: one patch-embedding map per layer slot, and the attention its
    propagation step uses."""

    features: Tensor  # [L, B, h*w, E] not normalised; slot L−1 = dense_clip_features(strategy)
    attention: AttentionMap  # the last slot's attention (CLIPer propagates with its head mean)


def cliper_layer_features(model: nn.Module, images: Tensor, strategy: str = "fused", *,
                          sigma: float = DEFAULT_SIGMA) -> LayerFeatures:
    """CLIPer's ``forward_transformer``: the last block's attention branch (no residual, no FFN),
    then ``ln_post``/``proj``, applied to each of L layer slots — slot i < L−1 holds block i's
    normalised input ``ln_1^{(i)}(x_i)`` (so the last block's ``ln_1`` normalises it again, as in
    CLIPer), slot L−1 the last block's raw input. ``fused``: slot i uses the attention after i + 1
    in-place normalisation passes (module docstring); q/k strategies compute their attention from
    each slot's own input, as CLIPer's ``custom_attn`` does."""
    entry = get_strategy(strategy)
    if not entry.with_cls or entry.needs_vfm:
        raise S2ClipError(f"CLIPer's layer fusion is defined for CLIP-grid strategies, not {strategy!r}")
    backbone = _backbone(model)
    _check_grid(images, backbone.patch_size)
    early = early_blocks(backbone, images, attention_sum=entry.needs_early_attention, block_inputs=True)
    slots = [*(early.block_inputs or []), early.last_input]
    fused = (fused_attention_sequence(early.attention_sum, len(slots))
             if early.attention_sum is not None else None)
    maps: list[Tensor] = []
    attention: AttentionMap | None = None
    for stream in slots:
        if fused is not None:
            attention = AttentionMap(next(fused), True, early.grid)
        else:
            attention = attention_matrix(backbone, strategy, stream, early.grid, sigma=sigma)
        tokens = backbone.project_values(correlation_tokens(backbone, attention, stream, early.grid))
        maps.append(tokens[:, 1:])
    assert attention is not None
    return LayerFeatures(torch.stack(maps), attention)


__all__ = [
    "STRATEGIES", "AttentionInputs", "AttentionMap", "AttentionStrategy", "EarlyPass", "HeadProjections",
    "LayerFeatures", "attention_matrix", "cliper_layer_features", "correlation_tokens", "dense_clip_features", "early_blocks", "fused_attention",
    "fused_attention_sequence", "gaussian_addition", "get_strategy", "head_attention",
]
