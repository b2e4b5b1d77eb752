"""Files a user hands us that are broken or hostile: checkpoints (CLIP, VFM, SAM, SD, the weights
check), and paths that look like console markup. Each is one line naming the file and the problem,
never a traceback, never a hang (FIFOs), never code run from a pickle."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.errors import S2ClipError
from s2clip_cli.models import sd as sdm
from s2clip_cli.models import weights
from s2clip_cli.models.clip import build_clip
from s2clip_cli.models.registry import clip_spec, vfm_spec
from s2clip_cli.models.sam import build_sam
from s2clip_cli.models.vfm import build_vfm

runner = CliRunner()
EXECUTED: list[str] = []


class _RunsCode:
    """A pickle that calls a function when loaded: loading it must never happen."""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (EXECUTED.append, ("code ran",))


def _hostile_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """name → (file, what the error must say), all built from a small valid state dict."""
    state = {"weight": torch.arange(4096, dtype=torch.float32)}
    good_pth, good_st = folder / "good.pth", folder / "good.safetensors"
    torch.save(state, good_pth)
    save_file(state, str(good_st))
    legacy = io.BytesIO()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    files: dict[str, tuple[bytes, str, str]] = {
        "truncated_zip": (good_pth.read_bytes()[:3000], ".pth", "is truncated or corrupt"),
        "truncated_safetensors": (good_st.read_bytes()[:5000], ".safetensors", "is truncated: 5000 bytes, but"),
        "truncated_legacy": (legacy.getvalue()[:-500], ".pth", "is truncated or corrupt"),
        "legacy_cut_in_its_pickle": (legacy.getvalue()[:40], ".pth", "is truncated or corrupt"),
        "empty": (b"", ".pth", "is empty (0 bytes)"),
        "text": (b"these are not the weights you are looking for\n", ".pth", "is not a checkpoint"),
        "text_named_safetensors": (b"{\"not\": \"a header\"}" * 4, ".safetensors", "is not a checkpoint"),
        "zip_of_text": (_zip_bytes({"notes.txt": b"hello"}), ".pth", "is a zip archive, not a PyTorch checkpoint"),
        "runs_code": (pickle.dumps(_RunsCode(), protocol=2), ".pth", "holds pickled Python objects besides tensors"),
        "lying_header": (_lying_safetensors(), ".safetensors", "is truncated: 103 bytes, but its safetensors header"),
    }
    out = {}
    for name, (data, suffix, expected) in files.items():
        path = folder / f"{name}{suffix}"
        path.write_bytes(data)
        out[name] = (path, expected)
    fifo = folder / "fifo.pth"
    os.mkfifo(fifo)  # reading it would block forever
    out["fifo"] = (fifo, "is not a regular file")
    out["device"] = (Path("/dev/zero"), "is not a regular file")  # reading it would never end
    return out


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _lying_safetensors() -> bytes:
    """A safetensors header declaring a 4 GB tensor, followed by 16 bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 16


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return _hostile_checkpoints(tmp_path_factory.mktemp("ckpt"))


LOADERS: dict[str, tuple[str, Callable[[Path], object]]] = {
    "clip": ("CLIP ViT-B/16 checkpoint", lambda p: build_clip(clip_spec("ViT-B/16"), weights=p, tiny=True)),
    "vfm": ("dino_vitb8 checkpoint", lambda p: build_vfm(vfm_spec("dino_vitb8"), weights=p, tiny=True)),
    "sam": ("SAM checkpoint", lambda p: build_sam("vit_b", tiny=True, checkpoint=p)),
    "weights check": ("checkpoint", lambda p: weights._check_loadable(p)),
}


@pytest.mark.parametrize("loader", list(LOADERS))
def test_every_loader_names_a_broken_checkpoint_in_one_line(hostile: dict[str, tuple[Path, str]],
                                                           loader: str) -> None:
    prefix, load = LOADERS[loader]
    for name, (path, expected) in hostile.items():
        with pytest.raises(S2ClipError) as info:
            load(path)
        message = str(info.value)
        assert "\n" not in message and f"{prefix} {path} {expected}" in message, (name, message)
        assert "Unpickling" not in message and "SafetensorError" not in message, (name, message)
    assert EXECUTED == []  # the pickle's code never ran


