"""SC-CLIP's and ResCLIP's numerics, each held against our own transcription of the reference code
(``SuleBai/SC-CLIP`` 0417ba9 ``clip/model.py``; ``yvhangyang/ResCLIP`` 0e085f7 ``clip/model.py``), tiny
random models: SC-CLIP's LOF and its 0.95 quantile (where the quantile lands on a sample), the
anomaly repair on square and non-square grids (SC-CLIP's ``(i // h, i % h)`` indexing is right only
on square ones), its calibrated last block and whole forward; ResCLIP's path check (its steps are
counted against the longest pair's), the SFR matrix, the patch labels, the float16 cast of the SFR
matrix and its whole forward."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.models.clip import ClipBackbone, sdpa_block
from s2clip_cli.models.factory import load_models
from s2clip_cli.pipeline import resclip, scclip
from s2clip_cli.pipeline.resclip import (
    ResclipParams,
    early_pass,
    entity_paths,
    first_pass_labels,
    patch_labels,
    resclip_features,
    sfr_logits,
    sfr_matrix,
)
from s2clip_cli.pipeline.scclip import (
    ScclipParams,
    calibrated_attention,
    calibrated_block,
    lof_outliers,
    lof_scores,
    outlier_mask,
    repair_anomalies,
    scclip_features,
)


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_models("ViT-B/16", None, None, mode="tiny").clip


# ============================================================================ SC-CLIP, transcribed
def lof_pytorch(x: torch.Tensor, n_neighbors: int = 30, contamination: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """SC-CLIP's ``lof_pytorch``."""
    distances = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
    knn_distances, knn_indices = torch.topk(distances, k=n_neighbors + 1, largest=False)
    knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]
    k_distances = knn_distances[:, -1].unsqueeze(1).expand_as(knn_distances)
    reach_distances = torch.max(knn_distances, k_distances)
    lrd = n_neighbors / torch.nan_to_num(reach_distances.mean(dim=1), nan=1e-6)
    lof = (lrd[knn_indices] / lrd.unsqueeze(1)).mean(dim=1)
    threshold = torch.quantile(lof.to(torch.float32), 1 - contamination)
    return torch.where(lof > threshold)[0], lof


def mean_interpolation(feature_map: torch.Tensor, top_indices: list[tuple[int, int]]) -> torch.Tensor:
    """SC-CLIP's ``mean_interpolation`` of a ``[1, C, H, W]`` map at (row, col) indices."""
    _, c, h, w = feature_map.shape
    kernel = torch.ones(c, 1, 3, 3)
    kernel[:, 0, 1, 1] = 0
    mask = torch.ones((h, w))
    indices = torch.tensor(top_indices, dtype=torch.long)
    mask[indices[:, 0], indices[:, 1]] = 0
    mask = mask[None, None]
    neighbor_sum = F.conv2d(F.pad(feature_map * mask, (1, 1, 1, 1)), kernel, groups=c)
    valid_neighbors = F.conv2d(F.pad(mask, (1, 1, 1, 1)), kernel[:, :1], groups=1)
    valid_mask = (valid_neighbors > 0).float()
    safe = valid_neighbors.clone()
    safe[safe == 0] = 1
    top = torch.zeros((h, w))
    top[indices[:, 0], indices[:, 1]] = 1
    update = top[None, None] * valid_mask
    return feature_map * (1 - update) + neighbor_sum / safe * update


def scclip_custom_attn(attn_layer: torch.nn.MultiheadAttention, x: torch.Tensor, mid_simi: torch.Tensor) -> torch.Tensor:
    """SC-CLIP's ``custom_attn`` on ``x`` ``[N, B, D]`` (LND)."""
    num_heads = attn_layer.num_heads
    _, bsz, embed_dim = x.size()
    head_dim = embed_dim // num_heads
    _, k, v = F.linear(x, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    k = k.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * num_heads, head_dim).transpose(0, 1)
    mid = (mid_simi - torch.mean(mid_simi)) * 3.0
    mid[mid < 0.0] = float("-inf")
    weights = F.softmax(mid.repeat(num_heads, 1, 1), dim=-1)
    weights += F.softmax(torch.bmm(k, k.transpose(1, 2)) * head_dim**-0.5, dim=-1)
    weights /= 2
    out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, embed_dim)
    return attn_layer.out_proj(out)


