"""Checkpoint resolution and loading, on checkpoint files the tests write themselves."""

from __future__ import annotations

import hashlib
import io
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
from s2clip_cli.models.registry import ModelSpec, any_spec, clip_spec, vfm_spec
from s2clip_cli.models.vfm import build_vfm


@pytest.fixture()
def weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "weights"
    d.mkdir()
    monkeypatch.setenv("S2CLIP_WEIGHTS_DIR", str(d))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no SAM file from torch hub's cache
    monkeypatch.delenv("S2CLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
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
    with pytest.raises(S2ClipError, match=f"dino_vits16 checkpoint {bad} is not a checkpoint"):
        build_vfm(spec, weights=bad)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(wrong))
    with pytest.raises(S2ClipError, match=f"CLIP ViT-B/16 checkpoint {wrong} does not match the CLIP ViT-B/16 "
                       r"architecture \(Missing key"):
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
    assert loaded.identity["ViT-B/16"] == "sha256:" + hashlib.sha256(clip_file.read_bytes()).hexdigest()[:16]
    assert torch.equal(loaded.clip.visual.proj, clip.visual.proj)


# --------------------------------------------------------------------------------- several missing, one line


def test_everything_missing_is_one_line_with_one_download_command(weights_dir: Path) -> None:
    """A fresh machine: CLIP, DINO, SAM and SD all missing, reported together (offline)."""
    with pytest.raises(S2ClipError) as err:
        load_models("ViT-B/16", "dino_vitb8", "vit_b", sd_name="sd21_base", mode="real", offline=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.count("missing weights") == 1
    for file in ("clip_vit_b16_openai.safetensors", "dino_vitb8.safetensors", "sam_vit_b_01ec64.pth", "sd21_base/"):
        assert file in msg, file
    assert msg.count("s2clip models download") == 1
    assert "`s2clip models download ViT-B/16 dino_vitb8 vit_b sd21_base`" in msg
    assert str(weights_dir) in msg and "(offline)" in msg


def test_failed_downloads_are_reported_together(weights_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[str] = []

    def no_network(spec: weights.ModelSpec) -> Path:
        tried.append(spec.name)
        raise S2ClipError(f"could not download {spec.name} (URLError)")

    monkeypatch.setattr(weights, "download", no_network)
    # sam_vitb16 reads the SAM ViT-B file: asked for (and named) once.
    with pytest.raises(S2ClipError) as err:
        load_models("ViT-B/16", "sam_vitb16", "vit_b", mode="real")
    msg = str(err.value)
    assert tried == ["ViT-B/16", "vit_b"]
    assert "\n" not in msg and "`s2clip models download ViT-B/16 vit_b`" in msg
    assert "download failed: ViT-B/16: could not download ViT-B/16 (URLError); vit_b:" in msg


def test_bad_explicit_path_and_missing_files_in_one_message(weights_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(S2ClipError) as err:
        load_models("ViT-B/16", "dino_vitb8", None, mode="real", offline=True,
                    paths=ModelPaths(clip=tmp_path / "typo.safetensors"))
    msg = str(err.value)
    assert "\n" not in msg and "typo.safetensors" in msg and "does not exist" in msg
    assert "`s2clip models download dino_vitb8`" in msg


# --------------------------------------------------------------------------------- content identity


def test_identity_is_the_content_hash_cached_per_file_version(weights_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    digest_file = weights._digest_file

    def counting(path: Path) -> dict[str, str]:
        reads.append(path)
        return digest_file(path)

    monkeypatch.setattr(weights, "_digest_file", counting)
    data = os.urandom(3000)
    a, b = tmp_path / "node-a" / "clip.safetensors", tmp_path / "node-b" / "weights.bin"
    for path, mtime_ns in ((a, 1_600_000_000_000_000_000), (b, 1_700_000_000_123_456_789)):
        path.parent.mkdir()
        path.write_bytes(data)
        os.utime(path, ns=(mtime_ns, mtime_ns))
    expected = "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    assert weights.content_identity(a) == weights.content_identity(b) == expected
    assert len(reads) == 2
    assert weights.content_identity(a) == expected and len(reads) == 2  # cache hit: no read
    assert (weights_dir / weights.HASH_CACHE_NAME).is_file()
    other = tmp_path / "other.safetensors"
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert weights.content_identity(other) != expected
    # the file changes: new size / mtime_ns, so it is hashed again
    a.write_bytes(data + b"x")
    assert weights.content_identity(a) == "sha256:" + hashlib.sha256(data + b"x").hexdigest()[:16]
    assert reads.count(a) == 2


def test_sd_folder_identity_covers_its_files(weights_dir: Path, tmp_path: Path) -> None:
    def folder(root: Path, unet: bytes) -> Path:
        for sub, name, data in (("unet", "diffusion_pytorch_model.safetensors", unet),
                                ("unet", "config.json", b"{}"), ("vae", "config.json", b"{}"),
                                ("scheduler", "scheduler_config.json", b"{}")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / name).write_bytes(data)
        (root / "v2-1_512-ema-pruned.ckpt").write_bytes(b"not loaded by s2clip")
        return root

    one = weights.content_identity(folder(tmp_path / "a", b"weights"))
    assert one.startswith("sha256:") and len(one) == len("sha256:") + 16
    assert weights.content_identity(folder(tmp_path / "b", b"weights")) == one
    assert weights.content_identity(folder(tmp_path / "c", b"weightz")) != one
    (tmp_path / "a" / "v2-1_512-ema-pruned.ckpt").write_bytes(b"changed")  # outside the SD subfolders
    assert weights.content_identity(tmp_path / "a") == one


def test_random_modes_keep_their_identity_and_sd_is_a_fourth_model(weights_dir: Path) -> None:
    with pytest.warns(UserWarning, match="randomly initialised"):
        loaded = load_models("ViT-B/16", "dino_vits16", None, sd_name="sd21_base", mode="tiny")
    assert loaded.identity == {"ViT-B/16": "random-tiny:clip:ViT-B/16:seed0",
                               "dino_vits16": "random-tiny:vfm:dino_vits16:seed0",
                               "sd21_base": "random-tiny:sd:sd21_base:seed0"}
    assert loaded.sd is not None and loaded.sd.mode == "tiny" and loaded.sam is None
    with pytest.raises(S2ClipError, match="unknown SD model 'sd9'"):
        load_models(sd_name="sd9", mode="tiny")


# --------------------------------------------------------------------------------- SAM name digests


def _named_by_md5(folder: Path, data: bytes) -> Path:
    path = folder / f"sam_vit_b_{hashlib.md5(data).hexdigest()[:6]}.pth"
    path.write_bytes(data)
    return path


def test_sam_file_checked_against_the_digest_in_its_name(weights_dir: Path, tmp_path: Path) -> None:
    # The real release names carry their MD5's start (sam_vit_b_01ec64.pth: MD5 01ec64d29a2f…).
    assert weights.name_digest("sam_vit_b_01ec64.pth") == "01ec64"
    assert weights.name_digest("dino_vitb8.safetensors") is None
    data = os.urandom(5000)
    good = _named_by_md5(tmp_path, data)
    assert weights.check_name_digest(good) is True
    corrupt = tmp_path / "corrupt" / good.name
    corrupt.parent.mkdir()
    corrupt.write_bytes(data[:-10])  # a truncated download under the release name
    with pytest.raises(S2ClipError, match="corrupt or incomplete: its MD5 .* does not start with") as err:
        weights.check_name_digest(corrupt)
    assert "\n" not in str(err.value)
    by_sha = tmp_path / f"sam_vit_b_{hashlib.sha256(data).hexdigest()[:6]}.pth"
    by_sha.write_bytes(data)
    with pytest.raises(S2ClipError):  # the name's digest is MD5, not sha256
        weights.check_name_digest(by_sha)
    assert weights.check_name_digest(tmp_path / "x.pth", "model.pth") is False


class _Response(io.BytesIO):
    """What `urllib.request.urlopen` returns, for a download test without network."""


def test_direct_download_checks_the_name_digest_while_streaming(weights_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(20000)
    name = _named_by_md5(tmp_path, data).name
    spec = ModelSpec("sam_test", "sam", "vit_b", name, "test file", url="https://example.invalid/" + name)
    served = {"data": data[:-1]}  # first a truncated transfer
    monkeypatch.setattr(weights.urllib.request, "urlopen", lambda url, timeout: _Response(served["data"]))
    with pytest.raises(S2ClipError, match="download of sam_test .* is corrupt"):
        weights.download(spec)
    assert not any(weights_dir.iterdir())  # neither the file nor a temporary one
    served["data"] = data

    def no_reads(path: Path) -> dict[str, str]:
        raise AssertionError(f"{path} read again")

    path = weights.download(spec)
    assert path == weights_dir / name and path.read_bytes() == data
    monkeypatch.setattr(weights, "_digest_file", no_reads)  # hashed while streaming: cache hit
    assert weights.content_identity(path) == "sha256:" + hashlib.sha256(data).hexdigest()[:16]
    assert sorted(p.name for p in weights_dir.iterdir()) == sorted([name, weights.HASH_CACHE_NAME])


# --------------------------------------------------------------------------------- the SD folder family


def test_sd_family_through_the_generic_functions(weights_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from s2clip_cli.models import sd as sdm
    from s2clip_cli.models.verify import found_specs, verify_spec

    spec = any_spec("sd21_base")
    assert weights.locate(spec) == weights.Located(None, "missing")
    assert weights.locate_any is weights.locate and weights.download_any is weights.download
    with pytest.raises(S2ClipError, match="s2clip models download sd21_base") as err:
        verify_spec(spec)
    assert "\n" not in str(err.value)
    assert spec not in found_specs()
    monkeypatch.setattr(sdm, "download_sd", lambda: tmp_path / "snapshot")
    assert weights.download(spec) == tmp_path / "snapshot"
    assert weights.hf_cache_dir() == str(tmp_path / "hub") and weights._hf_cache_dir is weights.hf_cache_dir


# --------------------------------------------------------------------------------- one download per cluster


class _StubGroup:
    """A rank of a 4-rank, 2-node job whose peers always succeed (records the agreements)."""

    is_distributed = True

    def __init__(self, rank: int, local_rank: int) -> None:
        self.rank, self.local_rank = rank, local_rank
        self.agreements: list[tuple[bool, bool]] = []

    def failed_ranks(self, ok: bool, *, long_wait: bool = False) -> list[int]:
        self.agreements.append((ok, long_wait))
        return [] if ok else [self.rank]


@pytest.mark.parametrize(("rank", "local_rank", "downloads"), [(0, 0, 2), (2, 0, 2), (1, 1, 0), (3, 1, 0)])
def test_prefetch_downloads_on_rank0_and_node_leaders_only(weights_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                           rank: int, local_rank: int, downloads: int) -> None:
    from s2clip_cli.models.factory import prefetch_weights

    fetched: list[str] = []

    def fake_download(spec: ModelSpec) -> Path:
        fetched.append(spec.name)
        target = weights_dir / spec.filename
        save_file({"w": torch.zeros(2)}, str(target))
        return target

    monkeypatch.setattr(weights, "download", fake_download)
    group = _StubGroup(rank, local_rank)
    if downloads:
        prefetch_weights("ViT-B/16", "dino_vits16", None, group=group)
        assert fetched == ["ViT-B/16", "dino_vits16"]
        assert group.agreements == [(True, True)] * 3
    else:  # the others never download: they find rank 0's files, or report them missing (offline)
        with pytest.raises(S2ClipError, match=r"missing weights for ViT-B/16, dino_vits16 \(offline\)"):
            prefetch_weights("ViT-B/16", "dino_vits16", None, group=group)
        assert fetched == [] and group.agreements == [(True, True), (True, True), (False, True)]
    prefetch_weights("ViT-B/16", "dino_vits16", None, mode="tiny", group=_StubGroup(0, 0))  # no-op


def test_a_damaged_hash_cache_costs_a_rehash_never_an_error(weights_dir: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(4)}, str(ckpt))
    expected = "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    cache = weights_dir / weights.HASH_CACHE_NAME
    for damage in ("deep", "fifo", "binary", "list"):
        cache.unlink(missing_ok=True)
        if damage == "deep":
            cache.write_text("[" * 100000 + "]" * 100000)  # json.loads: RecursionError
        elif damage == "fifo":
            os.mkfifo(cache)  # reading it would block forever
        elif damage == "binary":
            cache.write_bytes(b"\xff\xfe\x00garbage")
        else:
            cache.write_text("[1, 2]")
        assert weights.content_identity(ckpt) == expected, damage
