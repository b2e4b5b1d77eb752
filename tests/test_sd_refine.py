"""SD refinement (refine/sd_refine.py): propagation, attention capture, the SD pass, application."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models.sd import SDModels, build_sd, make_scheduler
from s2clip_cli.refine.sd_refine import (
    HOOKED_LAYERS,
    STAGES,
    AttentionCapture,
    SDRefiner,
    capture_attention,
    propagate,
    propagate_product,
    sd_attention_maps,
    sd_refine,
    sd_timestep,
)

# ------------------------------------------------------------------------------ reference


def reference_propagate(maps: torch.Tensor, coarse: torch.Tensor, threshold: float) -> np.ndarray:
    """Independent numpy reference: per map (float32, as CLIPer) column max + 1e-5, values below
    the threshold to 0, rows over their sum + 1e-5; then the full product in float64 times coarseᵀ."""
    product = np.eye(maps.shape[1])
    for m in maps.float().numpy():
        m = m / (m.max(axis=0, keepdims=True) + np.float32(1e-5))
        m = np.where(m < np.float32(threshold), np.float32(0), m)
        m = m / (m.sum(axis=1, keepdims=True) + np.float32(1e-5))
        product = product @ m.astype(np.float64)
    return (product @ coarse.double().numpy().T).T


def random_maps(k: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, n, n, generator=g) * 3).softmax(dim=-1).to(dtype)


def assert_rel_close(actual: torch.Tensor, expected: np.ndarray, rel: float = 1e-4) -> None:
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual.double().numpy() - expected).max())
    assert err <= rel * scale, f"max error {err} > {rel} × {scale}"


# ------------------------------------------------------------------------------ propagate


@pytest.mark.parametrize(("k", "n", "t", "threshold"), [(1, 64, 3, 0.0), (3, 100, 5, 0.2), (5, 256, 21, 0.35),
                                                      (10, 144, 2, 0.1)])
def test_propagate_equals_product_form(k: int, n: int, t: int, threshold: float) -> None:
    maps = random_maps(k, n, seed=k + n)
    coarse = torch.rand(t, n)
    out = propagate(maps, coarse, threshold)
    assert out.shape == (t, n) and out.dtype == torch.float32
    expected = reference_propagate(maps, coarse, threshold)
    assert_rel_close(out, expected)
    assert_rel_close(propagate_product(maps, coarse, threshold), expected)


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1000])
def test_propagate_blocked_equals_reference(block_rows: int) -> None:
    maps = random_maps(4, 100, seed=1)
    coarse = torch.rand(6, 100)
    assert_rel_close(propagate(maps, coarse, 0.2, block_rows=block_rows), reference_propagate(maps, coarse, 0.2))


@pytest.mark.parametrize("block_rows", [None, 10])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_propagate_low_precision_maps(dtype: torch.dtype, block_rows: int | None) -> None:
    maps = random_maps(5, 144, seed=2, dtype=dtype)
    coarse = torch.rand(4, 144)
    # CLIPer casts the stored half maps to float32 before normalising: the same reference applies
    assert_rel_close(propagate(maps, coarse, 0.2, block_rows=block_rows), reference_propagate(maps, coarse, 0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_propagate_leaves_maps_unmodified(dtype: torch.dtype) -> None:
    maps = random_maps(3, 64, seed=4, dtype=dtype)
    coarse = torch.rand(2, 64)
    before_maps, before_coarse = maps.clone(), coarse.clone()
    propagate(maps, coarse, 0.2)
    assert torch.equal(maps, before_maps) and torch.equal(coarse, before_coarse)


def test_propagate_keeps_entries_equal_to_the_threshold() -> None:
    # Diagonal 1.0, 0.01 elsewhere (normalised 0.01 < threshold → 0), except one entry in column 0
    # whose normalised value is exactly the threshold in float32.
    maps = torch.full((1, 4, 4), 0.01) + torch.eye(4) * 0.99
    maps[0, 1, 0] = 0.3
    threshold = float(np.float32(0.3) / (np.float32(1.0) + np.float32(1e-5)))
    coarse = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    out = propagate(maps, coarse, threshold)
    expected = reference_propagate(maps, coarse, threshold)
    assert expected[0, 1] > 0.2  # CLIPer keeps it (it drops only values < threshold)
    assert_rel_close(out, expected)


def test_propagate_is_float32_under_autocast() -> None:
    maps = random_maps(3, 64, seed=5)
    coarse = torch.rand(3, 64)
    plain = propagate(maps, coarse, 0.2)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            # bit-exact by construction: propagate leaves autocast, so the same float32 kernels run
            assert torch.equal(propagate(maps, coarse, 0.2), plain)


def test_propagate_rejects_bad_shapes() -> None:
    with pytest.raises(S2ClipError, match=r"\[K, N, N\]"):
        propagate(torch.rand(2, 4, 5), torch.rand(1, 4), 0.2)
    with pytest.raises(S2ClipError, match=r"\[T, 4\]"):
        propagate(torch.rand(2, 4, 4), torch.rand(1, 5), 0.2)


# ------------------------------------------------------------------------------ attention capture


@pytest.fixture(scope="module")
def sd() -> SDModels:
    return build_sd(tiny=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(7).random((48, 72, 3)) * 255).astype(np.uint8)


def _unet_inputs(sd: SDModels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor(101), sd.prompt_embeds


def test_capture_stores_exact_softmax_and_keeps_unet_output(sd: SDModels) -> None:
    latents, t, text = _unet_inputs(sd)
    default = sd.unet(latents, t, encoder_hidden_states=text).sample

    inputs: dict[str, torch.Tensor] = {}
    hooks = [sd.unet.get_submodule(name).register_forward_pre_hook(
        lambda module, args, kwargs, name=name: inputs.__setitem__(name, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for name in HOOKED_LAYERS]
    try:
        with capture_attention(sd.unet) as store:
            for name in HOOKED_LAYERS:
                assert isinstance(sd.unet.get_submodule(name).processor, AttentionCapture)
            captured = sd.unet(latents, t, encoder_hidden_states=text).sample
    finally:
        for hook in hooks:
            hook.remove()

    torch.testing.assert_close(captured, default, rtol=1e-5, atol=1e-5)
    for name in HOOKED_LAYERS:  # processors restored
        assert not isinstance(sd.unet.get_submodule(name).processor, AttentionCapture)
    assert set(store) == set(HOOKED_LAYERS)
    for name in HOOKED_LAYERS:
        attn = sd.unet.get_submodule(name)
        expected = _manual_attention(attn, inputs[name][0])
        assert store[name].shape == (5, 256, 256) and store[name].dtype == torch.float32
        torch.testing.assert_close(store[name], expected, rtol=1e-5, atol=1e-6)


def test_capture_installs_nothing_elsewhere(sd: SDModels) -> None:
    with capture_attention(sd.unet):
        kinds = {name: type(p).__name__ for name, p in sd.unet.attn_processors.items()}
    captured = {name for name, kind in kinds.items() if kind == "AttentionCapture"}
    assert captured == {f"{name}.processor" for name in HOOKED_LAYERS}


def test_unknown_layer_is_an_error(sd: SDModels) -> None:
    with pytest.raises(S2ClipError, match="no attention layer"):
        with capture_attention(sd.unet, ("up_blocks.3.attentions.7.transformer_blocks.0.attn1",)):
            pass


# ------------------------------------------------------------------------------ the SD pass


def _manual_attention(attn: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``[heads, N, N]`` softmax(q kᵀ / √d) of one self-attention module on ``[N, C]`` input."""
    n, heads = hidden.shape[0], attn.heads
    q = attn.to_q(hidden).view(n, heads, -1).transpose(0, 1)
    k = attn.to_k(hidden).view(n, heads, -1).transpose(0, 1)
    return torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5), dim=-1)


