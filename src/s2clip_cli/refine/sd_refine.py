"""CLIPer's Stable-Diffusion refinement ("fine-grained compensation"): SD self-attention propagates
the coarse class maps.

Three steps (notes/attention-strategies.md §5):

1. `sd_attention_maps`: one UNet pass of SD-2.1-base on the image, capturing the self-attention
   probabilities of ``up_blocks[3].attentions[1|0].transformer_blocks[0].attn1`` (CLIPer's
   ``attention_layers_to_use: [-4, -6]``) → ``[10, N, N]`` (N = 4096 for a 512 px input).
2. `propagate`: per map, divide each column by its max (+1e-5), zero entries below the threshold,
   renormalise rows (+1e-5); the coarse maps ``[T, N]`` are multiplied by the product of the ten
   normalised maps, ``(M₁·M₂·…·M₁₀ · coarseᵀ)ᵀ`` — applied right to left, never forming the product.
3. `sd_refine`: resize class probabilities to the SD token grid, propagate, resize back, weight by
   CLIPer's class score and renormalise across classes (see its docstring).

`SDRefiner` bundles the models with the settings and times the stages (``vae_encode``, ``unet``,
``propagate``). `propagate_product` is CLIPer's own formulation (it forms P), kept as the reference
the benchmark and the tests compare against.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import S2ClipError
from ..models.sd import SDModels
from ..profiling import StageTimer

# CLIPer's DIFFUSION_LAYERS[-4] then [-6]: the two self-attention layers of the finest up block.
HOOKED_LAYERS = (
    "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
)
NUM_INFERENCE_STEPS = 50
TIMESTEP_INDEX = 45  # index into scheduler.timesteps after set_timesteps(50): t = 101 for SD-2.1-base's PNDM
DEFAULT_THRESHOLD = 0.2  # CLIPer's attention_thr for most datasets (0.1 VOC, 0.35 Cityscapes)
EPS = 1e-5  # CLIPer's guard in the column-max and row-sum divisions
STAGES = ("vae_encode", "unet", "propagate")


# ------------------------------------------------------------------------------ attention capture


class AttentionCapture:
    """A diffusers attention processor (call-compatible with `AttnProcessor`) that computes the
    attention probabilities explicitly — ``attn.get_attention_scores`` with autocast off on float32
    query/key, so the softmax is float32 — stores batch 0's ``[heads, N, N]`` under `key` in `store`
    (cast to `store_dtype`), and returns what the default processor returns."""

    def __init__(self, store: dict[str, Tensor], key: str, store_dtype: torch.dtype) -> None:
        self.store = store
        self.key = key
        self.store_dtype = store_dtype

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any,
                 **kwargs: Any) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None
                                          else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)

        with torch.autocast(query.device.type, enabled=False):
            mask = attention_mask.float() if attention_mask is not None else None
            probs = attn.get_attention_scores(query.float(), key.float(), mask)  # [B·h, Nq, Nk] float32
        out = torch.bmm(probs.to(value.dtype), value)
        out = attn.batch_to_head_dim(out)
        out = attn.to_out[1](attn.to_out[0](out))  # linear projection, dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor

        heads = attn.heads
        self.store[self.key] = probs.view(-1, heads, *probs.shape[1:])[0].to(self.store_dtype)
        return out


@contextmanager
def capture_attention(unet: Any, layer_names: tuple[str, ...] = HOOKED_LAYERS,
                      store_dtype: torch.dtype | None = None) -> Iterator[dict[str, Tensor]]:
    """Install `AttentionCapture` on the named attention modules of `unet` (only those) for the
    duration of the block; yields the dict their maps land in (name → ``[heads, N, N]``). The
    previous processors are restored afterwards. Maps are stored in float16 on CUDA and float32
    elsewhere unless `store_dtype` says otherwise."""
    device = next(unet.parameters()).device
    if store_dtype is None:
        store_dtype = torch.float16 if device.type == "cuda" else torch.float32
    store: dict[str, Tensor] = {}
    previous: dict[str, Any] = {}
    try:
        for name in layer_names:
            try:
                module = unet.get_submodule(name)
            except AttributeError:
                raise S2ClipError(f"the SD UNet has no attention layer {name}") from None
            previous[name] = module.processor
            module.set_processor(AttentionCapture(store, name, store_dtype))
        yield store
    finally:
        for name, processor in previous.items():
            unet.get_submodule(name).set_processor(processor)


# ------------------------------------------------------------------------------ one SD pass


def prepare_image(image: np.ndarray, size: int, device: torch.device) -> Tensor:
    """``[1, 3, size, size]`` float32 in [−1, 1] from an H×W×3 uint8 RGB image, as CLIPer's
    ``image_processor.preprocess(img / 255, height=size, width=size)``: plain `F.interpolate`
    (nearest, aspect ratio not kept), then ``2x − 1``."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise S2ClipError(f"expected an HxWx3 uint8 RGB image, got {getattr(image, 'shape', type(image))} "
                          f"{getattr(image, 'dtype', '')}")
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).to(device).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(x, size=(size, size))
    return x * 2.0 - 1.0


