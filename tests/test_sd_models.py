"""Stable Diffusion models (models/sd.py): architectures, scheduler, folder resolution and loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models import sd as sdm
from s2clip_cli.models.registry import any_spec
from s2clip_cli.refine.sd_refine import HOOKED_LAYERS, sd_attention_maps

# SD-2's tokenizer layout on the tiny vocabulary: BOS 62, EOS 63, pad "!" = 0.
TINY_VOCAB = {"!": 0, "a</w>": 1, "<|startoftext|>": 62, "<|endoftext|>": 63}


def _write_tokenizer(folder: Path) -> None:
    """A tokenizer folder laid out as the SD-2.1-base repository's (vocab.json, merges.txt, configs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(TINY_VOCAB))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                              "tokenizer_class": "CLIPTokenizer"}))


def _write_tiny_checkpoint(folder: Path) -> None:
    """The tiny models, seeded as `build_sd(tiny=True)` builds them, saved as a diffusers folder."""
    sdm.save_components(sdm.random_components(tiny=True, seed=sdm.SEED), folder)
    _write_tokenizer(folder / "tokenizer")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd-ckpt") / "sd21_base"
    _write_tiny_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sd() -> sdm.SDModels:
    return sdm.build_sd(tiny=True)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(3).random((60, 90, 3)) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------ architectures


def test_registry_knows_sd21_base() -> None:
    spec = any_spec("sd21_base")
    assert spec.family == "sd"
    assert spec.hf_repo == "stabilityai/stable-diffusion-2-1-base"


def test_full_size_configs_build_the_sd21_base_architecture() -> None:
    comps = sdm.random_components(tiny=False, device="meta")  # shapes only, no memory
    counts = [sum(p.numel() for p in m.parameters()) for m in (comps.unet, comps.vae, comps.text_encoder)]
    # Parameter counts of SD-2.x's UNet, VAE and OpenCLIP-H text encoder (23 layers).
    assert counts == [865_910_724, 83_653_863, 340_387_840]
    for name in HOOKED_LAYERS:
        attn = comps.unet.get_submodule(name)
        assert attn.heads == 5 and attn.to_q.in_features == 320 and attn.is_cross_attention is False


def test_tiny_models_have_the_hooked_layers_and_the_real_scheduler(tiny_sd: sdm.SDModels) -> None:
    assert tiny_sd.mode == "tiny" and tiny_sd.is_random
    assert type(tiny_sd.unet.up_blocks[3]).__name__ == "CrossAttnUpBlock2D"
    for name in HOOKED_LAYERS:
        attn = tiny_sd.unet.get_submodule(name)
        assert attn.heads == 5 and attn.is_cross_attention is False
    assert tiny_sd.latent_factor == 8 and tiny_sd.image_size == 128
    sched = tiny_sd.scheduler
    assert type(sched).__name__ == "PNDMScheduler"
    cfg = sched.config
    assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == (
        1000, "scaled_linear", 0.00085, 0.012)
    assert cfg.skip_prk_steps and cfg.steps_offset == 1 and not cfg.set_alpha_to_one
    assert cfg.prediction_type == "epsilon"
    assert tiny_sd.prompt_embeds.shape == (1, 77, 32)
    assert tiny_sd.unet.training is False and not any(p.requires_grad for p in tiny_sd.unet.parameters())


def test_tiny_empty_prompt_is_bos_eos_then_pad() -> None:
    comps = sdm.random_components(tiny=True)
    ids = sdm.fixed_empty_prompt_ids(comps.text_encoder.config)
    assert ids.shape == (1, 77)
    assert ids[0, :3].tolist() == [62, 63, 0] and int(ids[0, 2:].max()) == 0
    expected = comps.text_encoder(ids).last_hidden_state
    built = sdm.build_sd(tiny=True)
    torch.testing.assert_close(built.prompt_embeds, expected)