def test_checkpoints_that_hold_the_wrong_thing(tmp_path: Path) -> None:
    as_list = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], as_list)
    wrong_keys = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong_keys))
    for prefix, load in ((LOADERS["clip"]), (LOADERS["vfm"])):
        with pytest.raises(S2ClipError, match="does not hold a state dict") as info:
            load(as_list)
        assert str(as_list) in str(info.value) and prefix in str(info.value)
    with pytest.raises(S2ClipError, match=r"does not hold a state dict \(it holds list\)"):
        build_sam("vit_b", tiny=True, checkpoint=as_list)
    with pytest.raises(S2ClipError, match=r"does not match the SAM architecture \(Missing key"):
        build_sam("vit_b", tiny=True, checkpoint=wrong_keys)
    with pytest.raises(S2ClipError, match=f"CLIP ViT-B/16 checkpoint {wrong_keys} does not match"):
        build_clip(clip_spec("ViT-B/16"), weights=wrong_keys, tiny=True)


def test_checkpoint_damage_passes_intact_files(tmp_path: Path) -> None:
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "a.pth")
    save_file(state, str(tmp_path / "a.safetensors"))
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for name in ("a.pth", "a.safetensors", "legacy.pth"):
        assert weights.checkpoint_damage(tmp_path / name) is None


def _tiny_sd_folder(folder: Path) -> Path:
    sdm.save_components(sdm.random_components(tiny=True, seed=sdm.SEED), folder)
    tok = folder / "tokenizer"
    tok.mkdir()
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "!"}
    (tok / "vocab.json").write_text(json.dumps({"!": 0, "a</w>": 1, "<|startoftext|>": 62, "<|endoftext|>": 63}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "special_tokens_map.json").write_text(json.dumps(special))
    (tok / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77,
                                                           "tokenizer_class": "CLIPTokenizer"}))
    return folder


def test_stable_diffusion_names_the_broken_file(tmp_path: Path) -> None:
    good = _tiny_sd_folder(tmp_path / "good")
    sdm.build_sd(path=good)  # loads
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    cases = {
        "truncated": (unet_file, lambda p: p.write_bytes(p.read_bytes()[:4096]), "is truncated"),
        "not_weights": (unet_file, lambda p: p.write_bytes(b"<html>rate limited</html>"), "is not a checkpoint"),
        "scheduler_garbage": ("scheduler/scheduler_config.json", lambda p: p.write_text("{oops"), "is not valid JSON"),
        "scheduler_list": ("scheduler/scheduler_config.json", lambda p: p.write_text("[1]"), "holds no JSON object"),
        "scheduler_huge": ("scheduler/scheduler_config.json",
                           lambda p: p.write_text(json.dumps({"_class_name": "PNDMScheduler",
                                                              "num_train_timesteps": 10**12})),
                           "num_train_timesteps 1000000000000 is not an integer"),
    }
    for name, (rel, damage, expected) in cases.items():
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder / rel)
        with pytest.raises(S2ClipError) as info:
            sdm.build_sd(path=folder)
        message = str(info.value)
        assert "\n" not in message and str(folder / rel) in message and expected in message, (name, message)


def test_models_verify_reports_a_truncated_download_in_one_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S2CLIP_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = vfm_spec("dino_vits16")
    path = tmp_path / spec.filename
    save_file({"w": torch.zeros(1 << 16)}, str(path))
    path.write_bytes(path.read_bytes()[:-1000])
    result = runner.invoke(app, ["models", "verify", "dino_vits16"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "is truncated" in lines[0], result.stderr


def test_a_cli_run_with_a_broken_explicit_checkpoint_is_one_line(tmp_path: Path) -> None:
    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(photo)
    broken = tmp_path / "clip.safetensors"
    broken.write_bytes(b"\x00" * 7)
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--clip-weights", str(broken),
                                 "--offline", "--device", "cpu", "--no-sam", "--method", "clip",
                                 "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(broken) in errors[0], result.stderr


def test_paths_that_look_like_console_markup_are_printed_as_they_are(tmp_path: Path) -> None:
    odd = tmp_path / "[" / "]data[bold]"  # '[/]' in a path would be a closing markup tag
    result = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(odd), "--models", "tiny"])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert f"data root {odd} does not exist" in result.stderr
    config = tmp_path / "[" / "]run.toml"
    result = runner.invoke(app, ["eval", "--config", str(config)])
    assert result.exit_code == 2 and f"cannot read config {config}" in result.stderr