def sd_timestep(sd: SDModels) -> Tensor:
    """The timestep CLIPer uses: ``scheduler.timesteps[45]`` after ``set_timesteps(50)``."""
    sd.scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    timesteps = sd.scheduler.timesteps
    if len(timesteps) <= TIMESTEP_INDEX:
        raise S2ClipError(f"the SD scheduler gives {len(timesteps)} timesteps for {NUM_INFERENCE_STEPS} steps; "
                          f"index {TIMESTEP_INDEX} does not exist")
    return timesteps[TIMESTEP_INDEX]


@torch.no_grad()
def sd_attention_maps(sd: SDModels, image: np.ndarray, *, seed: int = 0, size: int | None = None,
                      timings: dict[str, float] | None = None) -> Tensor:
    """``[10, N, N]`` SD self-attention maps of `image` (H×W×3 uint8 RGB), N = (size/8)².

    Order as CLIPer concatenates them: ``up_blocks[3].attentions[1]`` heads 0–4, then
    ``attentions[0]`` heads 0–4. `size` defaults to the models' image size (512 real → N = 4096).
    Latent = VAE posterior mean × scaling factor; noise from ``torch.Generator().manual_seed(seed)``
    (CPU, float32) added by the scheduler at ``timesteps[45]``; one UNet call with the empty-prompt
    embedding. float16 on CUDA, float32 elsewhere. When `timings` is a dict, seconds for
    ``vae_encode`` and ``unet`` are added to it.
    """
    size = sd.image_size if size is None else int(size)
    factor = sd.latent_factor
    if size < factor or size % factor:
        raise S2ClipError(f"SD input size must be a positive multiple of {factor}, got {size}")
    device, dtype = sd.device, sd.dtype
    stages = StageTimer(device, enabled=timings is not None, times=timings)
    with stages("vae_encode"):
        x = prepare_image(image, size, device).to(dtype)
        latents = sd.vae.encode(x).latent_dist.mean.float() * float(sd.vae.config.scaling_factor)
    with stages("unet"):
        t = sd_timestep(sd)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
        noisy = sd.scheduler.add_noise(latents, noise, t.reshape(1)).to(dtype)
        with capture_attention(sd.unet) as store:
            sd.unet(noisy, t.to(device), encoder_hidden_states=sd.prompt_embeds.to(device, dtype), return_dict=False)
        maps = torch.cat([store[name] for name in HOOKED_LAYERS])
    return maps


# ------------------------------------------------------------------------------ propagation