def test_tiny_is_seeded(tiny_sd: sdm.SDModels) -> None:
    again = sdm.build_sd(tiny=True)
    for a, b in zip(tiny_sd.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(a, b)


def test_build_in_float16_casts_everything() -> None:
    half = sdm.build_sd(tiny=True, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.prompt_embeds.dtype == torch.float16
    assert next(half.vae.parameters()).dtype == torch.float16


def test_tiny_and_random_are_exclusive() -> None:
    with pytest.raises(S2ClipError, match="tiny or random"):
        sdm.build_sd(tiny=True, random=True)


# ------------------------------------------------------------------------------ missing weights


def test_missing_folder_is_one_line_naming_folder_and_command() -> None:
    with pytest.raises(S2ClipError) as info:
        sdm.build_sd()  # tests run offline with an empty weights dir and hub cache
    msg = str(info.value)
    assert "\n" not in msg
    assert str(Path(os.environ["S2CLIP_WEIGHTS_DIR"]) / "sd21_base") in msg
    assert "s2clip models download sd21_base" in msg
    assert "offline" in msg


def test_missing_explicit_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(S2ClipError) as info:
        sdm.build_sd(path=tmp_path / "nowhere")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "s2clip models download sd21_base" in msg


def test_incomplete_folder_names_what_is_missing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickles are not read")
    with pytest.raises(S2ClipError) as info:
        sdm.build_sd(path=folder)
    msg = str(info.value)
    assert "\n" not in msg and str(folder) in msg and "unet/diffusion_pytorch_model.safetensors" in msg


def test_offline_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> Path:
        raise AssertionError("download attempted while offline")

    monkeypatch.setattr(sdm, "download_sd", fail)
    with pytest.raises(S2ClipError, match="offline"):
        sdm.resolve_sd(offline=True)


def test_download_fetches_only_needed_files_fp16_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       tiny_checkpoint: Path) -> None:
    import huggingface_hub

    calls: list[list[str]] = []

    def fake_snapshot_download(**kwargs: object) -> str:
        patterns = list(kwargs["allow_patterns"])  # type: ignore[arg-type]
        calls.append(patterns)
        # the fake repository has no fp16 files: the first (fp16) snapshot lacks the weights
        return str(tmp_path / "empty") if len(calls) == 1 else str(tiny_checkpoint)

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.delenv("S2CLIP_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert sdm.resolve_sd() == tiny_checkpoint
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[0]
    assert "unet/diffusion_pytorch_model.safetensors" in calls[1]
    for patterns in calls:
        assert all(p.split("/")[0] in {*sdm.SUBFOLDERS, "model_index.json"} for p in patterns)


# ------------------------------------------------------------------------------ loading a folder


def _same_maps(a: sdm.SDModels, b: sdm.SDModels, image: np.ndarray) -> None:
    """The loaded weights are the built ones bit for bit (a safetensors round trip copies bytes), so
    that is asserted exactly. The outputs are not: the same weights in other tensors (other memory
    layouts, alignment) let the CPU kernels pick other algorithms and summation orders, which moves
    float32 results by a few ulps (2.6e-6 relative measured on a CI-like machine). The tolerance is
    float32's for a few dozen chained layers, far below any difference a wrong weight would make."""
    for part in ("unet", "vae"):  # the text encoder is not kept: its output is prompt_embeds
        ours, theirs = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), f"{part}.{name}"
    torch.testing.assert_close(a.prompt_embeds, b.prompt_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sd_attention_maps(a, image, size=128), sd_attention_maps(b, image, size=128),
                               rtol=1e-4, atol=1e-6)


def test_tiny_checkpoint_loads_through_the_real_path(tiny_checkpoint: Path, tiny_sd: sdm.SDModels,
                                                     image: np.ndarray) -> None:
    loaded = sdm.build_sd(path=tiny_checkpoint)
    assert loaded.mode == "real" and loaded.source == str(tiny_checkpoint) and loaded.image_size == 512
    assert type(loaded.scheduler).__name__ == "PNDMScheduler"
    # the real tokenizer gives the ids the tiny build fixes, so everything matches exactly
    _same_maps(loaded, tiny_sd, image)


def test_weights_dir_folder_is_found(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S2CLIP_WEIGHTS_DIR", str(tiny_checkpoint.parent))
    found = sdm.locate_sd()
    assert (found.path, found.where) == (tiny_checkpoint, "weights dir")
    assert sdm.build_sd().source == str(tiny_checkpoint)


def test_hub_cache_snapshot_is_found(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     tiny_sd: sdm.SDModels, image: np.ndarray) -> None:
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--stabilityai--stable-diffusion-2-1-base"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found = sdm.locate_sd()
    assert (found.path, found.where) == (repo / "snapshots" / commit, "hf cache")
    _same_maps(sdm.build_sd(), tiny_sd, image)


def test_fp16_variant_files_load(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_checkpoint, folder)
    for sub, stem in (("vae", "diffusion_pytorch_model"), ("unet", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        (folder / sub / f"{stem}.safetensors").rename(folder / sub / f"{stem}.fp16.safetensors")
    loaded = sdm.build_sd(path=folder, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    reference = sdm.build_sd(path=tiny_checkpoint)
    ref = dict(reference.unet.named_parameters())
    for name, param in loaded.unet.named_parameters():
        assert torch.equal(param, ref[name].half())


def test_corrupt_weights_are_one_line_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(S2ClipError) as info:
        sdm.build_sd(path=folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
