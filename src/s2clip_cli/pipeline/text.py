"""Text side: class queries (synonyms, background names) and their cached CLIP embeddings."""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import Tensor

from ..errors import S2ClipError, one_line
from ..io.files import atomic_path
from ..models.clip import ClipBackbone
from ..models.weights import weights_dir

TEMPLATES = OPENAI_IMAGENET_TEMPLATES  # the 80 OpenAI ImageNet prompt templates
DEFAULT_TEMPLATE_SET = "openai80"


def _formatted(texts: Sequence[str]) -> tuple[Callable[[str], str], ...]:
    return tuple((lambda name, text=text: text.format(name)) for text in texts)


# MaskCLIP's prompt engineering (`tools/maskclip_utils/prompt_engineering.py`): the 80 ImageNet
# templates plus five "in the scene" ones.
MASKCLIP_SCENE_TEMPLATES = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)
# CLIPer's `template/car_template.txt` (15 lines, used verbatim).
CLIPER_CAR_TEMPLATES = (
    "a clean origami {}.", "a photo of a {}.", "This is a photo of a {}", "There is a {} in the scene",
    "There is the {} in the scene", "a photo of a {} in the scene", "a photo of a small {}.",
    "a photo of a medium {}.", "a photo of a large {}.", "This is a photo of a small {}.",
    "This is a photo of a medium {}.", "This is a photo of a large {}.", "There is a small {} in the scene.",
    "There is a medium {} in the scene.", "There is a large {} in the scene.",
)
# Template sets by the names `s2clip_cli.methods.TEMPLATES` uses.
TEMPLATE_SETS: dict[str, tuple[Callable[[str], str], ...]] = {
    "openai80": tuple(TEMPLATES),
    "maskclip85": (*TEMPLATES, *_formatted(MASKCLIP_SCENE_TEMPLATES)),
    "cliper_car15": _formatted(CLIPER_CAR_TEMPLATES),
}


def template_set(name: str) -> tuple[Callable[[str], str], ...]:
    """The prompt templates called `name` (one of `TEMPLATE_SETS`)."""
    try:
        return TEMPLATE_SETS[name]
    except KeyError:
        raise S2ClipError(f"unknown template set {name!r}; choose one of: {', '.join(TEMPLATE_SETS)}") from None


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


def _cache_key(model_identity: str, names: list[str], templates: str = DEFAULT_TEMPLATE_SET) -> str:
    record = {"model": model_identity, "names": names, "templates": len(template_set(templates))}
    if templates != DEFAULT_TEMPLATE_SET:  # the default's key predates template sets
        record["template_set"] = templates
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()[:32]


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


# Embeddings of models without a content identity (random weights), kept for the life of the model
# object: a process that builds several segmenters on one model (`eval --method all`) embeds once.
_in_memory: weakref.WeakKeyDictionary[object, dict[tuple[str, tuple[str, ...]], Tensor]] = weakref.WeakKeyDictionary()


def encode_names(clip: ClipBackbone, names: list[str], model_identity: str | None,
                 templates: str = DEFAULT_TEMPLATE_SET) -> Tensor:
    """``[len(names), E]`` unit text embeddings of `names` under the template set `templates`
    (`TEMPLATE_SETS`), from the disk cache when this model (identified by its weights' content)
    already embedded these names. `model_identity=None` disables the disk cache; the embeddings
    are then remembered in memory for this model object only."""
    prompts = template_set(templates)
    if model_identity is None:
        memo = _in_memory.setdefault(clip, {})
        key = (templates, tuple(names))
        if key not in memo:
            memo[key] = clip.encode_text_names(names, prompts).cpu()
        return memo[key]
    path = text_cache_dir() / f"{_cache_key(model_identity, names, templates)}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.shape[0] == len(names) and cached.shape[1] == clip.embed_dim:
                return cached
        except Exception:  # noqa: BLE001 - a bad cache entry is recomputed
            pass
    embeddings = clip.encode_text_names(names, prompts).cpu()
    _save_cached(path, embeddings)
    return embeddings