def _threshold_below(threshold: float) -> float:
    """The largest float32 below float32(`threshold`): ``x > it`` ⇔ ``x >= threshold`` in float32,
    so `torch.threshold_` (which keeps ``x > t``) drops exactly CLIPer's ``x < threshold``."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def _check_propagate_inputs(maps: Tensor, coarse: Tensor) -> None:
    if maps.ndim != 3 or maps.shape[1] != maps.shape[2]:
        raise S2ClipError(f"expected attention maps [K, N, N], got {tuple(maps.shape)}")
    if coarse.ndim != 2 or coarse.shape[1] != maps.shape[1]:
        raise S2ClipError(f"expected coarse maps [T, {maps.shape[1]}], got {tuple(coarse.shape)}")
    if not maps.is_floating_point():
        raise S2ClipError(f"attention maps must be floating point, got {maps.dtype}")


_BUFFER_BYTES = 256 << 20  # the float32 block buffer: the whole map up to N = 8192


def _auto_block_rows(n: int) -> int:
    """Rows per block: the whole map while its float32 copy fits in 256 MiB (fewest passes and
    kernel launches; on the CPU smaller blocks measured no faster), else as many rows as fit."""
    return max(1, min(n, _BUFFER_BYTES // (4 * max(n, 1))))


def propagate(maps: Tensor, coarse: Tensor, threshold: float, *, block_rows: int | None = None) -> Tensor:
    """``[T, N]`` = ``(M₁·M₂·…·M_K · coarseᵀ)ᵀ`` where ``M_k`` is ``maps[k]`` normalised as CLIPer
    does: each column divided by (its max + 1e-5), entries below `threshold` set to 0, each row
    divided by (its sum + 1e-5).

    The product is never formed: the maps are applied right to left to ``X = coarseᵀ`` (``[N, T]``),
    ``X ← M_k X`` for k = K…1, in float32. Per map, one pass takes the column maxima; then, block of
    rows by block, the rows are divided into one reusable float32 buffer, thresholded in place and
    multiplied by ``[X | 1]`` — the ones column yields the row sums from the same GEMM, and the
    row normalisation is applied to the ``[N, T]`` result instead of the ``N×N`` map. Half-precision
    maps processed as one block are converted once into the buffer and normalised there in place.
    `maps` (float32, float16 or bfloat16) is never modified; extra memory is one block (at most one
    ``N×N``) float32 buffer. `block_rows` overrides the block height (default: the whole map up to
    N = 8192). Runs with autocast off.
    """
    _check_propagate_inputs(maps, coarse)
    n, t = maps.shape[1], coarse.shape[0]
    device = maps.device
    rows = _auto_block_rows(n) if block_rows is None else max(1, min(int(block_rows), n))
    thr = _threshold_below(threshold)
    with torch.autocast(device.type, enabled=False), torch.no_grad():
        x = torch.ones(n, t + 1, dtype=torch.float32, device=device)  # [X | 1]
        x[:, :t] = coarse.to(device=device, dtype=torch.float32).T
        y = torch.empty_like(x)
        buf = torch.empty(rows, n, dtype=torch.float32, device=device)
        convert_whole = rows == n and maps.dtype != torch.float32
        for k in range(maps.shape[0] - 1, -1, -1):
            m = maps[k]
            if convert_whole:  # half maps: convert once into the buffer, then work in place
                buf.copy_(m)
                torch.div(buf, buf.amax(dim=0).add_(EPS), out=buf)
                torch.threshold_(buf, thr, 0.0)
                torch.mm(buf, x, out=y)
            else:
                denom = m.amax(dim=0).float().add_(EPS)  # column max + eps, [N]
                for r0 in range(0, n, rows):
                    r1 = min(n, r0 + rows)
                    block = buf[: r1 - r0]
                    torch.div(m[r0:r1], denom, out=block)
                    torch.threshold_(block, thr, 0.0)
                    torch.mm(block, x, out=y[r0:r1])
            # rows: (B X) / (rowsum + eps); the ones column is restored for the next map
            torch.div(y[:, :t], y[:, t:].add_(EPS), out=x[:, :t])
        return x[:, :t].T.contiguous()


def normalise_maps(maps: Tensor, threshold: float) -> Tensor:
    """CLIPer's per-map normalisation on a float32 copy of the whole ``[K, N, N]`` stack."""
    att = maps.float().clone()
    att /= att.amax(dim=-2, keepdim=True) + EPS
    att = torch.where(att < threshold, 0, att)
    att /= att.sum(dim=-1, keepdim=True) + EPS
    return att


def propagate_product(maps: Tensor, coarse: Tensor, threshold: float) -> Tensor:
    """``[T, N]``, CLIPer's way: normalise the stack, form ``P = functools.reduce(matmul, maps, I)``
    (K N³ matmuls), then ``(P · coarseᵀ)ᵀ``. The reference `propagate` is checked against."""
    _check_propagate_inputs(maps, coarse)
    with torch.autocast(maps.device.type, enabled=False), torch.no_grad():
        att = normalise_maps(maps, threshold)
        eye = torch.eye(att.shape[-1], device=att.device, dtype=att.dtype)
        product = functools.reduce(torch.matmul, att, eye)
        return (product @ coarse.to(att.device, torch.float32).T).T


