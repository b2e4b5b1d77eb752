"""The text-embedding cache: hits, and a failing write (a full disk) that neither stops the run nor
leaves a temporary file behind."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from s2clip_cli.pipeline import text


class _StubClip:
    """Stands in for `ClipBackbone`: deterministic unit embeddings, counting its calls."""

    embed_dim = 8

    def __init__(self) -> None:
        self.calls = 0

    def encode_text_names(self, names: list[str], templates: object) -> torch.Tensor:
        self.calls += 1
        gen = torch.Generator().manual_seed(len(names))
        return torch.nn.functional.normalize(torch.randn(len(names), self.embed_dim, generator=gen), dim=-1)


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("S2CLIP_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(text, "_warned_dirs", set())
    return tmp_path / "weights" / "text-cache"


def test_cache_round_trip(cache_dir: Path) -> None:
    clip = _StubClip()
    first = text.encode_names(clip, ["cat", "dog"], "ViT-B/16|sha256:0123456789abcdef")
    again = text.encode_names(clip, ["cat", "dog"], "ViT-B/16|sha256:0123456789abcdef")
    assert clip.calls == 1 and torch.equal(first, again)
    assert [p.suffix for p in cache_dir.iterdir()] == [".pt"]
    text.encode_names(clip, ["cat", "dog"], "ViT-B/16|sha256:ffffffffffffffff")  # other weights: a miss
    assert clip.calls == 2
    text.encode_names(clip, ["cat", "dog"], None)  # random models: no cache
    assert clip.calls == 3 and len(list(cache_dir.iterdir())) == 2


def test_failing_cache_write_warns_once_and_leaves_no_temporary_file(cache_dir: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(obj: object, f: object) -> None:
        Path(str(f)).write_bytes(b"PK\x03\x04 half a zip")  # torch.save had started writing
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")

    monkeypatch.setattr(text.torch, "save", disk_full)
    clip = _StubClip()
    with pytest.warns(RuntimeWarning, match="cannot write the text-embedding cache .*RuntimeError") as record:
        out = text.encode_names(clip, ["road", "sky"], "ViT-B/16|sha256:0123456789abcdef")
    assert len(record) == 1
    expected = _StubClip().encode_text_names(["road", "sky"], None)
    assert torch.equal(out, expected)  # the run goes on with the embeddings
    assert list(cache_dir.iterdir()) == []  # no entry, no temporary file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure in the same folder is silent
        text.encode_names(clip, ["car"], "ViT-B/16|sha256:0123456789abcdef")
    assert list(cache_dir.iterdir()) == [] and clip.calls == 2