def test_attention_maps_shape_order_and_values(sd: SDModels, image: np.ndarray) -> None:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [sd.unet.get_submodule(name).register_forward_pre_hook(
        lambda module, args, kwargs, name=name: inputs.__setitem__(name, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for name in HOOKED_LAYERS]
    try:
        maps = sd_attention_maps(sd, image)
    finally:
        for hook in hooks:
            hook.remove()
    assert maps.shape == (10, 256, 256) and maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(-1), torch.ones(10, 256), rtol=0, atol=1e-5)
    # CLIPer's order: up_blocks[3].attentions[1] heads 0-4, then attentions[0] heads 0-4
    layer1 = "up_blocks.3.attentions.1.transformer_blocks.0.attn1"
    layer0 = "up_blocks.3.attentions.0.transformer_blocks.0.attn1"
    with torch.no_grad():
        for part, name in ((maps[:5], layer1), (maps[5:], layer0)):
            expected = _manual_attention(sd.unet.get_submodule(name), inputs[name][0])
            torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-6)


def test_attention_maps_deterministic_per_seed(sd: SDModels, image: np.ndarray) -> None:
    a = sd_attention_maps(sd, image, seed=0)
    assert torch.equal(a, sd_attention_maps(sd, image, seed=0))
    assert not torch.allclose(a, sd_attention_maps(sd, image, seed=1))


