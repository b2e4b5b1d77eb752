"""Text side: class queries (synonyms, background names) and their cached CLIP embeddings."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

from ..errors import one_line
from ..io.files import atomic_path
from ..models.clip import ClipBackbone
from ..models.weights import weights_dir

TEMPLATES = OPENAI_IMAGENET_TEMPLATES  # the 80 OpenAI ImageNet prompt templates


@dataclass(frozen=True)
class ClassQueries:
    """Flat list of names to embed and, for each, the output class it votes for."""

    class_names: list[list[str]]  # output classes, each with one or more names
    has_background: bool  # class 0 is the background

    @property
    def names(self) -> list[str]:
        return [name for names in self.class_names for name in names]

    @property
    def name_to_class(self) -> list[int]:
        return [c for c, names in enumerate(self.class_names) for _ in names]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> list[str]:
        """Display label per class: its first name ("background" for the background)."""
        out = [names[0] for names in self.class_names]
        if self.has_background:
            out[0] = "background"
        return out


def build_queries(classes: list[list[str]], background: list[str] | None) -> ClassQueries:
    """Classes in the order given; with `background`, it becomes class 0."""
    if background:
        return ClassQueries([list(background), *[list(c) for c in classes]], True)
    return ClassQueries([list(c) for c in classes], False)


def _cache_key(model_identity: str, names: list[str]) -> str:
    payload = json.dumps({"model": model_identity, "names": names, "templates": len(TEMPLATES)})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def text_cache_dir() -> Path:
    return weights_dir() / "text-cache"


_warned_dirs: set[Path] = set()  # cache folders whose write failure was already reported


def _save_cached(path: Path, embeddings: Tensor) -> None:
    """Write a cache entry atomically; on any failure (a full disk makes `torch.save` raise
    RuntimeError, not OSError) warn once per folder and carry on — the temporary file is removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(embeddings, tmp)
    except Exception as exc:  # noqa: BLE001 - an unwritable cache only costs time
        if path.parent not in _warned_dirs:
            _warned_dirs.add(path.parent)
            warnings.warn(f"cannot write the text-embedding cache in {path.parent} ({type(exc).__name__}: "
                          f"{one_line(exc)[:200]}); class names are embedded again on every run",
                          RuntimeWarning, stacklevel=3)


def encode_names(clip: ClipBackbone, names: list[str], model_identity: str | None) -> Tensor:
    """``[len(names), E]`` unit text embeddings, from the disk cache when this model (identified
    by its weights' content) already embedded these names. `model_identity=None` disables the cache."""
    path = text_cache_dir() / f"{_cache_key(model_identity, names)}.pt" if model_identity else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.shape[0] == len(names) and cached.shape[1] == clip.embed_dim:
                return cached
        except Exception:  # noqa: BLE001 - a bad cache entry is recomputed
            pass
    embeddings = clip.encode_text_names(names, TEMPLATES).cpu()
    if path is not None:
        _save_cached(path, embeddings)
    return embeddings