# ------------------------------------------------------------------------------ application


def sd_refine(probs: Tensor, maps: Tensor, threshold: float = DEFAULT_THRESHOLD) -> Tensor:
    """Refine class probabilities ``[C, H, W]`` with SD attention maps ``[K, N, N]``; returns
    refined class probabilities ``[C, H, W]`` (float32, on `probs`' device).

    1. ``coarse`` = `probs` resized bilinearly (align_corners=False) to the g×g token grid,
       g = √N (64 for SD at 512 px), flattened to ``[C, N]``;
    2. ``refined`` = `propagate` (maps, coarse, threshold) → ``[C, g, g]``;
    3. class score ``s_c = 0.5·max(refined_c) + 0.5·max(probs_c)`` (CLIPer's ``final_score``;
       CLIPer takes the second max on its coarse map at CLIP's token grid, here it is taken on the
       given H×W probabilities — the same value up to the upsampling's interpolation);
    4. ``refined`` resized bilinearly to H×W, each class map divided by (its max + 1e-5) and
       multiplied by ``s_c`` (CLIPer's decision maps);
    5. divided by their sum over classes at each pixel, so every pixel's values sum to 1 and the
       argmax is that of step 4. Pixels where every class's value from step 4 is 0 (no attention
       mass reached them) keep their input probabilities.

    CLIPer then removes classes whose score is ≤ its per-dataset ``score_threshold`` and labels
    pixels whose every value is < ``bkg_thre`` as background; those dataset-specific decisions
    are not made here (the pipeline's ``prob_thd`` and SAM refinement act on the result).
    """
    if probs.ndim != 3:
        raise S2ClipError(f"expected class probabilities [C, H, W], got {tuple(probs.shape)}")
    n = maps.shape[-1]
    grid = math.isqrt(n)
    if grid * grid != n:
        raise S2ClipError(f"SD attention maps cover {n} tokens, not a square grid")
    c, height, width = probs.shape
    device = maps.device
    with torch.autocast(device.type, enabled=False), torch.autocast(probs.device.type, enabled=False), \
            torch.no_grad():
        p = probs.to(device=device, dtype=torch.float32)
        coarse = F.interpolate(p[None], size=(grid, grid), mode="bilinear", align_corners=False)[0]
        refined = propagate(maps, coarse.reshape(c, n), threshold).reshape(c, grid, grid)
        score = 0.5 * refined.amax(dim=(-1, -2)) + 0.5 * p.amax(dim=(-1, -2))
        up = F.interpolate(refined[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        up = up / (up.amax(dim=(-1, -2), keepdim=True) + EPS) * score[:, None, None]
        total = up.sum(dim=0, keepdim=True)
        out = torch.where(total > 0, up / total.clamp_min(torch.finfo(torch.float32).tiny), p)
    return out.to(probs.device)


class SDRefiner:
    """SD models plus CLIPer's refinement settings, for the pipeline and `bench-sam`.

    `threshold`: the attention threshold (CLIPer ``attention_thr``). `seed`: the noise seed.
    `size`: SD input size (default: the models' own, 512 px real).
    """

    def __init__(self, sd: SDModels, *, threshold: float = DEFAULT_THRESHOLD, seed: int = 0,
                 size: int | None = None) -> None:
        self.sd = sd
        self.threshold = float(threshold)
        self.seed = int(seed)
        self.size = size

    def attention_maps(self, image: np.ndarray, timings: dict[str, float] | None = None) -> Tensor:
        """``[10, N, N]`` maps of `image` (see `sd_attention_maps`)."""
        return sd_attention_maps(self.sd, image, seed=self.seed, size=self.size, timings=timings)

    def __call__(self, image: np.ndarray, probs: Tensor, timings: dict[str, float] | None = None) -> Tensor:
        """Refined ``[C, H, W]`` probabilities of `image` (H×W×3 uint8) from `probs` ``[C, H, W]``
        (see `sd_refine`). When `timings` is a dict, seconds per stage (``vae_encode``, ``unet``,
        ``propagate`` — the last one covering all of `sd_refine`) are added to it."""
        maps = self.attention_maps(image, timings)
        with StageTimer(maps.device, enabled=timings is not None, times=timings)("propagate"):
            refined = sd_refine(probs, maps, self.threshold)
        return refined