def test_unet_input_is_noised_vae_mean_at_timestep_45(sd: SDModels, image: np.ndarray) -> None:
    seen: dict[str, torch.Tensor] = {}

    def hook(module: object, args: tuple, kwargs: dict) -> None:
        seen["sample"], seen["t"] = args[0].clone(), args[1]
        seen["text"] = kwargs["encoder_hidden_states"]

    handle = sd.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        maps = sd_attention_maps(sd, image, seed=5)
    finally:
        handle.remove()
    # independent reconstruction: nearest resize to 128 (floor(dst·in/out)), [-1, 1], VAE mean × 0.18215
    h, w = image.shape[:2]
    rows = np.floor(np.arange(128) * (h / 128)).astype(int)
    cols = np.floor(np.arange(128) * (w / 128)).astype(int)
    x = torch.from_numpy(image[rows][:, cols].astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        latents = sd.vae.encode(x).latent_dist.mean * 0.18215
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)[101].item()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    expected = alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise
    assert int(seen["t"]) == 101 == int(sd.scheduler.timesteps[45])
    torch.testing.assert_close(seen["sample"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(seen["text"], sd.prompt_embeds)
    assert maps.shape == (10, 256, 256)


def test_timestep_is_read_from_the_scheduler(sd: SDModels) -> None:
    assert int(sd_timestep(sd)) == 101  # PNDM, skip_prk_steps, steps_offset=1
    ddim = make_scheduler({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                           "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                           "set_alpha_to_one": False, "clip_sample": False})
    other = SDModels(vae=sd.vae, unet=sd.unet, scheduler=ddim, prompt_embeds=sd.prompt_embeds, mode="tiny",
                     source="test", image_size=128)
    assert int(sd_timestep(other)) == 81  # DDIM "leading" spacing gives another step for index 45


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_maps_under_cpu_autocast(sd: SDModels, image: np.ndarray, dtype: torch.dtype) -> None:
    plain = sd_attention_maps(sd, image)
    with torch.autocast("cpu", dtype=dtype):
        maps = sd_attention_maps(sd, image)
        refined = sd_refine(torch.softmax(torch.randn(3, 48, 72), 0), maps, 0.2)
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    torch.testing.assert_close(maps, plain, rtol=0, atol=2e-2)
    assert refined.dtype == torch.float32 and torch.isfinite(refined).all()


def test_attention_maps_reject_bad_input(sd: SDModels, image: np.ndarray) -> None:
    with pytest.raises(S2ClipError, match="uint8"):
        sd_attention_maps(sd, image.astype(np.float32))
    with pytest.raises(S2ClipError, match="multiple of 8"):
        sd_attention_maps(sd, image, size=100)


# ------------------------------------------------------------------------------ application


def test_sd_refine_with_identity_maps_returns_the_input() -> None:
    probs = torch.softmax(torch.randn(4, 8, 8) * 2, 0)
    out = sd_refine(probs, torch.eye(64)[None], threshold=0.2)
    torch.testing.assert_close(out, probs, rtol=1e-4, atol=1e-4)


def test_sd_refine_follows_the_documented_steps() -> None:
    maps = random_maps(3, 64, seed=9)
    probs = torch.softmax(torch.randn(5, 20, 30) * 2, 0)
    out = sd_refine(probs, maps, threshold=0.2)
    coarse = F.interpolate(probs[None], size=(8, 8), mode="bilinear", align_corners=False)[0].reshape(5, 64)
    refined = torch.from_numpy(reference_propagate(maps, coarse, 0.2)).float().reshape(5, 8, 8)
    score = 0.5 * refined.amax(dim=(1, 2)) + 0.5 * probs.amax(dim=(1, 2))
    up = F.interpolate(refined[None], size=(20, 30), mode="bilinear", align_corners=False)[0]
    weighted = up / (up.amax(dim=(1, 2), keepdim=True) + 1e-5) * score[:, None, None]
    torch.testing.assert_close(out, weighted / weighted.sum(0, keepdim=True), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.sum(0), torch.ones(20, 30))


def test_sd_refine_keeps_input_where_no_attention_mass_arrives() -> None:
    # Token 0's row is below the threshold everywhere: it receives nothing from any class.
    m = torch.eye(4) * 0.9 + 0.025
    m[0] = torch.tensor([0.01, 0.01, 0.01, 0.01])
    probs = torch.softmax(torch.randn(3, 2, 2), 0)
    out = sd_refine(probs, m[None], threshold=0.5)
    # bit-exact by construction: pixels that receive no mass are copied from the input
    torch.testing.assert_close(out[:, 0, 0], probs[:, 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(out.sum(0), torch.ones(2, 2))


def test_sd_refine_rejects_non_square_token_count() -> None:
    with pytest.raises(S2ClipError, match="square"):
        sd_refine(torch.rand(2, 4, 4), torch.rand(1, 10, 10), 0.2)


def test_refiner_times_its_stages(sd: SDModels, image: np.ndarray) -> None:
    refiner = SDRefiner(sd, threshold=0.2, seed=3)
    probs = torch.softmax(torch.randn(4, 48, 72), 0)
    timings: dict[str, float] = {}
    out = refiner(image, probs, timings)
    assert set(timings) == set(STAGES) and all(v > 0 for v in timings.values())
    expected = sd_refine(probs, sd_attention_maps(sd, image, seed=3), 0.2)
    # bit-exact by construction: the refiner calls these same two functions on the same inputs
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
