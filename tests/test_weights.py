"""Checkpoint resolution and loading, on checkpoint files the tests write themselves."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models import weights
from s2clip_cli.models.clip import build_clip
from s2clip_cli.models.factory import ModelPaths, load_models
from s2clip_cli.models.registry import clip_spec, vfm_spec
from s2clip_cli.models.vfm import build_vfm


@pytest.fixture()
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "weights"
    d.mkdir()
    monkeypatch.setenv("S2CLIP_WEIGHTS_DIR", str(d))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return d


def _hf_cache_entry(hub: Path, repo: str, filename: str) -> Path:
    """Lay out a Hugging Face hub cache entry the way huggingface_hub writes one."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snap = folder / "snapshots" / revision
    snap.mkdir(parents=True)
    return snap / filename


def test_missing_weights_offline_is_one_clear_line(weights_dir: Path) -> None:
    with pytest.raises(S2ClipError) as err:
        weights.resolve(vfm_spec("dino_vitb8"), offline=True)
    msg = str(err.value)
    assert "\n" not in msg
    assert "dino_vitb8.safetensors" in msg and str(weights_dir) in msg
    assert "s2clip models download dino_vitb8" in msg


def test_env_offline_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("S2CLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not weights.is_offline()
    assert weights.is_offline(True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.is_offline()


def test_resolution_order(weights_dir: Path, tmp_path: Path) -> None:
    spec = vfm_spec("dino_vits16")
    assert weights.locate(spec).where == "missing"
    hub_file = _hf_cache_entry(Path(os.environ["HF_HUB_CACHE"]), spec.hf_repo, "model.safetensors")
    save_file({"x": torch.zeros(1)}, str(hub_file))
    assert weights.locate(spec) == weights.Located(hub_file, "hf cache")
    local = weights_dir / spec.filename
    save_file({"x": torch.zeros(1)}, str(local))
    assert weights.locate(spec) == weights.Located(local, "weights dir")
    explicit = tmp_path / "mine.safetensors"
    save_file({"x": torch.zeros(1)}, str(explicit))
    assert weights.locate(spec, explicit) == weights.Located(explicit, "explicit")
    with pytest.raises(S2ClipError, match="does not exist"):
        weights.locate(spec, tmp_path / "nope.pth")


def test_clip_checkpoint_round_trip(weights_dir: Path) -> None:
    torch.manual_seed(1)
    spec = clip_spec("ViT-B/16")
    source = build_clip(spec, weights=None)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights_dir / spec.filename))
    torch.manual_seed(2)
    loaded = build_clip(spec, weights=weights.resolve(spec, offline=True))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_dino_original_pth_and_timm_safetensors_load(weights_dir: Path, tmp_path: Path) -> None:
    spec = vfm_spec("dino_vits16")
    torch.manual_seed(3)
    reference = timm.create_model(spec.arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    state = reference.state_dict()
    # timm hub format (safetensors) in the weights dir
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights_dir / spec.filename))
    vfm = build_vfm(spec, weights=weights.resolve(spec, offline=True))
    # At the native 224 grid no positional-embedding resampling is involved (ours follows the DINO
    # hub, timm's differs: tests/test_pos_embed.py), so timm's own forward is the reference.
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, -1, 14, 14)
        torch.testing.assert_close(vfm(x), expected)
    # the original DINO release format (.pth, weights only) through an explicit path
    pth = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, pth)
    vfm2 = build_vfm(spec, weights=pth)
    with torch.no_grad():
        torch.testing.assert_close(vfm2(x), expected)


def test_corrupt_checkpoint_is_a_clear_error(weights_dir: Path, tmp_path: Path) -> None:
    spec = vfm_spec("dino_vits16")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(S2ClipError, match="cannot load dino_vits16 weights"):
        build_vfm(spec, weights=bad)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(S2ClipError, match="cannot load CLIP weights"):
        build_clip(clip_spec("ViT-B/16"), weights=wrong)


def test_real_mode_never_falls_back_to_random(weights_dir: Path) -> None:
    with pytest.raises(S2ClipError, match="missing weights for ViT-B/16"):
        load_models("ViT-B/16", "dino_vitb8", None, mode="real", offline=True)


def test_unknown_model_names(weights_dir: Path) -> None:
    with pytest.raises(S2ClipError, match="unknown CLIP model 'ViT-X/3'"):
        load_models("ViT-X/3", "dino_vitb8", None, mode="tiny")
    with pytest.raises(S2ClipError, match="unknown VFM 'dino_huge'"):
        load_models("ViT-B/16", "dino_huge", None, mode="tiny")
    with pytest.raises(S2ClipError, match="unknown --models"):
        load_models(mode="fake")


def test_load_models_real_mode_with_explicit_paths(weights_dir: Path, tmp_path: Path) -> None:
    """The same path users hit, with every checkpoint given explicitly."""
    torch.manual_seed(4)
    clip = build_clip(clip_spec("ViT-B/16"), weights=None)
    clip_file = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_file))
    dino = timm.create_model(vfm_spec("dino_vits16").arch, pretrained=False, num_classes=0)
    dino_file = tmp_path / "dino.pth"
    torch.save(dino.state_dict(), dino_file)
    loaded = load_models("ViT-B/16", "dino_vits16", None, mode="real", offline=True,
                         paths=ModelPaths(clip=clip_file, vfm=dino_file))
    assert not loaded.is_random and loaded.sam is None
    assert str(clip_file.resolve()) in loaded.identity["ViT-B/16"]
    assert torch.equal(loaded.clip.visual.proj, clip.visual.proj)