def adaptively_aggregate(feats: torch.Tensor, corrs: torch.Tensor) -> torch.Tensor:
    normalized = corrs / (corrs.sum(dim=-1, keepdim=True) + 1e-6)
    return torch.matmul(normalized, feats.permute(1, 0, 2)).permute(1, 0, 2)


def scclip_forward(clip: ClipBackbone, image: torch.Tensor, pre: int, post: int, start: int, end: int,
                   res_cls: float = 0.3, beta: float = 0.4) -> torch.Tensor:
    """SC-CLIP's ``VisionTransformer.forward(return_all=True)`` for one image, patch tokens only, with
    the outliers indexed row-major on the image's own grid, ``(i // w, i % w)``."""
    gh, gw = image.shape[-2] // clip.patch_size, image.shape[-1] // clip.patch_size
    width = clip.visual.transformer.width
    x = clip.embed(image)
    feats_list = []
    for block in list(clip.visual.transformer.resblocks)[:-1]:
        x = sdpa_block(block, x)
        feats_list.append(x.permute(1, 0, 2))  # LND, as SC-CLIP
    x = feats_list[-1]
    cls_token = x[:1]
    outliers, _ = lof_pytorch(x[1:].squeeze(1))
    top = [(int(i) // gw, int(i) % gw) for i in outliers]
    fmap = mean_interpolation(x[1:].permute(1, 2, 0).reshape(1, width, gh, gw), top)
    x = fmap.reshape(1, width, gh * gw).permute(2, 0, 1)
    feats = mean_interpolation(feats_list[pre][1:].clone().permute(1, 2, 0).reshape(1, width, gh, gw), top)
    feats = feats.reshape(1, width, gh * gw).permute(2, 0, 1)
    feats = feats / feats.norm(dim=2, keepdim=True)
    before = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    mid = before.clone()
    before[before < beta] = 0.0
    x = adaptively_aggregate(x, before)
    last = clip.visual.transformer.resblocks[-1]
    x = scclip_custom_attn(last.attn, last.ln_1(x), mid) + res_cls * cls_token
    feats = feats_list[post][1:].clone()
    feats = feats / feats.norm(dim=2, keepdim=True)
    after = torch.matmul(feats.permute(1, 0, 2), feats.permute(1, 2, 0))
    after[after < beta] = 0.0
    x = adaptively_aggregate(x, after)
    re_feats = torch.zeros_like(feats_list[0])
    for i in range(start, end):
        re_feats += feats_list[i]
    re = scclip_custom_attn(last.attn, last.ln_1(re_feats[1:]), mid) + res_cls * re_feats[:1]
    x = x + adaptively_aggregate(re, after)
    return clip.visual.ln_post(x.permute(1, 0, 2)) @ clip.visual.proj


# ------------------------------------------------------------------------------ SC-CLIP: LOF
def test_lof_equals_sc_clips_bit_for_bit_and_chunking_changes_no_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(70, 24, generator=gen)
    tokens[[3, 40]] *= 6  # two clear anomalies
    ref_outliers, ref_scores = lof_pytorch(tokens)
    scores, _ = lof_scores(tokens)
    assert torch.equal(scores, ref_scores)
    assert torch.equal(lof_outliers(tokens), ref_outliers)
    assert {3, 40} <= set(ref_outliers.tolist()) and len(ref_outliers) == 4  # the top 5 % of 70 (above 0.95 q)
    monkeypatch.setattr(scclip, "LOF_CHUNK_BYTES", 3 * 70 * 24 * 4)  # three rows of differences at a time
    assert torch.equal(lof_scores(tokens)[0], ref_scores)


def test_where_the_quantile_lands_on_a_sample_its_last_bit_decides() -> None:
    """With 41 scores the 0.95 quantile sits at position 0.95·40 = 38 — on a sample. torch.quantile's
    float32 interpolation lands just below that score, so it is an outlier (3 in all); a float64
    quantile lands on it, and strictly-above leaves it out (2). Which tokens SC-CLIP repairs depends on
    that last bit, so ours keeps torch.quantile's arithmetic (q = 1 − 0.05, float32 scores, '>')."""
    scores = torch.rand(41, generator=torch.Generator().manual_seed(41))
    threshold = torch.quantile(scores, 1 - 0.05)
    assert threshold.item() < scores.sort().values[38].item()
    assert int((scores > threshold).sum()) == 3
    as_double = scores.double().numpy()
    assert int((as_double > np.quantile(as_double, 0.95)).sum()) == 2
    # The LOF on grids where the quantile lands on a sample (9 x 9, 21 x 21) and where it does not
    # (14 x 14): ours and SC-CLIP's pick the same tokens.
    gen = torch.Generator().manual_seed(1)
    for n in (81, 441, 196):
        tokens = torch.randn(n, 16, generator=gen)
        assert torch.equal(lof_outliers(tokens), lof_pytorch(tokens)[0])


def test_small_grids_use_fewer_neighbours_where_sc_clip_fails() -> None:
    tokens = torch.randn(12, 8)
    with pytest.raises(RuntimeError):
        lof_pytorch(tokens)  # topk(k=31) of 12 tokens
    assert torch.equal(lof_outliers(tokens), lof_pytorch(tokens, n_neighbors=11)[0])
    assert lof_outliers(tokens[:1]).numel() == 0


# ------------------------------------------------------------------------------ SC-CLIP: repair
def test_repair_equals_mean_interpolation_on_a_square_grid() -> None:
    gen = torch.Generator().manual_seed(2)
    fmap = torch.randn(1, 6, 5, 5, generator=gen)
    top = [(0, 0), (0, 1), (2, 2), (4, 3)]  # a corner, its neighbour, the centre, a border
    expected = mean_interpolation(fmap, top)
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    for r, c in top:
        mask[0, r, c] = True
    ours = repair_anomalies(fmap.reshape(1, 6, 25).transpose(1, 2), mask, (5, 5))
    assert torch.equal(ours.transpose(1, 2).reshape(1, 6, 5, 5), expected)
    # An outlier all of whose neighbours are outliers keeps its value.
    alone = torch.ones(1, 3, 3, dtype=torch.bool)
    tokens = torch.randn(1, 9, 4)
    assert torch.equal(repair_anomalies(tokens, alone, (3, 3)), tokens)


def test_non_square_grids_index_outliers_row_major() -> None:
    """SC-CLIP's ``(i // h, i % h)`` names the right patch only when h == w: on a 3 x 5 grid token 14
    (row 2, column 4) becomes (4, 2) — outside the 3 rows (IndexError) — and token 7 (row 1, column 2)
    becomes (2, 1), another patch."""
    h, w = 3, 5
    assert (14 // h, 14 % h) == (4, 2) and (7 // h, 7 % h) == (2, 1)
    with pytest.raises(IndexError):
        mean_interpolation(torch.randn(1, 2, h, w), [(14 // h, 14 % h)])
    mask = outlier_mask(torch.tensor([7, 14]), (h, w))
    assert mask.nonzero().tolist() == [[1, 2], [2, 4]]
    gen = torch.Generator().manual_seed(3)
    fmap = torch.randn(1, 4, h, w, generator=gen)
    expected = mean_interpolation(fmap, [(1, 2), (2, 4)])
    ours = repair_anomalies(fmap.reshape(1, 4, h * w).transpose(1, 2), mask[None], (h, w))
    assert torch.equal(ours.transpose(1, 2).reshape(1, 4, h, w), expected)


# ------------------------------------------------------------------------------ SC-CLIP: last block and forward
def test_calibrated_block_equals_custom_attn(clip: ClipBackbone) -> None:
    gen = torch.Generator().manual_seed(4)
    width = clip.visual.transformer.width
    stream = torch.randn(2, 12, width, generator=gen)
    mid = F.normalize(torch.randn(2, 12, 7, generator=gen), dim=-1)
    mid = mid @ mid.transpose(1, 2)
    last = clip.visual.transformer.resblocks[-1]
    with torch.no_grad():
        ours = calibrated_block(last, stream, calibrated_attention(mid))
        for b in range(2):  # SC-CLIP runs one window at a time: the mean of S is the window's own
            ref = scclip_custom_attn(last.attn, last.ln_1(stream[b : b + 1].transpose(0, 1)), mid[b : b + 1])
            torch.testing.assert_close(ours[b], ref[:, 0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(112, 112), (96, 128), (128, 96)])
def test_scclip_features_equal_sc_clips_forward(clip: ClipBackbone, size: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, *size, generator=gen)
    # On 6 blocks the 12-block indices scale: pre 8 -> 4, post 3 -> 1, multi-level 3..9 -> 1..4.
    with torch.no_grad():
        ours = scclip_features(clip, images)
        for b in range(2):
            ref = scclip_forward(clip, images[b : b + 1], pre=4, post=1, start=1, end=5)
            torch.testing.assert_close(ours[b], ref[0], rtol=1e-5, atol=1e-6)
    grid = (size[0] // 16, size[1] // 16)
    assert ours.shape == (2, grid[0] * grid[1], clip.embed_dim)
    # The knobs matter: another res_cls gives other features.
    with torch.no_grad():
        other = scclip_features(clip, images, ScclipParams(res_cls=0.5))
    assert (other - ours).abs().max().item() > 1e-3


# ============================================================================ ResCLIP, transcribed
def check_path(start_coords: torch.Tensor, end_coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ResCLIP's ``VisionTransformer.check_path``."""
    steps = torch.max(torch.abs(end_coords - start_coords), dim=1)[0]
    max_steps = steps.max().item()
    t = torch.linspace(0, 1, steps=max_steps + 1).unsqueeze(1).unsqueeze(0)
    current = (start_coords.unsqueeze(1) * (1 - t) + end_coords.unsqueeze(1) * t).round().long()
    valid_steps = torch.arange(max_steps + 1).unsqueeze(0) <= steps.unsqueeze(1)
    start_values = labels[start_coords[:, 0], start_coords[:, 1]].unsqueeze(1)
    current_values = labels[current[:, :, 0], current[:, :, 1]]
    return ((current_values == start_values) | ~valid_steps).all(dim=1)


def generate_attention_sfr(labels: torch.Tensor, std: float, delete_same_entity: bool) -> torch.Tensor:
    """ResCLIP's ``generate_attention_sfr`` (its Del_DelDecay strategy)."""
    h, w = labels.shape
    total = h * w
    sfr = torch.zeros((total + 1, total + 1))
    idx = torch.arange(total)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    i_w, i_h = torch.div(i, w, rounding_mode="floor"), i % w
    j_w, j_h = torch.div(j, w, rounding_mode="floor"), j % w
    sfr[1:, 1:] = (labels[i_w, i_h] == labels[j_w, j_h]).float()
    sfr.diagonal().fill_(1)
    sfr[0, :] = 0
    sfr[:, 0] = 0
    non_cls = sfr[1:, 1:]
    if delete_same_entity:
        start = torch.stack((i_w, i_h), dim=-1).view(-1, 2)
        end = torch.stack((j_w, j_h), dim=-1).view(-1, 2)
        valid = check_path(start, end, labels).view(total, total)
        steps = torch.max(torch.abs(end - start), dim=1)[0]
        max_steps = steps.max().item()
        decay = torch.exp(-steps.view(total, total) / max_steps)
        non_cls = torch.where(valid, non_cls, non_cls * decay)
    size = min(total, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size) - size // 2
    gauss = torch.exp(-(x**2) / (2 * std**2))
    blurred = F.conv1d(non_cls.unsqueeze(1), (gauss / gauss.sum()).view(1, 1, -1), padding=size // 2).squeeze(1)
    blurred = F.relu(blurred)
    sfr[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return sfr


def create_patch_matrix(probs: torch.Tensor, grid: tuple[int, int], temp_thd: float, patch: int) -> torch.Tensor:
    """ResCLIP's ``create_patch_matrix`` for one ``[Q, H, W]`` map."""
    pred = probs.argmax(0, keepdim=True)
    pred[probs.max(0, keepdim=True)[0] < temp_thd] = 0
    pred = pred.squeeze(0)
    patches = pred.unfold(0, patch, patch).unfold(1, patch, patch).reshape(grid[0], grid[1], -1)
    return torch.mode(patches, dim=-1)[0]


def naclip_addition(h: int, w: int, std: float) -> torch.Tensor:
    """ResCLIP's (= NACLIP's) ``gaussian_window`` + ``get_attention_addition``, class token included."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (2 * h - 1, 2 * w - 1):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + (dim - 1)) * constant, steps=dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(h), torch.eye(w)).permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, h, w).unsqueeze(1), window[None, None], padding="same").squeeze(1).view(h * w, h * w)
    return F.pad(out, (1, 0, 1, 0))


def resclip_forward(clip: ClipBackbone, image: torch.Tensor, text: torch.Tensor, *, logit_scale: float,
                    temp_thd: float, rcs_w: tuple[float, float], sfr_w: tuple[float, float], rcs_blocks: range,
                    std: float = 5.0, sfr_half: bool = False) -> torch.Tensor:
    """ResCLIP's ``VisionTransformer.forward`` (arch wo_resi, attention resclip, return_all) for one
    normalised image ``[1, 3, H, W]`` (H, W multiples of the patch size), patch tokens only; the first
    pass's PAMR is ours (tests/test_pamr.py holds it against 1-stage-wseg's)."""
    from s2clip_cli.refine.pamr import pamr

    p = clip.patch_size
    gh, gw = image.shape[-2] // p, image.shape[-1] // p
    last = clip.visual.transformer.resblocks[-1]
    omega = naclip_addition(gh, gw, std)[None]
    x = clip.embed(image)
    maps = []
    for i, block in enumerate(list(clip.visual.transformer.resblocks)[:-1]):
        xl = block.ln_1(x).transpose(0, 1)  # LND
        n, bsz, d = xl.shape
        heads = block.attn.num_heads
        q, k, _ = F.linear(xl, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        q = q.contiguous().view(-1, bsz * heads, d // heads).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * heads, d // heads).transpose(0, 1)
        attn = F.softmax(torch.bmm(q * (d // heads) ** -0.5, k.transpose(1, 2)), dim=-1)
        if i in rcs_blocks:
            maps.append(attn)
        x = sdpa_block(block, x)
    rcs = torch.stack(maps).mean(dim=0)

    def custom_attn(xl: torch.Tensor, sfr: torch.Tensor | None) -> torch.Tensor:
        n, bsz, d = xl.shape
        heads = last.attn.num_heads
        hd = d // heads
        _, k, v = F.linear(xl, last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
        k = k.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * heads, hd).transpose(0, 1)
        weights = torch.bmm(k, k.transpose(1, 2)) * hd**-0.5
        if sfr is not None:
            sfr = sfr / torch.max(sfr)
            if sfr_half:
                sfr = sfr.to(torch.float16)
            weights = sfr_w[0] * ((1 - sfr_w[1]) * weights + sfr_w[1] * sfr)
        weights += omega
        weights = F.softmax(weights, dim=-1)
        weights = rcs_w[0] * ((1 - rcs_w[1]) * weights + rcs_w[1] * rcs)
        out = torch.bmm(weights, v).transpose(0, 1).contiguous().view(-1, bsz, d)
        return last.attn.out_proj(out)

    xl = last.ln_1(x).transpose(0, 1)
    first = clip.visual.ln_post(custom_attn(xl, None).permute(1, 0, 2)) @ clip.visual.proj
    feats = first[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = (feats @ text.T).permute(0, 2, 1).reshape(1, -1, gh, gw)
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    logits = pamr(image, logits, iterations=10, dilations=(8, 16))
    probs = torch.softmax(logits[0] * logit_scale, dim=0)
    sfr = generate_attention_sfr(create_patch_matrix(probs, (gh, gw), temp_thd, p), std, True)[None]
    out = clip.visual.ln_post(custom_attn(xl, sfr).permute(1, 0, 2)) @ clip.visual.proj
    return out[0, 1:]


# ------------------------------------------------------------------------------ ResCLIP: SFR pieces
@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2)])
def test_entity_paths_equal_check_path_and_count_steps_against_the_longest_pair(
        grid: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(6)
    labels = torch.randint(0, 3, grid, generator=gen)
    h, w = grid
    idx = torch.arange(h * w)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    start = torch.stack((i // w, i % w), dim=-1).view(-1, 2)
    end = torch.stack((j // w, j % w), dim=-1).view(-1, 2)
    expected = check_path(start, end, labels).view(h * w, h * w)
    assert torch.equal(entity_paths(labels), expected)
    monkeypatch.setattr(resclip, "PATH_CHUNK_POINTS", 7)  # one start patch per chunk
    assert torch.equal(entity_paths(labels), expected)
    # ResCLIP's points are k / S along the segment, S the longest pair's steps: a neighbour pair
    # (1 step) is checked at t = 0 and 1/S only, so a differing neighbour still passes when S > 1.
    row = torch.tensor([[0, 1, 1, 1]])
    assert bool(entity_paths(row)[0, 1])  # label 0 -> label 1, yet "valid"


@pytest.mark.parametrize("delete_same_entity", [True, False])
@pytest.mark.parametrize("grid", [(5, 5), (4, 7)])
def test_sfr_matrix_equals_generate_attention_sfr(grid: tuple[int, int], delete_same_entity: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, grid, generator=gen)
    expected = generate_attention_sfr(labels, 5.0, delete_same_entity)
    ours = sfr_matrix(labels, 5.0, delete_same_entity=delete_same_entity)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    assert bool((ours[0] == 0).all() and (ours[:, 0] == 0).all())
    torch.testing.assert_close(ours[1:].sum(dim=1), torch.ones(grid[0] * grid[1]))


def test_patch_labels_equal_create_patch_matrix_with_a_remainder() -> None:
    gen = torch.Generator().manual_seed(8)
    probs = torch.softmax(torch.randn(2, 5, 37, 50, generator=gen) * 3, dim=1)  # 37 x 50: remainders 5 and 2
    ours = patch_labels(probs, 0.4, 16, (2, 3))
    for b in range(2):
        assert torch.equal(ours[b], create_patch_matrix(probs[b], (2, 3), 0.4, 16))
    assert bool((patch_labels(probs, 1.01, 16, (2, 3)) == 0).all())  # every pixel under temp_thd -> name 0


def test_the_float16_cast_of_the_sfr_matrix_is_reproduced_on_request() -> None:
    gen = torch.Generator().manual_seed(9)
    keys = torch.randn(1, 2, 6, 6, generator=gen)
    sfr = torch.rand(1, 6, 6, generator=gen) / 3
    weights = (2.2, 0.7)
    # ResCLIP: attn_sfr / max -> float16; λ·attn_sfr is float16; the float32 logits promote the sum.
    half = (sfr / sfr.max()).to(torch.float16)
    expected = weights[0] * ((1 - weights[1]) * keys + weights[1] * half)
    assert expected.dtype == torch.float32
    assert torch.equal(sfr_logits(keys, sfr, weights, half=True), expected)
    full = sfr_logits(keys, sfr, weights)
    gap = (full - expected).abs().max().item()
    assert 0 < gap < 2.2 * 0.7 * 2**-11  # float16's rounding of values in [0, 1], scaled by τ·λ


@pytest.mark.parametrize(("size", "sfr_half"), [((96, 96), False), ((80, 128), True)])
def test_resclip_features_equal_resclip_forward(clip: ClipBackbone, size: tuple[int, int], sfr_half: bool) -> None:
    gen = torch.Generator().manual_seed(10)
    images = torch.randn(2, 3, *size, generator=gen)
    params = ResclipParams(temp_thd=0.2, attn_rcs_weights=(2.0, 0.3), attn_sfr_weights=(2.2, 0.7), sfr_half=sfr_half)
    with torch.no_grad():
        # Name embeddings pointing at a few patches' own features, taken from both images, so that the
        # first pass labels each image's patches differently (random names label every patch of a tiny
        # random CLIP alike).
        tokens = resclip_features(clip, images, F.normalize(torch.randn(6, clip.embed_dim, generator=gen), dim=-1),
                                  logit_scale=40.0, params=params)
        picked = torch.stack([tokens[0, 0], tokens[1, 9], tokens[0, 20], tokens[1, 29]])
        text = F.normalize(picked - tokens.mean((0, 1)), dim=-1)
        early = early_pass(clip, images, [2, 3])
        labels = first_pass_labels(clip, early, images, text, logit_scale=40.0, sigma=5.0, params=params)
        assert all(len(torch.unique(window)) > 1 for window in labels)
        ours = resclip_features(clip, images, text, logit_scale=40.0, params=params)
        for b in range(2):  # 6 blocks: RCS blocks 5..8 of 12 scale to 2..3
            ref = resclip_forward(clip, images[b : b + 1], text, logit_scale=40.0, temp_thd=0.2, rcs_w=(2.0, 0.3),
                                  sfr_w=(2.2, 0.7), rcs_blocks=range(2, 4), sfr_half=sfr_half)
            torch.testing.assert_close(ours[b], ref, rtol=1e-5, atol=1e-6)
        # The first pass's labels matter: with every patch under temp_thd (one label) the features differ.
        flat = resclip_features(clip, images, text, logit_scale=40.0,
                                params=dataclasses.replace(params, temp_thd=1.01))
    assert (flat - ours).abs().max().item() > 1e-4
